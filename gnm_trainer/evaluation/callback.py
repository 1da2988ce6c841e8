"""Evaluate with the SemEval-2025 Task 4 metric during training and keep the best checkpoint.

The objective (default `aggregate-score`) is what `evaluate_model` reports without MMLU, which cannot run
inside a training loop:

- without MIA documents: objective = HM12, the harmonic mean of the forget set's 1 - R and 1 - K and the retain
  set's R and K per task;
- with MIA documents: objective = (HM12 + MIA score) / 2, where MIA score = 1 - 2 * |AUC - 0.5|.

Any other numeric entry of the results can be the objective, named by its path (`harmonic-mean-task-aggregate`,
`forget-set/Task2/regurgitation-score`, ...) with `greater_is_better` set to match.
"""

import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ..io_utils import atomic_directory, atomic_write_json
from .evaluator import evaluate_model
from .semeval import flatten_results

LOG_PREFIX = "semeval/"
BEST_DIR = "best"
BEST_FILE = "best.json"
ATTACKS_FILE = "attacks.json"


class SemEvalCallback(TrainerCallback):
    """Every `eval_steps` optimizer steps and at the end of training, score the model and keep the best one.

    Metrics are appended to `state.log_history` as `semeval/<key>` (nested keys joined with `/`). When the
    objective improves, the main process saves `<output_dir>/best/` atomically: the model (`save_pretrained`: the
    adapter alone for a PEFT model), the tokenizer, and `best.json` with the step, the objective and the metrics.
    `output_dir` defaults to the Trainer's. Every process must run the callback (evaluation is sharded across them).

    Args:
        forget, retain: validation rows (normalised datasets or lists of rows in any accepted format).
        mia_members, mia_nonmembers: optional documents for the membership attack (both or neither).
        eval_steps: evaluate every this many optimizer steps (and at train end).
        objective: the results key to maximise (or minimise, with `greater_is_better=False`).
        tokenizer: the tokenizer to use; defaults to the Trainer's `processing_class`.
        dtype: "auto" (default) scores the model in the dtype it trains in; "bfloat16" (the organisers' precision),
            "float16" or "float32" score a copy cast to it, the trained weights untouched (`evaluate_model`).
        text_template: None (default) prompts with the raw inputs, as the official evaluation does; pass the
            training template (`args.text_template`) to score the model in the format it is trained on.
        show_progress: tqdm bars during each evaluation (off by default: they would break the training bar).
        attacks: attack names (`evaluation.attacks.ATTACKS`) run on the model after the final evaluation (None, the
            default: none). Their figures are kept in `attack_results`, logged as `semeval/attacks/<key>`, and written
            by the main process to `<output_dir>/attacks.json`.
        attack_options: passed to `run_attacks`: `target` (the model before unlearning, a results file of it or its
            per-example rows, for the recovery), `seed`, `relearn_steps`, `relearn_learning_rate`, `relearn_lora_r`.
    """

    def __init__(
        self,
        forget,
        retain,
        mia_members: Sequence[str] | None = None,
        mia_nonmembers: Sequence[str] | None = None,
        eval_steps: int = 100,
        objective: str = "aggregate-score",
        greater_is_better: bool = True,
        output_dir: str | None = None,
        tokenizer=None,
        save_best: bool = True,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        dtype: str = "auto",
        text_template: str | None = None,
        show_progress: bool = False,
        attacks: Sequence[str] | str | None = None,
        attack_options: dict[str, Any] | None = None,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1, got {eval_steps}")
        if attacks:
            from .attacks import parse_attacks

            attacks = parse_attacks(attacks)  # a wrong name fails now, not after training
        self.forget, self.retain = forget, retain
        self.mia_members, self.mia_nonmembers = mia_members, mia_nonmembers
        self.eval_steps = eval_steps
        self.objective = objective
        self.greater_is_better = greater_is_better
        self.output_dir = output_dir
        self.tokenizer = tokenizer
        self.save_best = save_best
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.text_template = text_template
        self.show_progress = show_progress
        self.attacks = attacks or None
        self.attack_options = dict(attack_options or {})
        self.attack_results: dict[str, Any] | None = None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_evaluated_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.eval_steps == 0:
            self.evaluate(args, state, kwargs["model"], kwargs.get("processing_class"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_evaluated_step != state.global_step:
            self.evaluate(args, state, kwargs["model"], kwargs.get("processing_class"))
        if self.attacks:
            self.attack(args, state, kwargs["model"], kwargs.get("processing_class"))
        return control

    def attack(self, args, state, model, processing_class=None) -> dict[str, Any]:
        """Run `attacks` on `model` (left unchanged), log their figures and write `attacks.json`; returns them."""
        from .attacks import run_attacks

        self.attack_results = run_attacks(
            model, self.tokenizer or processing_class, self.forget, self.retain, self.attacks,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, text_template=self.text_template,
            show_progress=self.show_progress, **self.attack_options,
        )
        metrics = flatten_results({"attacks": self.attack_results})
        state.log_history.append({"step": state.global_step, **{f"{LOG_PREFIX}{k}": v for k, v in metrics.items()}})
        if state.is_world_process_zero:
            atomic_write_json(os.path.join(self.output_dir or args.output_dir, ATTACKS_FILE), self.attack_results)
        return self.attack_results

    def evaluate(self, args, state, model, processing_class=None) -> dict[str, Any]:
        """Score `model` now, log the metrics, and save it when the objective improved; returns the results."""
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("SemEvalCallback needs a tokenizer: pass tokenizer= or give the Trainer processing_class=")
        results, _ = evaluate_model(
            model, tokenizer, self.forget, self.retain, self.mia_members, self.mia_nonmembers,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, dtype=self.dtype,
            text_template=self.text_template, show_progress=self.show_progress,
        )
        self.last_evaluated_step = state.global_step
        metrics = flatten_results(results)
        if self.objective not in metrics:
            raise ValueError(f"objective {self.objective!r} is not among the results' numeric keys: {sorted(metrics)}")
        state.log_history.append({"step": state.global_step, **{f"{LOG_PREFIX}{k}": v for k, v in metrics.items()}})
        value = metrics[self.objective]
        if self._improves(value):
            self.best_value, self.best_step = value, state.global_step
            if self.save_best and state.is_world_process_zero:
                self._save_best(os.path.join(self.output_dir or args.output_dir, BEST_DIR), model, tokenizer,
                                state.global_step, value, results)
        return results

    def _improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.greater_is_better else value < self.best_value

    def _save_best(self, path: str, model, tokenizer, step: int, value: float, results: dict[str, Any]) -> None:
        save_best_checkpoint(path, model, tokenizer,
                             {"step": step, "objective": self.objective, "value": value, "results": results})


def save_best_checkpoint(path: str, model, tokenizer, best: dict[str, Any]) -> None:
    """`path` replaced atomically by the model (`save_pretrained`: the adapter alone for a PEFT model), the tokenizer
    and `best.json` holding `best` (its step, objective and value, which `keep_best_step` reads back)."""
    with atomic_directory(path) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        atomic_write_json(os.path.join(temporary, BEST_FILE), best)
