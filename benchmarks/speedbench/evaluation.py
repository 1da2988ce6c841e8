"""(d) Evaluation: `evaluate_model` (batched) against the organisers' loop (one generation and one NLL forward at a
time) on the same model, Task2 rows and MIA documents (the organisers' own benchmark has 240 Task2 rows for 150+150
MIA documents; the presets keep that proportion). The generations, the scores and every aggregate must be equal.
"""

from .common import Data, Preset, build_model, clock, parameter_count, texts_of


def task2_rows(rows: list, count: int) -> list:
    chosen = [row for row in rows if row["task"] == "Task2"] or rows
    return chosen[:count]


def official_evaluation(model, tokenizer, examples, members, nonmembers, max_new_tokens, device) -> dict:
    """The organisers' evaluation: one generation and one NLL forward at a time; each part timed."""
    from gnm_trainer.evaluation.evaluator import score_generations
    from gnm_trainer.evaluation.generation import document_nll_one_by_one, generate_one_by_one
    from gnm_trainer.evaluation.semeval import semeval_results

    start = clock(device)
    generations = generate_one_by_one(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    rows = score_generations(examples, generations)
    middle = clock(device)
    member_nll = document_nll_one_by_one(model, tokenizer, members)
    nonmember_nll = document_nll_one_by_one(model, tokenizer, nonmembers)
    results = semeval_results(rows, member_nll, nonmember_nll)
    end = clock(device)
    return {"results": results, "rows": rows, "generation_seconds": middle - start, "nll_seconds": end - middle}


def measure_evaluation(preset: Preset, data: Data, device: str) -> dict:
    """(d): evaluate_model against the organisers' loop, plus each loop's generation and NLL parts timed apart."""
    from gnm_trainer.evaluation.evaluator import evaluate_model
    from gnm_trainer.evaluation.generation import document_nll, generate_greedy
    from gnm_trainer.evaluation.semeval import rouge_l
    from gnm_trainer.target import train_tokenizer

    forget = task2_rows(data.forget, preset.eval_rows // 2)
    retain = task2_rows(data.retain, preset.eval_rows - len(forget))
    members = data.members[: preset.mia_documents // 2]
    nonmembers = data.nonmembers[: preset.mia_documents - len(members)]
    tokenizer = train_tokenizer(texts_of(forget + retain) + members + nonmembers, vocab_size=preset.vocab_size)
    model = build_model(tokenizer, preset.model, device).eval()
    batch_size, max_new_tokens = preset.eval_batch_size, preset.max_new_tokens
    # Warm-up, not timed: generation, and the scorer's first use (importing rouge_score and its stemmer costs ~1 s,
    # which would otherwise be charged to whichever side is timed first).
    generate_greedy(model, tokenizer, [forget[0]["prompt"]], max_new_tokens=2)
    rouge_l("a warm-up sentence", "a warm-up sentence")

    start = clock(device)
    results, rows = evaluate_model(model, tokenizer, forget, retain, members, nonmembers,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
    batched_seconds = clock(device) - start
    examples = [{key: row[key] for key in ("id", "split", "task", "prompt", "reference")} for row in rows]
    official = official_evaluation(model, tokenizer, examples, members, nonmembers, max_new_tokens, device)
    # The two parts of the batched run, timed apart (evaluate_model does exactly these two calls).
    start = clock(device)
    generate_greedy(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size)
    middle = clock(device)
    document_nll(model, tokenizer, members + nonmembers, batch_size)
    end = clock(device)

    official_seconds = official["generation_seconds"] + official["nll_seconds"]
    same_generations = [r["generation"] for r in rows] == [r["generation"] for r in official["rows"]]
    same_scores = [r["score"] for r in rows] == [r["score"] for r in official["rows"]] and all(
        results[key] == official["results"][key] for key in official["results"]
    )
    settings = results.pop("settings")  # how the batched run generated (dtype, batch size, prompts); not a result
    return {
        "model_parameters": parameter_count(model),
        "rows": len(rows),
        "mia_documents": len(members) + len(nonmembers),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "batched_seconds": batched_seconds,
        "one_by_one_seconds": official_seconds,
        "speedup": official_seconds / batched_seconds,
        "generation_speedup": official["generation_seconds"] / (middle - start),
        "nll_speedup": official["nll_seconds"] / (end - middle),
        "parts_seconds": {
            "batched_generation": middle - start, "batched_nll": end - middle,
            "one_by_one_generation": official["generation_seconds"], "one_by_one_nll": official["nll_seconds"],
        },
        "same_generations": same_generations,
        "same_scores": same_scores,
        "batched_scores": [r["score"] for r in rows],
        "one_by_one_scores": [r["score"] for r in official["rows"]],
        "evaluation_settings": settings,
        "batched_results": results,
        "one_by_one_results": official["results"],
    }
