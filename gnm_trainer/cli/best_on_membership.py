"""`gnm unlearn --keep_best_membership_steps N`: keep the step at which the forget documents look unseen.

From `membership_start_step` on, every N optimizer steps and at the end, `MembershipCallback` scores a loss attack
on the forget documents (the training forget set's sentence-completion rows as whole documents, or
`membership_members`) against `membership_reference`, documents of their kind that the model never read, and the
step with the best MIA score is the model saved (`<output_dir>/best/` holds it; the manifest names it under
`best_on_membership`). The reference must not be the documents that the evaluation will use as non-members.
"""

from ..errors import GNMInputError
from .best_on_validation import keep_best_step, load_documents_option, member_documents, refuse_unused_options

MEMBERSHIP_OPTIONS = ("membership_reference", "membership_members", "membership_start_step")


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


def membership_callback(script_args, training_forget):
    """A `MembershipCallback` on the forget documents, or None when `keep_best_membership_steps` is unset."""
    from ..evaluation.membership import MembershipCallback

    if script_args.keep_best_membership_steps is None:
        return None
    reference = load_documents_option(script_args.membership_reference, "membership_reference")
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
