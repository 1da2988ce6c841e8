"""The memorisation bar of a target: greedy reproduction of its train rows, scored with the task's measures."""

from .config import TargetConfig


def memorisation_scores(model, tokenizer, rows: list[dict], extra_tokens: int = 8) -> dict[str, float | int]:
    """The official scores of greedy reproduction on LUME rows (`evaluation.semeval.score_example`): mean ROUGE-L
    recall of sc rows and exact match of QA rows, each row generating up to its reference's length + `extra_tokens`."""
    from ..evaluation import generation
    from ..evaluation.semeval import score_example

    budgets = [
        len(tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"]) + extra_tokens for row in rows
    ]
    generations = generation.generate_greedy(model, tokenizer, [row["input"] for row in rows], budgets, batch_size=32)
    sc, qa = [], []
    for row, text in zip(rows, generations):
        kind, score = score_example(row["id"], row["output"], text)
        {"sc": sc, "qa": qa}.get(kind, []).append(score)
    return {
        "sc_rougeL_recall": sum(sc) / len(sc) if sc else 1.0,
        "qa_exact_match": sum(qa) / len(qa) if qa else 1.0,
        "sc_rows": len(sc),
        "qa_rows": len(qa),
    }


def memorisation_report(model, tokenizer, dataset: dict[str, list[dict]]) -> dict[str, dict]:
    """Greedy memorisation scores of the forget and retain train rows, by split."""
    model.eval()
    return {split: memorisation_scores(model, tokenizer, dataset[split]) for split in ("forget_train", "retain_train")}


def is_memorised(report: dict[str, dict], config: TargetConfig) -> bool:
    return all(
        scores["sc_rougeL_recall"] >= config.sc_rouge_threshold
        and scores["qa_exact_match"] >= config.qa_exact_match_threshold
        for scores in report.values()
    )


def flat_scores(report: dict[str, dict]) -> dict[str, float]:
    """`{split: {name: value}}` as `{split_name: value}` (rounded), for the history of greedy checks."""
    return {f"{split}_{name}": round(value, 4) for split, scores in report.items() for name, value in scores.items()}
