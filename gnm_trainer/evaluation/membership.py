"""Keep the step at which the forget documents look like text the model never read.

An unlearning run that goes on too long takes the forget documents past unseen text (their NLL ends above it) and
a membership attack tells them apart again, as it does before unlearning: SemEval-2025's MIA score,
1 - 2 * |AUC - 0.5|, peaks where the two meet, and between two evaluations a few dozen steps apart it can go from 1.0
to 0.5 (docs/results.md). `MembershipCallback` measures it during training against reference documents (text of
the forget documents' kind that the model never read, *not* the documents an evaluation will use as non-members)
and keeps the best step, as `SemEvalCallback` does for its objective, without generating anything: one NLL per
document.
"""

import os
from collections.abc import Sequence

from transformers import TrainerCallback

from ..errors import GNMInputError

from .callback import BEST_DIR, save_best_checkpoint
from .evaluator import eval_mode, mia_document_nll
from .semeval import mia_auc, mia_score

LOG_PREFIX = "membership/"


def refuse_evaluation_documents(reference: Sequence[str], evaluation_nonmembers: Sequence[str], option: str,
                                evaluation: str = "the evaluation's MIA non-members") -> None:
    """A one-line `GNMInputError` naming `option` when a reference document is also one of `evaluation_nonmembers`
    (compared by content, white space folded): a margin or a kept step calibrated on the documents that a score is
    reported on makes that score look better than it is."""
    def folded(text: str) -> str:
        return " ".join(text.split())

    reported = {folded(document) for document in evaluation_nonmembers}
    shared = [document for document in reference if folded(document) in reported]
    if shared:
        raise GNMInputError(
            f"{option}: {len(shared)} of its {len(reference)} documents are also {evaluation} (first: "
            f"{shared[0][:50]!r}); calibrate on documents of their kind that no reported figure uses"
        )
OBJECTIVE = "membership/mia_score"


class MembershipCallback(TrainerCallback):
    """From `start_step` on, every `eval_steps` optimizer steps and at the end of training, the MIA score of
    `members` (the forget documents) against `reference` documents; the best step is saved to `<output_dir>/best/`.

    Ties go to the later step, which has unlearned longer. The scores are logged as `membership/mia_score`,
    `membership/auc`, `membership/member_nll` and `membership/reference_nll` (mean document NLLs). Every process
    must run the callback: the documents are scored in shards and gathered, so every process takes the same
    decision; the main process writes `best/`. `gnm_trainer.cli.best_on_validation.keep_best_step` loads the best
    step back into the model.

    Args:
        members: the documents being unlearned, each whole (for LUME: the forget set's sentence-completion rows).
        reference: documents of the same kind that the model never read.
        eval_steps: score every this many optimizer steps, from `start_step` on (and at train end).
        start_step: the first step that may be kept (earlier steps are not scored).
        output_dir: where `best/` goes; defaults to the Trainer's.
        tokenizer: defaults to the Trainer's `processing_class`.
        batch_size: documents per forward pass.
    """

    objective = OBJECTIVE

    def __init__(self, members: Sequence[str], reference: Sequence[str], eval_steps: int, start_step: int = 0,
                 output_dir: str | None = None, tokenizer=None, batch_size: int = 16):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1, got {eval_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {start_step}")
        if not members or not reference:
            raise ValueError("MembershipCallback needs member and reference documents (got "
                             f"{len(members or [])} and {len(reference or [])})")
        self.members, self.reference = list(members), list(reference)
        self.eval_steps, self.start_step = eval_steps, start_step
        self.output_dir, self.tokenizer, self.batch_size = output_dir, tokenizer, batch_size
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_evaluated_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step >= self.start_step and (step - self.start_step) % self.eval_steps == 0:
            self.evaluate(args, state, kwargs["model"], kwargs.get("processing_class"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_evaluated_step != state.global_step:
            self.evaluate(args, state, kwargs["model"], kwargs.get("processing_class"))
        return control

    def evaluate(self, args, state, model, processing_class=None) -> dict[str, float]:
        """Score `model` now, log the figures, and save it when its MIA score is at least the best so far."""
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("MembershipCallback needs a tokenizer: pass tokenizer= or give the Trainer "
                             "processing_class=")
        with eval_mode(model):
            member_nll, reference_nll = mia_document_nll(model, tokenizer, self.members, self.reference,
                                                         self.batch_size, show_progress=False)
        auc = mia_auc(member_nll, reference_nll)
        figures = {"mia_score": mia_score(auc), "auc": auc, "member_nll": sum(member_nll) / len(member_nll),
                   "reference_nll": sum(reference_nll) / len(reference_nll)}
        self.last_evaluated_step = state.global_step
        state.log_history.append({"step": state.global_step,
                                  **{f"{LOG_PREFIX}{key}": value for key, value in figures.items()}})
        if self.best_value is None or figures["mia_score"] >= self.best_value:
            self.best_value, self.best_step = figures["mia_score"], state.global_step
            if state.is_world_process_zero:
                save_best_checkpoint(os.path.join(self.output_dir or args.output_dir, BEST_DIR), model, tokenizer,
                                     {"step": state.global_step, "objective": self.objective,
                                      "value": figures["mia_score"], "results": figures})
        return figures
