"""Time `evaluate_model` (batched) against the organisers' one-example-at-a-time loop on the same model and rows.

    python -m gnm_trainer.evaluation.benchmark --data ../shared/data/lume --rows 100 --mia-documents 40

The model is a randomly initialised tiny Llama (the embedded target's size) with a tokenizer trained on the rows: it
never emits eos, so every prompt generates exactly `--max-new-tokens` tokens in both loops (a trained target stops
earlier and unevenly, which favours one-by-one a little). It also checks that both loops give the same generations.
"""

import argparse
import json
import time

import torch

from ..data import load_unlearning_splits
from ..target import build_tiny_llama, train_tokenizer
from .evaluator import evaluate_model, load_mia_documents, score_generations
from .generation import document_nll_one_by_one, generate_one_by_one
from .semeval import semeval_results


def official_loop(model, tokenizer, examples, members, nonmembers, max_new_tokens):
    """The organisers' evaluation: one generation and one NLL forward at a time."""
    generations = generate_one_by_one(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    rows = score_generations(examples, generations)
    member_nll = document_nll_one_by_one(model, tokenizer, members)
    nonmember_nll = document_nll_one_by_one(model, tokenizer, nonmembers)
    return semeval_results(rows, member_nll, nonmember_nll), rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a LUME-format folder (forget/retain files, optional mia/)")
    parser.add_argument("--rows", type=int, default=100, help="rows evaluated, half forget half retain")
    parser.add_argument("--mia-documents", type=int, default=40, help="MIA documents, half members half non-members")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args(argv)

    forget, retain = load_unlearning_splits(args.data)
    forget, retain = forget.select(range(args.rows // 2)), retain.select(range(args.rows - args.rows // 2))
    members, nonmembers = load_mia_documents(args.data)
    members, nonmembers = members[: args.mia_documents // 2], nonmembers[: args.mia_documents // 2]
    texts = [f"{r['prompt']} {r['completion']}" for r in list(forget) + list(retain)] + members + nonmembers
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    model = build_tiny_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                             num_heads=4, max_position_embeddings=4096).eval()

    start = time.perf_counter()
    batched_results, batched_rows = evaluate_model(model, tokenizer, forget, retain, members, nonmembers,
                                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    batched_seconds = time.perf_counter() - start
    examples = [{"id": r["id"], "split": r["split"], "task": r["task"], "prompt": r["prompt"],
                 "reference": r["reference"]} for r in batched_rows]
    start = time.perf_counter()
    reference_results, reference_rows = official_loop(model, tokenizer, examples, members, nonmembers,
                                                      args.max_new_tokens)
    one_by_one_seconds = time.perf_counter() - start

    same_generations = [r["generation"] for r in batched_rows] == [r["generation"] for r in reference_rows]
    nll_gap = abs(batched_results["mia_loss_acc"] - reference_results["mia_loss_acc"])
    summary = {
        "rows": len(batched_rows), "mia_documents": len(members) + len(nonmembers),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "batched_seconds": round(batched_seconds, 2), "one_by_one_seconds": round(one_by_one_seconds, 2),
        "speedup": round(one_by_one_seconds / batched_seconds, 2),
        "same_generations": same_generations, "mia_auc_difference": nll_gap,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
