"""How far below uniform can pretraining on LUME's left-out documents bring the quality target's held-out NLL?

    python benchmarks/pretraining_curve.py --epochs 12 --learning_rate 1e-3

Builds the CPU quality preset's tokenizer and 3.7M Llama exactly as `make_target` does, pretrains it on the
preset's pretraining documents (one warm-up and cosine cycle over all epochs) and prints, after every epoch, the
mean token NLL of the held-out LUME documents of each task and of 50 MIA non-members (uniform: ln 2048 = 7.62).
It measures the pretraining stage alone; `make_target`'s memorisation that follows raises these figures.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from benchmark_paths import DEFAULT_LUME  # noqa: E402


def mean_nll(model, tokenizer, documents) -> float:
    from gnm_trainer.evaluation.generation import document_nll

    values = document_nll(model, tokenizer, documents, batch_size=16)
    return round(sum(values) / len(values), 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--data", default=os.path.normpath(DEFAULT_LUME))
    args = parser.parse_args(argv)

    import torch

    from gnm_trainer.target import build_tiny_llama, train_tokenizer, warmup_cosine
    from gnm_trainer.target.config import LUME_SPLITS, MIA_SPLITS
    from gnm_trainer.target.training import length_grouped_batches, pretraining_blocks, run_epoch

    preset = quality.PRESETS["cpu"]
    subset = quality.lume_subset(args.data, preset.documents, heldout_per_task=preset.heldout_per_task)
    texts = [row["input"] + " " + row["output"] for key in LUME_SPLITS for row in subset.get(key, [])]
    texts += [row["document"] for key in (*MIA_SPLITS, "pretraining") for row in subset.get(key, [])]
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    model = build_tiny_llama(tokenizer, 256, 4, 4, max_position_embeddings=1024, seed=0)
    blocks = pretraining_blocks(tokenizer, subset["pretraining"], 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    total_steps = args.epochs * math.ceil(len(blocks) / 8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps))
    generator = torch.Generator().manual_seed(1)
    documents = {task: [row["document"] for row in subset["heldout"] if row["task"] == task]
                 for task in ("Task1", "Task2", "Task3")}
    documents["nonmember"] = [row["document"] for row in subset["mia_nonmember"]][:50]
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        batches = length_grouped_batches([len(block.input_ids) for block in blocks], 8, generator)
        loss = run_epoch(model, optimizer, scheduler, blocks, batches, tokenizer.pad_token_id)
        model.eval()
        with torch.no_grad():
            figures = {name: mean_nll(model, tokenizer, texts) for name, texts in documents.items()}
        model.train()
        print(json.dumps({"epoch": epoch, "train_loss": round(loss, 3), **figures,
                          "seconds": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
