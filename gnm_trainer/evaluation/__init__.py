"""Evaluation with the SemEval-2025 Task 4 (LUME) metric: pure metric functions, batched generation and NLL,
evaluation of a model in memory or on disk (one or several processes), attacks on an unlearned model (quantisation,
relearning), reports, an in-training callback that keeps the best checkpoint, and an `evaluate` module
(`evaluate.load(SEMEVAL_METRIC_PATH)`)."""

import os

from .attacks import ATTACKS, run_attacks
from .evaluator import (
    PER_EXAMPLE_FILE,
    RESULTS_FILE,
    evaluate_model,
    evaluate_path,
    load_mia_documents,
    load_model_and_tokenizer,
    resolve_mmlu_score,
    shard_bounds,
)
from .generation import document_nll, document_nll_one_by_one, generate_greedy, generate_one_by_one
from .report import markdown_report, plot_results, write_report
from .semeval import (
    final_score,
    flatten_results,
    harmonic_mean,
    harmonic_mean_12,
    knowledge_score,
    mia_auc,
    mia_score,
    regurgitation_score,
    rouge_l,
    score_example,
    score_rows,
    semeval_results,
    task_aggregate_terms,
)

SEMEVAL_METRIC_PATH = os.path.join(os.path.dirname(__file__), "semeval_metric")


def __getattr__(name):
    # The callback imports transformers' Trainer machinery: load it only when asked for.
    if name == "SemEvalCallback":
        from .callback import SemEvalCallback

        return SemEvalCallback
    if name == "MembershipCallback":
        from .membership import MembershipCallback

        return MembershipCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTACKS",
    "PER_EXAMPLE_FILE",
    "RESULTS_FILE",
    "MembershipCallback",
    "SEMEVAL_METRIC_PATH",
    "SemEvalCallback",
    "document_nll",
    "document_nll_one_by_one",
    "evaluate_model",
    "evaluate_path",
    "final_score",
    "flatten_results",
    "generate_greedy",
    "generate_one_by_one",
    "harmonic_mean",
    "harmonic_mean_12",
    "knowledge_score",
    "load_mia_documents",
    "load_model_and_tokenizer",
    "markdown_report",
    "mia_auc",
    "mia_score",
    "plot_results",
    "regurgitation_score",
    "resolve_mmlu_score",
    "rouge_l",
    "run_attacks",
    "score_example",
    "score_rows",
    "semeval_results",
    "shard_bounds",
    "task_aggregate_terms",
    "write_report",
]
