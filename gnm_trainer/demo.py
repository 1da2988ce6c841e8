"""The main job on the embedded default: target → gradual negatives → GNM unlearning → evaluation before and after.

Everything runs offline on CPU: the target is the tiny Llama that `make_target` trains (and caches): it first reads
300 other synthetic documents (its base model, kept in `<target>/pretrained`), then memorises the synthetic
LUME-format dataset; the negatives come from the model-free backend by default (the tiny target is too small to
write sensible LLM negatives; `negatives_backend="llm"` prompts it anyway, with fallbacks recorded); unlearning uses the
recommended recipe (`gnm_trainer.recipes.recommended_recipe`: SimNPO with its margin at the mean NLL the target gives
synthetic reference documents it never read, which no reported figure uses, `klb` towards the base model, `gd` 5 and
`gnm` 0.2; `recipe="paper"` takes the paper's `ga` 0.5, `klr` 5, `gnm` 0.04; without pretraining documents there is no
base model and the recommended recipe goes without `klb`) with LoRA on all linear layers; the recommended recipe trains
to 4/3 of `max_steps` and keeps the step, from 2/3 of it on, at which the forget documents look most like synthetic
documents the target never read. Last, the attacks of `evaluation.attacks` (8-/4-bit quantisation, relearning on half
the forget documents) measure how much of what was removed comes back, against the target's scores from step 2.
"""

import json
import os
import time
from dataclasses import asdict, dataclass

from .io_utils import atomic_write_json, check_output_folder


@dataclass
class DemoSettings:
    """What the demo runs; the defaults are the ones measured in the README."""

    output_dir: str = "gnm-demo"
    target_dir: str | None = None  # None: the shared cache (see gnm_trainer.target.default_target_dir)
    seed: int = 0
    # A name of gnm_trainer.recipes.RECIPES: the recommended one (the quality benchmark's winner, docs/results.md),
    # with `klb` towards the target's base model (see pretraining_documents).
    recipe: str = "recommended"
    negatives_backend: str = "perturb"
    negative_levels: int = 4
    max_steps: int = 90
    per_device_train_batch_size: int = 8
    learning_rate: float = 2e-3
    lora_r: int = 8
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    attacks: bool = True  # quant8, quant4 (when bitsandbytes is installed) and relearn on the unlearned model
    # The attacks score the forget set only, with shorter generations: 256 tokens on bitsandbytes' CPU kernels (8-bit
    # is ~4x slower than float32 here) and the retain set too would take minutes (see the README for the time).
    attack_max_new_tokens: int = 32
    quick: bool = False  # a much smaller target (4 documents per split), for the test suite
    # Synthetic documents the target reads before it memorises the dataset (0: trained from scratch); with them the
    # target has a base model, `<target>/pretrained`, and the recommended recipe its `klb` term.
    pretraining_documents: int = 300
    # Synthetic documents the target never read, drawn apart from the evaluation's (`make_reference_documents`): the
    # recommended recipe sets SimNPO's margin from their mean NLL and, with its step rule, trains to 4/3 of
    # `max_steps` and keeps, from 2/3 of it on, the step at which the forget documents look most like them
    # (`gnm_trainer.recipes.membership_schedule`, `MembershipCallback`). No reported figure uses them.
    reference_documents: int = 24
    fixed_steps: bool = False  # the recommended recipe without its step rule: `max_steps`, the last step kept

    def __post_init__(self):
        """Refuse settings that would fail (or train nothing) only after minutes of work."""
        import math

        from .errors import GNMInputError
        from .negatives.schema import require_levels

        from .recipes import RECIPES

        require_levels(self.negative_levels)
        if self.recipe not in RECIPES:
            raise GNMInputError(f"recipe: {self.recipe!r}; expected one of {sorted(RECIPES)}")
        for name in ("max_steps", "per_device_train_batch_size", "lora_r", "max_new_tokens", "eval_batch_size",
                     "attack_max_new_tokens"):
            if getattr(self, name) < 1:
                raise GNMInputError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("pretraining_documents", "reference_documents"):
            if getattr(self, name) < 0:
                raise GNMInputError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.recipe == "recommended" and self.reference_documents < 1:
            raise GNMInputError("reference_documents: the recommended recipe sets SimNPO's margin from them; expected "
                                "an integer >= 1 (--fixed_steps turns its step rule off, --recipe paper needs none)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise GNMInputError(f"learning_rate: expected a finite number > 0, got {self.learning_rate}")

    def target_options(self) -> dict:
        if self.quick:
            return {
                "hidden_size": 128, "num_layers": 2, "num_heads": 2, "max_documents_per_split": 4,
                "epochs": 80, "learning_rate": 3e-3,
            }
        return {}


def _step(message: str) -> float:
    print(f"[gnm demo] {message}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"[gnm demo]   done in {time.perf_counter() - start:.1f} s", flush=True)


def run_demo(settings: DemoSettings | None = None) -> dict:
    """Run the whole pipeline; returns the before/after results and writes everything into `output_dir`."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.loading import load_unlearning_splits
    from .data.synthetic import make_reference_documents, synthetic_target_data
    from .evaluation import evaluate_model, load_mia_documents, write_report
    from .evaluation.attacks import RESULTS_KEY, run_attacks
    from .evaluation.report import markdown_report
    from .gnm_config import GNMConfig
    from .cli.best_on_membership import keep_best_membership_step
    from .gnm_trainer import GNMTrainer
    from .evaluation.membership import refuse_evaluation_documents
    from .recipes import RECIPES, describe, recommended_recipe, reference_nll
    from .target.config import PRETRAINED_SUBDIR
    from .negatives import build_negatives
    from .target import default_target_dir, make_target

    settings = settings or DemoSettings()
    output_dir = os.path.abspath(settings.output_dir)
    check_output_folder(output_dir, "output_dir")
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(settings.seed)
    wall_start = time.perf_counter()

    start = _step("1/6 target model: a tiny Llama that memorised the synthetic dataset (cached after the first run)")
    target_dir = settings.target_dir or default_target_dir()
    if settings.quick and settings.target_dir is None:
        target_dir = os.path.join(output_dir, "target")
    data = synthetic_target_data(settings.seed, settings.pretraining_documents)
    target_dir = make_target(data, output_dir=target_dir, seed=settings.seed, **settings.target_options())
    data_dir = os.path.join(target_dir, "data")
    forget, retain = load_unlearning_splits(data_dir)
    members, nonmembers = load_mia_documents(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    _done(start)

    evaluation = dict(
        mia_members=members,
        mia_nonmembers=nonmembers,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.eval_batch_size,
    )
    start = _step(f"2/6 evaluation before unlearning ({len(forget)} forget + {len(retain)} retain rows, MIA)")
    before, target_rows = evaluate_model(model, tokenizer, forget, retain, **evaluation)
    atomic_write_json(os.path.join(output_dir, "results_before.json"), before)
    _done(start)

    start = _step(f"3/6 gradual negatives ({settings.negatives_backend} backend, {settings.negative_levels} levels)")
    negatives_path = os.path.join(output_dir, "negatives.jsonl")
    llm = {"generator": model, "tokenizer": tokenizer} if settings.negatives_backend == "llm" else {}
    negatives = build_negatives(
        forget, settings.negatives_backend, settings.negative_levels, negatives_path, retain_rows=retain,
        seed=settings.seed, **llm,
    )
    _done(start)

    recipe, calibration = dict(RECIPES[settings.recipe]), None
    reference = make_reference_documents(settings.seed, settings.reference_documents)
    if settings.recipe == "recommended":  # SimNPO's margin from documents that no reported figure uses
        refuse_evaluation_documents(reference, nonmembers, "reference_documents")
        base_model = os.path.join(target_dir, PRETRAINED_SUBDIR)
        calibration = {"reference_documents": len(reference),
                       "reference_nll": reference_nll(model, tokenizer, reference, settings.eval_batch_size)}
        recipe = recommended_recipe(calibration["reference_nll"], base_model if os.path.isdir(base_model) else None)
        calibration["simnpo_delta"] = recipe["simnpo_delta"]
    membership, steps = membership_rule(settings, members, reference, tokenizer)
    start = _step(f"4/6 unlearning with GNM ({settings.recipe} recipe: {describe(recipe)}, LoRA on all linear layers"
                  + (f"; {steps} steps, keeping the step from {membership.start_step} on, every "
                     f"{membership.eval_steps}, at which the forget documents look most like "
                     f"{settings.reference_documents} documents the target never read)" if membership else ")"))
    args = GNMConfig(
        output_dir=os.path.join(output_dir, "model"),
        **recipe,
        max_steps=steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        disable_tqdm=False,
    )
    trainer = GNMTrainer(
        model,
        args,
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=negatives,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[membership] if membership else None,
    )
    trainer.train()
    keep_best_membership_step(trainer, membership)
    trainer.save_model()
    _done(start)

    start = _step("5/6 evaluation after unlearning")
    after, unlearned_rows = evaluate_model(trainer.model, tokenizer, forget, retain, **evaluation)
    _done(start)

    attack_seconds = None
    if settings.attacks:
        attacks = _available_attacks()
        start = _step(f"6/6 attacks on the unlearned model: {', '.join(attacks)} (recovery against the target)")
        same_scoring = settings.attack_max_new_tokens == settings.max_new_tokens  # else both are rescored alike
        after[RESULTS_KEY] = run_attacks(
            trainer.model, tokenizer, forget, None, attacks, target=target_rows if same_scoring else target_dir,
            unlearned_rows=unlearned_rows if same_scoring else None, seed=settings.seed,
            max_new_tokens=settings.attack_max_new_tokens, batch_size=settings.eval_batch_size,
        )
        attack_seconds = round(time.perf_counter() - start, 1)
        _done(start)
    atomic_write_json(os.path.join(output_dir, "results_after.json"), after)
    report_path, plot_path = write_report(output_dir, before, after, title="gnm demo: GNM unlearning on the embedded default")

    wall = time.perf_counter() - wall_start
    summary = {
        "settings": asdict(settings),
        "target_dir": target_dir,
        "wall_seconds": round(wall, 1),
        "attack_seconds": attack_seconds,
        "calibration": calibration,
        "before": before,
        "after": after,
        "report": report_path,
        "plot": plot_path,
    }
    atomic_write_json(os.path.join(output_dir, "demo_summary.json"), summary)
    print()
    print(markdown_report(before, after, title="gnm demo: before and after unlearning"))
    print(f"\nreport: {report_path}\nplot:   {plot_path}\nwall time: {wall:.0f} s")
    return summary


def membership_rule(settings: DemoSettings, members, reference, tokenizer):
    """`(callback, steps)`: the recommended recipe's `MembershipCallback` against the `reference` documents and the
    step where training stops, or `(None, max_steps)` without the rule."""
    from .evaluation.membership import MembershipCallback
    from .recipes import membership_schedule

    if settings.recipe != "recommended" or settings.fixed_steps:
        return None, settings.max_steps
    first, last, every = membership_schedule(settings.max_steps)
    membership = MembershipCallback(members, reference, eval_steps=every, start_step=first, tokenizer=tokenizer,
                                    batch_size=settings.eval_batch_size)
    return membership, last


def _available_attacks() -> tuple[str, ...]:
    """Every attack; without bitsandbytes (the optional `attacks` extra) relearning only, with a line saying so."""
    from .evaluation.attacks import ATTACKS, INSTALL_HINT, QUANTISATION_BITS

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print(f"[gnm demo]   bitsandbytes is not installed: quantisation attacks skipped ({INSTALL_HINT})", flush=True)
        return tuple(name for name in ATTACKS if name not in QUANTISATION_BITS)
    return ATTACKS


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_demo()["after"], indent=2))
