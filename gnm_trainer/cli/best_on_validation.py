"""`gnm unlearn --eval_on_validation_steps N`: keep the step that scores best on validation rows.

Every N optimizer steps and at the end, `SemEvalCallback` scores the model on the validation partition of the
training data source and saves the best one in `<output_dir>/best/`. At the end of training its weights are loaded
back into the trained model, so that the final save is the best step, as transformers' `load_best_model_at_end`
does. MIA members on validation are the validation forget set's sentence-completion rows as whole documents (the
documents the target memorised); non-members come from `validation_mia_nonmembers`.
"""

import json
import logging
import os

from ..errors import GNMInputError

logger = logging.getLogger(__name__)

NONMEMBER_FILE = "nonmember.jsonl"
VALIDATION_OPTIONS = ("validation_partition", "validation_mia_nonmembers", "validation_objective",
                      "validation_max_new_tokens", "validation_batch_size")


def check_validation_options(script_args) -> None:
    """One-line errors for validation options that cannot work, before anything loads."""
    steps = script_args.eval_on_validation_steps
    if steps is not None and steps < 1:
        raise GNMInputError(
            f"eval_on_validation_steps: expected a number of optimizer steps of at least 1, got {steps}"
        )
    if steps is None:
        refuse_unused_options(script_args, VALIDATION_OPTIONS, "nothing is evaluated on validation without "
                              "eval_on_validation_steps")


def refuse_unused_options(script_args, names, why: str) -> None:
    """A one-line error naming every option of `names` set away from its default: `why` they do nothing."""
    defaults = type(script_args).__dataclass_fields__
    unused = [name for name in names if getattr(script_args, name) != defaults[name].default]
    if unused:
        raise GNMInputError(f"{', '.join(unused)}: set, but {why}; add it or remove them")


def member_documents(forget_rows) -> list[str]:
    """The validation forget set's sentence-completion rows (`...sc1`) as whole documents: prompt + " " + completion."""
    from ..data.loading import classify_kind

    return [f"{row['prompt']} {row['completion']}" for row in forget_rows if classify_kind(row["id"]) == "sc"]


def load_documents_option(path: str, option: str = "validation_mia_nonmembers",
                          file_name: str = NONMEMBER_FILE) -> list[str]:
    """The documents that `option` names: a jsonl/parquet file with a `document` field per row, or a folder holding
    `file_name` or `mia/<file_name>`."""
    from ..evaluation.evaluator import _documents, _mia_file

    if os.path.isdir(path):
        try:
            path = _mia_file(path, file_name)
        except GNMInputError as error:
            raise GNMInputError(f"{option}: {error}") from None
    elif not os.path.isfile(path):
        raise GNMInputError(f"{option}: {path}: file or folder not found")
    return _documents(path)


def mia_documents(forget_rows, nonmembers_path: str | None) -> tuple[list[str] | None, list[str] | None]:
    """`(members, nonmembers)` for the validation objective; `(None, None)` (with one warning line) without
    non-members or without sentence-completion rows to serve as members."""
    if nonmembers_path is None:
        logger.warning("validation_mia_nonmembers not set: the validation objective has no MIA part.")
        return None, None
    nonmembers = load_documents_option(nonmembers_path)
    members = member_documents(forget_rows)
    if not members:
        logger.warning("The validation forget set has no sentence-completion (sc1) rows to serve as MIA members: "
                       "the validation objective has no MIA part.")
        return None, None
    return members, nonmembers


def load_validation_rows(source, partition: str, training_forget):
    """`(forget, retain)` of the validation partition; a GNMInputError when the source has none (it would read the
    training rows again, as a folder with harness names `forget.jsonl` / `retain.jsonl` does)."""
    from ..data.loading import load_unlearning_data
    from ..manifest import rows_fingerprint

    try:
        forget = load_unlearning_data(source, "forget", partition)
        retain = load_unlearning_data(source, "retain", partition)
    except GNMInputError as error:
        raise GNMInputError(f"validation_partition {partition!r}: {error}") from error
    if rows_fingerprint(forget) == rows_fingerprint(training_forget):
        raise GNMInputError(
            f"validation_partition {partition!r}: {source} has no separate {partition} partition (its forget rows "
            f"are the training ones); give a source with forget_{partition} / retain_{partition} files or splits, "
            "and a data_partition other than the validation one"
        )
    return forget, retain


def result_keys(forget, retain, with_mia: bool) -> list[str]:
    """The score keys an evaluation of these rows reports (which exist depends on the rows' splits, tasks and kinds
    and on MIA, not on the scores): what `validation_objective` may name (`settings/*` are not scores)."""
    from ..data.loading import classify_kind
    from ..evaluation.semeval import flatten_results, semeval_results

    rows = [{"split": split, "task": row["task"], "kind": classify_kind(row["id"]), "score": 0.5}
            for split, split_rows in (("forget", forget), ("retain", retain)) for row in split_rows]
    nll = [1.0] if with_mia else None
    return sorted(flatten_results(semeval_results(rows, nll, nll)))


def check_objective(objective: str, keys: list[str]) -> None:
    """A one-line error, before training, for an objective that no evaluation would report."""
    if objective not in keys:
        raise GNMInputError(f"validation_objective {objective!r}: not among the validation results' keys {keys}")


def validation_callback(script_args, source, training_forget):
    """A `SemEvalCallback` on the validation partition, or None when `eval_on_validation_steps` is unset."""
    from ..evaluation.callback import SemEvalCallback

    if script_args.eval_on_validation_steps is None:
        return None
    forget, retain = load_validation_rows(source, script_args.validation_partition, training_forget)
    members, nonmembers = mia_documents(forget, script_args.validation_mia_nonmembers)
    check_objective(script_args.validation_objective, result_keys(forget, retain, members is not None))
    return SemEvalCallback(
        forget, retain, mia_members=members, mia_nonmembers=nonmembers,
        eval_steps=script_args.eval_on_validation_steps, objective=script_args.validation_objective,
        max_new_tokens=script_args.validation_max_new_tokens, batch_size=script_args.validation_batch_size,
    )


def resume_best(callback, output_dir: str) -> None:
    """On resume, the best evaluation so far is the one in `<output_dir>/best/`, not the first one after resuming."""
    from ..evaluation.callback import BEST_DIR, BEST_FILE

    path = os.path.join(output_dir, BEST_DIR, BEST_FILE)
    if callback is None or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        best = json.load(handle)
    if best.get("objective") == callback.objective:
        callback.best_value, callback.best_step = best["value"], best["step"]


def keep_best_step(trainer, callback, record_as: str = "best_on_validation", what: str = "on validation"
                   ) -> dict | None:
    """Load the best evaluation's weights (`<output_dir>/best/`) into the trained model on every process, record the
    kept step on the trainer (`trainer.<record_as>`, which the manifest writes) and log it; returns it."""
    from ..evaluation.callback import BEST_DIR
    from ..modeling import load_checkpoint_weights

    if callback is None or callback.best_step is None:
        return None
    trainer.accelerator.wait_for_everyone()  # the main process has written best/
    load_checkpoint_weights(trainer.accelerator.unwrap_model(trainer.model),
                            os.path.join(trainer.args.output_dir, BEST_DIR))
    kept = {"step": callback.best_step, "objective": callback.objective, "value": callback.best_value,
            "last_step": trainer.state.global_step}
    setattr(trainer, record_as, kept)
    logger.warning("Keeping step %d of %d, best %s (%s = %.4g); it is the model saved.",
                   kept["step"], kept["last_step"], what, kept["objective"], kept["value"])
    return kept
