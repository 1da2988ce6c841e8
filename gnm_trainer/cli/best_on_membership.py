"""`gnm unlearn --keep_best_membership_steps N`: keep the step at which the forget documents look unseen.

From `membership_start_step` on, every N optimizer steps and at the end, `MembershipCallback` scores a loss attack
on the forget documents (the training forget set's sentence-completion rows as whole documents, or
`membership_members`) against `membership_reference`, documents of their kind that the model never read, and the
step with the best MIA score is the model saved (`<output_dir>/best/` holds it; the manifest names it under
`best_on_membership`). The reference must not be the documents that the evaluation will use as non-members: a folder
given as `membership_reference` is read for `reference.jsonl` (never its `nonmember.jsonl`), and reference documents
that are also the training data's MIA non-members (`<data_dir>/mia/nonmember.jsonl`, what `gnm evaluate --mia_data`
reports on) are refused, as are validation non-members that are.
"""

import os

from ..errors import GNMInputError
from .best_on_validation import (
    NONMEMBER_FILE, keep_best_step, load_documents_option, member_documents, refuse_unused_options,
)

MEMBERSHIP_OPTIONS = ("membership_reference", "membership_members", "membership_start_step")
REFERENCE_FILE = "reference.jsonl"
# Options whose documents choose a step (or a margin) and so must not be the documents a reported score uses.
CALIBRATION_DOCUMENTS = {"membership_reference": REFERENCE_FILE, "validation_mia_nonmembers": NONMEMBER_FILE}


def check_membership_options(script_args) -> None:
    """One-line errors, before anything loads, for membership options that cannot work."""
    steps = script_args.keep_best_membership_steps
    if steps is None:
        refuse_unused_options(script_args, MEMBERSHIP_OPTIONS, "no step is kept on membership without "
                              "keep_best_membership_steps")
        return
    if steps < 1:
        raise GNMInputError(f"keep_best_membership_steps: expected a number of optimizer steps of at least 1, got "
                            f"{steps}")
    if script_args.membership_start_step < 0:
        raise GNMInputError(f"membership_start_step: expected a step of at least 0, got "
                            f"{script_args.membership_start_step}")
    if script_args.membership_reference is None:
        raise GNMInputError("membership_reference: required with keep_best_membership_steps (documents of the forget "
                            "documents' kind that the model never read)")
    if script_args.eval_on_validation_steps is not None:
        raise GNMInputError("keep_best_membership_steps and eval_on_validation_steps: give only one (each keeps its "
                            "own best step in <output_dir>/best/)")


def refuse_reported_nonmembers(script_args) -> None:
    """One line, before anything loads, when `membership_reference` or `validation_mia_nonmembers` holds documents
    that are also the MIA non-members stored with the training data (`<data_dir>/mia/nonmember.jsonl` or
    `<data_dir>/nonmember.jsonl`), the ones an evaluation of the run reports on (compared by content)."""
    from ..evaluation.evaluator import _documents, _mia_file
    from ..evaluation.membership import refuse_evaluation_documents

    data_dir = script_args.data_dir
    if not data_dir or not os.path.isdir(data_dir):
        return
    try:
        reported_path = _mia_file(data_dir, NONMEMBER_FILE)
    except GNMInputError:  # no MIA documents stored with the data
        return
    reported = _documents(reported_path)
    for option, file_name in CALIBRATION_DOCUMENTS.items():
        path = getattr(script_args, option)
        if path is not None:
            refuse_evaluation_documents(load_documents_option(path, option, file_name), reported, option,
                                        f"the MIA non-members of the training data ({reported_path})")


def membership_callback(script_args, training_forget):
    """A `MembershipCallback` on the forget documents, or None when `keep_best_membership_steps` is unset."""
    from ..evaluation.membership import MembershipCallback

    if script_args.keep_best_membership_steps is None:
        return None
    reference = load_documents_option(script_args.membership_reference, "membership_reference", REFERENCE_FILE)
    if script_args.membership_members is not None:
        members = load_documents_option(script_args.membership_members, "membership_members", "member.jsonl")
    else:
        members = member_documents(training_forget)
        if not members:
            raise GNMInputError("keep_best_membership_steps: the forget set has no sentence-completion (sc1) rows to "
                                "serve as member documents; give them in membership_members")
    return MembershipCallback(members, reference, eval_steps=script_args.keep_best_membership_steps,
                              start_step=script_args.membership_start_step)


def keep_best_membership_step(trainer, callback) -> dict | None:
    """`keep_best_step` for a `MembershipCallback` (None: nothing to keep): its best step is loaded back and recorded
    as `trainer.best_on_membership`, which the manifest writes."""
    return keep_best_step(trainer, callback, record_as="best_on_membership",
                          what="on membership (MIA against the reference documents)")
