"""`GNMConfig`: the training arguments of `GNMTrainer`."""

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .distributed import has_accelerator
from .errors import GNMInputError
from .losses import LOSS_TERMS, TERMS_NEEDING_REFERENCE

# The paper's reported recipe (authors' code): terms ga, klr, gnm; their other defaults for the remaining terms.
PAPER_LOSS_TERMS = ["ga", "klr", "gnm"]
DEFAULT_WEIGHTS = {
    "ga": 0.5, "gd": 5.0, "klr": 5.0, "klf": 1.0, "rm": 1.0, "gnm": 0.04, "npo": 1.0, "simnpo": 1.0, "klb": 1.0
}
NEGATIVE_SCHEDULES = ("gradual", "random", "all")
REFERENCE_MODES = ("auto", "adapter_disabled", "copy", "none")
FORWARD_PASSES = ("auto", "one", "per_group")
# The default joins prompt and completion with one space, as the LUME data needs; the paper's template is below.
DEFAULT_TEXT_TEMPLATE = "{prompt} {completion}"
PAPER_TEXT_TEMPLATE = "{prompt} >> {completion} is the answer."


def require_number(
    config, name: str, minimum: float | None = None, above: float | None = None, integer: bool = False
) -> None:
    """A GNMInputError naming `name` unless its value is a finite number (an integer with `integer`) >= `minimum`
    (or > `above`). A recipe's values reach here unconverted, so a list or a string is possible."""
    value = getattr(config, name, None)
    if value is None:  # an optional setting left unset (e.g. max_grad_norm)
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an integer" if integer else "a number"
        raise GNMInputError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if minimum is not None and (not math.isfinite(value) or value < minimum):
        raise GNMInputError(f"{name}: expected a finite number >= {minimum}, got {value}")
    if above is not None and (not math.isfinite(value) or value <= above):
        raise GNMInputError(f"{name}: expected a finite number > {above}, got {value}")


@dataclass
class GNMConfig(TrainingArguments):
    r"""
    Configuration for [`GNMTrainer`]: `transformers.TrainingArguments` plus the unlearning parameters below.

    Parameters that control the loss:

        loss_terms (`list[str]`, defaults to `["ga", "klr", "gnm"]`):
            Terms of the loss, among `ga` (gradient ascent on forget), `gd` (gradient descent on retain), `klr` (KL to
            the reference on retain), `klf` (capped KL ascent on forget), `rm` (random matching: forget prompts with
            retain completions), `gnm` (gradual negative matching), `npo` (negative preference optimisation), `simnpo`
            (SimNPO: NPO on the forget completion's mean NLL, without a reference model) and `klb` (KL descent on forget
            towards `base_model`, the model before it read the forget set: forgotten text ends where unseen text is).
        ga_weight, gd_weight, klr_weight, klf_weight, rm_weight, gnm_weight, npo_weight, simnpo_weight, klb_weight
        (`float` or `None`):
            Weight of each term. `None` takes the paper's value (ga 0.5, gd 5, klr 5, klf 1, rm 1, gnm 0.04, npo 1;
            simnpo 1, klb 1). Setting a weight for a term that is not in `loss_terms` is an error.
        base_model (`str` or `None`, defaults to `None`):
            For `klb`: the model (Hub id or folder, same tokenizer) the trained model was fine-tuned from before it read
            the forget set, e.g. the pretrained checkpoint an organiser fine-tuned. Frozen, prepared like a reference
            copy (replicated, or sharded under ZeRO-3 and FSDP2).
        npo_beta (`float`, defaults to `0.1`):
            β of NPO.
        simnpo_beta (`float`, defaults to `4.5`), simnpo_delta (`float`, defaults to `0.0`):
            SimNPO's loss per forget sequence is −(2/β)·log σ(β·(NLL_mean − δ)), NLL_mean the completion's mean token
            NLL. δ is a margin in nats on the mean NLL: the `gamma` of the authors' code (OPTML-Group/Unlearn-Simple,
            which subtracts it from the mean NLL before multiplying by β) and open-unlearning's `delta`, so a γ
            published with their configs is `simnpo_delta` as is (MUSE: β 0.7, γ 0 to 3; TOFU: γ 0). The paper prints
            the margin outside β, −(2/β)·log σ(β·NLL_mean − γ): its γ is β·δ. The defaults are open-unlearning's SimNPO
            config (β 4.5, δ 0).
        klf_cap (`float` or `None`, defaults to `5.0`):
            The `klf` term is −min(KL, cap) per sequence: the KL ascent stops pushing once a sequence is this far from
            the reference. `None` removes the cap (unbounded; not recommended).
        negative_schedule (`str`, defaults to `"gradual"`):
            Which level of gradual negatives the `gnm` term trains on: `gradual` (level grows with training progress,
            from 1 to K), `random` (a random level per example) or `all` (every level, averaged).
        reference_model (`str`, defaults to `"auto"`):
            How p_ref is obtained for `klr`, `klf` and `npo`: `adapter_disabled` (the PEFT model with its adapter
            disabled: no second copy of the weights), `copy` (a frozen copy of the initial model), `none`, or `auto`
            (adapter-disabled with a `peft_config`; for a `PeftModel` handed in, a frozen copy of its trained adapter
            as a second adapter, `reference`; a copy otherwise; none when no term needs it).

    Parameters that control the data:

        max_length (`int`, defaults to `512`):
            Maximum tokens of prompt + completion. Completions are cut on the right to fit.
        max_prompt_length (`int` or `None`, defaults to `None`):
            Prompts longer than this are cut on the left. With `None`, a prompt that leaves no room for its completion
            is an error that lists the rows.
        text_template (`str`, defaults to `"{prompt} {completion}"`):
            How prompt and completion are joined. The paper's `"{prompt} >> {completion} is the answer."` reproduces
            the authors' training text. Text before `{completion}` (and the whitespace just before it) belongs to the
            prompt side and is never trained on.
        add_eos_token (`bool`, defaults to `True`):
            Append the tokenizer's end-of-sequence token to every completion.
        forget_completion_only_loss (`bool`, defaults to `True`):
            The terms on the forget set (`ga`, `klf`, `npo`, `simnpo`) score its completion tokens only, as TRL's
            `completion_only_loss`. `False` scores every token after the first, prompt included: the whole forget
            document is unlearned, which is what a membership attack on whole documents measures. The terms that
            pair forget prompts with other completions (`rm`, `gnm`) and the retain terms always score completions.
        forward_passes (`str`, defaults to `"auto"`):
            Padded training only (packed rows always take one pass): how the groups of sequences (forget, retain, random match, negatives) go through the model: `one` (all in
            one forward pass, padded to the longest), `per_group` (one pass per group, each padded to its own longest)
            or `auto` (one pass unless padding to the common length adds more than 25% tokens; then per group).
            In a multi-process run `auto` decides on the token counts summed over all processes (one small
            all-reduce per forward), so every process makes the same forward passes: DDP's and ZeRO-3's collectives
            stay aligned. Measured in `benchmarks/forward_modes.py`: on CPU the cost follows the padded token count.
        padding_free (`bool` or `None`, defaults to `None`):
            Train on packed rows: the sequences of a step (and of its reference pass) concatenated without padding,
            `position_ids` restarting at 0 for each, from which transformers builds a block-diagonal causal mask
            (sdpa, eager, flex attention); under FlashAttention all of them in one row with their bounds as
            `cu_seq_lens_*` (its variable-length kernel reads packed sequences only in a batch of one row). Every loss term has the same
            value as padded. `None` packs when the model supports it (a decoder-only model whose attention builds its
            mask from `position_ids`, with one of those attention implementations) and otherwise pads, said once in
            the log; `True` requires packing (an error when unsupported); `False` pads, as `forward_passes` says.
            Decided from the model alone, so every process decides the same.
        max_packed_length (`int` or `None`, defaults to `None`):
            The most tokens in one packed row, or the longest sequence of the step when it is longer (rows are padded
            to a common length). Not used under FlashAttention, which packs everything into one row. `None`: 512. On CPU, rows longer than the longest sequence cost more in attention
            than the few filler tokens they save (docs/performance.md, "Packed rows").
        dataset_num_proc (`int` or `None`):
            Processes used to tokenise the datasets.
        forget_chunks (`int`, defaults to `1`), epochs_per_chunk (`int`, defaults to `1`):
            Chunked sequential unlearning (AILS-NTUA, arXiv 2503.02443): the forget set is split (seeded) into
            `forget_chunks` disjoint chunks, unlearned one after another, each for `epochs_per_chunk` passes with its
            rows shuffled at every pass; each forget row is paired with one retain row, and the retain rows keep
            cycling through the retain set from pass to pass and chunk to chunk. One Trainer epoch is the whole
            schedule (`forget rows × epochs_per_chunk` examples); `num_train_epochs` or `max_steps` repeat it. 1 and 1:
            the Trainer's own sampling.

    Parameters that guard the run:

        collapse_guard (`bool`, defaults to `True`):
            Watch the retain NLL and every loss term at each step; when the retain NLL exceeds
            `collapse_retain_nll_ratio` × its starting value (and grows by more than `collapse_min_retain_nll_increase`
            nats), or a value is NaN/inf, stop training and (with `collapse_guard_action="rollback"`) reload the last
            checkpoint saved before the collapse. Said in the log, the log history and the run's manifest.
        collapse_guard_action (`str`, defaults to `"rollback"`): `rollback` or `stop`.
        collapse_retain_nll_ratio (`float`, defaults to `3.0`), collapse_min_retain_nll_increase (`float`, defaults
        to `2.0`), collapse_warmup (`int`, defaults to `1`: optimizer steps averaged into the starting value),
        collapse_window (`int`, defaults to `5`: the retain NLL compared is the mean of the last 5 optimizer steps, so
        that one hard batch is not taken for a collapse; NaN/inf stops at the end of its step). Both count optimizer
        steps, each the mean of its micro-batches, whatever `gradient_accumulation_steps`.

    Parameters that control the model:

        disable_dropout (`bool`, defaults to `True`):
            Zero every dropout of the trained model (its config's rates, e.g. GPT-2's 0.1, and PEFT's `lora_dropout`),
            TRL's convention for trainers with a reference model: with dropout on, the KL to the reference is noise
            from the first step and packed and padded rows drop different units. The reference and base-model passes
            never run with dropout, whatever this says. `False` trains with the model's dropout.
        model_init_kwargs (`dict` or `None`):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` when `model` is given as a string.
        merge_adapters (`bool`, defaults to `False`):
            When training with PEFT, the final `save_model` writes merged full weights instead of the adapter.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # ---- loss ----
    loss_terms: list[str] = field(
        default_factory=lambda: list(PAPER_LOSS_TERMS),
        metadata={"help": f"Loss terms, among {', '.join(LOSS_TERMS)}. The paper's recipe is ga, klr, gnm."},
    )
    ga_weight: float | None = field(default=None, metadata={"help": "Weight of `ga`; None: the paper's 0.5."})
    gd_weight: float | None = field(default=None, metadata={"help": "Weight of `gd`; None: the paper's 5."})
    klr_weight: float | None = field(default=None, metadata={"help": "Weight of `klr`; None: the paper's 5."})
    klf_weight: float | None = field(default=None, metadata={"help": "Weight of `klf`; None: the paper's 1."})
    rm_weight: float | None = field(default=None, metadata={"help": "Weight of `rm`; None: the paper's 1."})
    gnm_weight: float | None = field(default=None, metadata={"help": "Weight of `gnm`; None: the paper's 0.04."})
    npo_weight: float | None = field(default=None, metadata={"help": "Weight of `npo`; None: the paper's 1."})
    simnpo_weight: float | None = field(default=None, metadata={"help": "Weight of `simnpo`; None: 1."})
    klb_weight: float | None = field(default=None, metadata={"help": "Weight of `klb`; None: 1."})
    npo_beta: float = field(default=0.1, metadata={"help": "β of NPO."})
    simnpo_beta: float = field(default=4.5, metadata={"help": "β of SimNPO (open-unlearning's 4.5)."})
    simnpo_delta: float = field(
        default=0.0,
        metadata={
            "help": "SimNPO's margin δ in nats on the mean forget NLL: the gamma of the authors' code (Unlearn-Simple) "
            "and open-unlearning's delta, so their published gamma goes here as is; the paper's printed γ is β·δ."
        },
    )
    klf_cap: float | None = field(
        default=5.0, metadata={"help": "Cap of the forget KL per sequence (nats); None for no cap."}
    )
    negative_schedule: str = field(
        default="gradual",
        metadata={"help": "Level of gradual negatives used by `gnm`.", "choices": list(NEGATIVE_SCHEDULES)},
    )
    reference_model: str = field(
        default="auto",
        metadata={"help": "How the reference model is obtained.", "choices": list(REFERENCE_MODES)},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "For `klb`: the model (Hub id or folder) before it read the forget set, same tokenizer."},
    )
    # ---- data ----
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + completion."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Cut prompts to this many tokens (from the left); None: error if too long."}
    )
    text_template: str = field(
        default=DEFAULT_TEXT_TEMPLATE,
        metadata={"help": "How prompt and completion are joined; must contain {prompt} then {completion}."},
    )
    add_eos_token: bool = field(default=True, metadata={"help": "Append EOS to every completion."})
    forget_completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Forget terms on completions only; False: on the whole forget text."},
    )
    forward_passes: str = field(
        default="auto",
        metadata={
            "help": "Group sequences into one forward pass or one per group; `auto` decides on the padded token "
            "counts summed over all processes, so that every process makes the same passes.",
            "choices": list(FORWARD_PASSES),
        },
    )
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Pack the sequences of a step into rows without padding; None: when the model supports it "
            "(otherwise pad, said once in the log), True: always (error if unsupported), False: pad."
        },
    )
    max_packed_length: int | None = field(
        default=None, metadata={"help": "Most tokens in one packed row (at least the longest sequence); None: 512, measured."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used for tokenisation."})
    forget_chunks: int = field(
        default=1,
        metadata={"help": "Split the forget set into this many disjoint chunks, unlearned one after another; 1: off."},
    )
    epochs_per_chunk: int = field(default=1, metadata={"help": "Passes over each forget chunk before the next one."})
    # ---- guard ----
    collapse_guard: bool = field(
        default=True, metadata={"help": "Stop (and roll back) when the retain NLL explodes or a loss is not finite."}
    )
    collapse_guard_action: str = field(
        default="rollback",
        metadata={"help": "What the collapse guard does.", "choices": ["rollback", "stop"]},
    )
    collapse_retain_nll_ratio: float = field(
        default=3.0, metadata={"help": "Collapse when the retain NLL exceeds this multiple of its starting value..."}
    )
    collapse_min_retain_nll_increase: float = field(
        default=2.0, metadata={"help": "...and has grown by more than this many nats."}
    )
    collapse_warmup: int = field(
        default=1, metadata={"help": "Optimizer steps averaged into the starting retain NLL (not micro-batches)."}
    )
    collapse_window: int = field(
        default=5,
        metadata={
            "help": "Optimizer steps averaged into the retain NLL compared with the threshold (not micro-batches)."
        },
    )
    # ---- model ----
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Zero every dropout of the trained model (config rates and lora_dropout), as TRL's "
                  "reference-based trainers do; reference and base-model passes never use dropout."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained."}
    )
    merge_adapters: bool = field(
        default=False, metadata={"help": "Final save writes merged full weights instead of the PEFT adapter."}
    )
    # ---- TrainingArguments defaults changed for unlearning ----
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (the paper's 1e-4)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the tokenised columns."}
    )
    # None, not a default_factory: transformers' argument parser gives a bool field without a plain default the
    # default False, so `gnm unlearn` would never pin memory on a GPU.
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin memory in data loaders; None: when there is a GPU (pinning without one only warns)."},
    )

    def __post_init__(self):
        if isinstance(self.loss_terms, str):
            self.loss_terms = [term.strip() for term in self.loss_terms.split(",") if term.strip()]
        if not isinstance(self.loss_terms, (list, tuple)) or not all(isinstance(t, str) for t in self.loss_terms):
            raise GNMInputError(
                f"loss_terms: expected a list of term names (some of {list(LOSS_TERMS)}), got {self.loss_terms!r}"
            )
        self.loss_terms = list(dict.fromkeys(self.loss_terms))
        unknown = [term for term in self.loss_terms if term not in LOSS_TERMS]
        if unknown:
            raise GNMInputError(f"loss_terms: unknown term(s) {unknown}; expected some of {list(LOSS_TERMS)}")
        if not self.loss_terms:
            raise GNMInputError(f"loss_terms: empty; expected some of {list(LOSS_TERMS)}")
        for term in LOSS_TERMS:
            name = f"{term}_weight"
            value = getattr(self, name)
            if term in self.loss_terms:
                if value is None:
                    setattr(self, name, DEFAULT_WEIGHTS[term])
            elif value is not None:
                raise GNMInputError(
                    f"{name}: set to {value} but '{term}' is not in loss_terms {self.loss_terms}; add the term or "
                    "remove the weight"
                )
        if self.negative_schedule not in NEGATIVE_SCHEDULES:
            raise GNMInputError(f"negative_schedule: {self.negative_schedule!r}; expected one of {NEGATIVE_SCHEDULES}")
        if self.padding_free not in (None, True, False):
            raise GNMInputError(f"padding_free: {self.padding_free!r}; expected true, false or unset (auto)")
        if self.forward_passes not in FORWARD_PASSES:
            raise GNMInputError(f"forward_passes: {self.forward_passes!r}; expected one of {FORWARD_PASSES}")
        if self.reference_model not in REFERENCE_MODES:
            raise GNMInputError(f"reference_model: {self.reference_model!r}; expected one of {REFERENCE_MODES}")
        if "klb" in self.loss_terms and not self.base_model:
            raise GNMInputError("base_model: the term 'klb' needs the model before it read the forget set (a Hub id "
                                "or a folder)")
        needs_reference = sorted(TERMS_NEEDING_REFERENCE.intersection(self.loss_terms))
        if self.reference_model == "none" and needs_reference:
            raise GNMInputError(f"reference_model: 'none' but the terms {needs_reference} need a reference model")
        self._check_numbers()
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise GNMInputError(
                f"max_prompt_length: must be between 1 and max_length - 1 ({self.max_length - 1}), "
                f"got {self.max_prompt_length}"
            )
        if not isinstance(self.text_template, str):
            raise GNMInputError(f"text_template: expected a string, got {self.text_template!r}")
        prompt_at, completion_at = self.text_template.find("{prompt}"), self.text_template.find("{completion}")
        if prompt_at < 0 or completion_at < 0 or completion_at < prompt_at:
            raise GNMInputError(
                f"text_template: {self.text_template!r} must contain '{{prompt}}' followed by '{{completion}}'"
            )
        if self.chunked_schedule and self.train_sampling_strategy != "random":
            raise GNMInputError(
                f"train_sampling_strategy: {self.train_sampling_strategy!r} cannot order a chunked schedule "
                "(forget_chunks/epochs_per_chunk above 1); leave it 'random'"
            )
        if self.remove_unused_columns:
            raise GNMInputError("remove_unused_columns: must be False for GNMTrainer (the collator needs its columns)")
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = has_accelerator()
        from .distributed import apply_cpu_launch_defaults

        apply_cpu_launch_defaults(self)  # a multi-process launch without GPUs needs use_cpu (DDP) or gloo (DeepSpeed)
        super().__post_init__()

    def _check_numbers(self) -> None:
        """Every number in range and finite (a NaN passes `x <= 0` checks and trains garbage)."""
        for name in [f"{term}_weight" for term in self.loss_terms] + ["weight_decay", "max_grad_norm", "warmup_ratio"]:
            require_number(self, name, minimum=0)
        for name in ("learning_rate", "npo_beta", "simnpo_beta", "collapse_retain_nll_ratio"):
            require_number(self, name, above=0)
        require_number(self, "simnpo_delta", minimum=0)
        require_number(self, "collapse_min_retain_nll_increase", minimum=0)
        if self.klf_cap is not None:
            require_number(self, "klf_cap", above=0)
        for name in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "collapse_warmup", "collapse_window",
            "forget_chunks", "epochs_per_chunk",
        ):  # fmt: skip
            require_number(self, name, minimum=1, integer=True)
        require_number(self, "max_length", minimum=2, integer=True)
        require_number(self, "max_prompt_length", minimum=1, integer=True)
        require_number(self, "max_packed_length", minimum=2, integer=True)
        require_number(self, "max_steps", integer=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise GNMInputError(
                f"max_steps: {self.max_steps} would train nothing; expected a number of steps >= 1 "
                "(or -1 to train for num_train_epochs)"
            )
        if self.max_steps == -1:
            require_number(self, "num_train_epochs", above=0)

    @property
    def chunked_schedule(self) -> bool:
        """Whether the forget set is unlearned chunk by chunk (`forget_chunks` or `epochs_per_chunk` above 1)."""
        return self.forget_chunks > 1 or self.epochs_per_chunk > 1

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of every enabled term."""
        return {term: getattr(self, f"{term}_weight") for term in self.loss_terms}
