"""`GNMTrainer`: unlearning with Gradual Negative Matching on the Hugging Face `Trainer`.

The data flow of one step: the forget set is the train dataset; `GNMDataCollator` pairs each forget example with a
retain example, a random retain completion and its K gradual negatives; `compute_loss` picks the scheduled negative
level, runs every sequence that needs gradients through the model in one forward pass (packed into rows without
padding, `data/packing.py`, or padded) and, when a term needs it, the reference model once without gradients, both
projecting the LM head only where a loss reads a logit, then combines the terms of `losses.py`.
"""

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from . import losses
from .data.chunked import ChunkedForgetSampler, schedule_blocks, scheduled_examples
from .data.collator import GNMDataCollator, select_negatives, tokenize_examples, tokenize_negatives
from .data.loading import load_unlearning_data
from .data.packing import DEFAULT_MAX_PACKED_LENGTH, pack_groups, padded_loss_positions, split_per_group
from .dropout import disable_dropout, disable_dropout_and_say
from .errors import GNMInputError
from .gnm_config import GNMConfig
from .model_loading import from_pretrained
from .modeling import (
    adalora_checkpoint,
    is_adalora,
    is_peft_model,
    load_checkpoint_weights,
    save_merged,
    train_adapter,
)
from .packed_forward import logits_only_at, packs_into_one_row, resolve_padding_free
from .reference import (
    add_reference_adapter,
    frozen_copy,
    prepare_reference_model,
    reference_adapter_hidden,
    reference_for,
    resolve_reference_mode,
)

logger = logging.get_logger(__name__)

GROUP_KEYS = ("input_ids", "attention_mask", "completion_mask")


def training_length(args: GNMConfig, num_examples: int) -> int:
    """Optimizer steps that `Trainer.train` will run, known before it starts: its own count (batches per process of
    the sharded dataloader, `dataloader_drop_last` included, then micro-batches per optimizer step)."""
    if args.max_steps > 0:
        return args.max_steps
    round_batches = math.floor if args.dataloader_drop_last else math.ceil
    batches = round_batches(num_examples / args.train_batch_size)
    batches_per_process = round_batches(batches / max(1, args.world_size))  # accelerate's even batches
    steps_per_epoch = max(1, math.ceil(batches_per_process / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * steps_per_epoch)


def data_order_seed(args: GNMConfig) -> int:
    """The seed of the data's order and pairing (retain pairing, the chunked schedule): `data_seed`, else `seed`, as
    the Trainer's own sampler does."""
    return args.data_seed if args.data_seed is not None else args.seed


# `auto` runs one forward pass unless padding every group to the common length adds more than this share of tokens.
MAX_PADDING_OVERHEAD = 0.25


def one_forward_pass(mode: str, shapes: list[tuple[int, int]], sum_over_processes=None) -> bool:
    """Whether groups of (rows, length) go through the model together (padded to the longest) or one by one.

    `auto` compares padded token counts. In a multi-process run, `sum_over_processes` (a function that sums a list of
    numbers over all processes) makes it compare the counts of all processes together, so that every process decides
    the same: the number of forward passes must be the same everywhere, or DDP's and ZeRO-3's collectives misalign
    and the run hangs. It is called whenever the decision depends on the data, on every process alike.
    """
    if len(shapes) == 1 or mode == "one":
        return True
    if mode == "per_group":
        return False
    padded_apart = sum(rows * length for rows, length in shapes)
    padded_together = sum(rows for rows, _ in shapes) * max(length for _, length in shapes)
    if sum_over_processes is not None:
        padded_apart, padded_together = sum_over_processes([padded_apart, padded_together])
    return padded_together <= (1 + MAX_PADDING_OVERHEAD) * padded_apart


def pad_to_length(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


class _RetainPairingEpochCallback(TrainerCallback):
    """Tells the collator which epoch it is, so retain pairing changes every epoch and survives a resume."""

    def __init__(self, collator: GNMDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class AdaLoraAllocationCallback(TrainerCallback):
    """Calls AdaLoRA's rank allocation after every optimizer step, while the gradients it scores are still there."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class GNMTrainer(Trainer):
    """Unlearn a causal LM with any mix of the loss terms (`ga`, `gd`, `klr`, `klf`, `rm`, `gnm`, `npo`, `simnpo`).

    Args:
        model: a `PreTrainedModel` or a Hub id / local path (loaded with `args.model_init_kwargs`).
        args: a `GNMConfig`.
        train_dataset: the forget set, in any form `load_unlearning_data` accepts (rows with `id` and
            `prompt`/`completion` or LUME's `input`/`output`; TRL conversational rows too).
        retain_dataset: the retain set, same forms; needed by `gd`, `klr` and `rm`.
        negative_dataset: gradual negatives (rows `id` of their forget row, `level` 1..K, `completion`), a path to a
            negatives file or a `datasets.Dataset`; needed by `gnm`.
        eval_dataset: optional forget-style rows on which `evaluate()` reports the same loss terms.
        processing_class: the tokenizer (loaded from the model's path when omitted).
        peft_config: a PEFT config (LoRA, AdaLoRA, ...); the model is wrapped with it. AdaLoRA's `total_step` is set
            to the real training length.
    """

    _tag_names = ["gnm", "unlearning"]
    # In training, compute_loss divides by the forget examples of the whole optimizer step (`get_batch_samples`):
    # the Trainer must not divide it again by the number of micro-batches.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: GNMConfig | None = None,
        train_dataset=None,
        retain_dataset=None,
        negative_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator: GNMDataCollator | None = None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GNMConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-GNM")
        if not isinstance(args, GNMConfig):
            raise GNMInputError(f"args: expected a GNMConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise GNMInputError("train_dataset: the forget set is required")
        model = self._load_model(model, args)
        self.padding_free = resolve_padding_free(args.padding_free, model)
        self.max_packed_length = args.max_packed_length or DEFAULT_MAX_PACKED_LENGTH
        processing_class = self._load_tokenizer(processing_class, model)
        self._check_vocabulary(model, processing_class)

        forget_rows = load_unlearning_data(train_dataset, "forget", tokenizer=processing_class)
        retain_rows = None
        needs_retain = sorted(losses.TERMS_NEEDING_RETAIN.intersection(args.loss_terms))
        if retain_dataset is not None:
            retain_rows = load_unlearning_data(retain_dataset, "retain", tokenizer=processing_class)
        elif needs_retain:
            raise GNMInputError(f"retain_dataset: required by the term(s) {needs_retain}")
        check_forget_chunks(args, len(forget_rows))
        self.negative_rows, negatives_by_id = self._load_negatives(negative_dataset, forget_rows, args)
        self.forget_rows, self.retain_rows = forget_rows, retain_rows
        if retain_rows is not None:
            warn_about_overlap(forget_rows, retain_rows)

        # Reference strategy (the model as handed in), decided before PEFT wraps the model so that a copy is of the
        # base weights; a PeftModel handed in keeps training its adapter, and a frozen copy of it is the reference.
        adapter_handed_in = peft_config is None and is_peft_model(model)
        self.reference_mode = resolve_reference_mode(
            args.reference_model, args.loss_terms, peft_config is not None or adapter_handed_in, adapter_handed_in
        )
        reference_copy = frozen_copy(model) if self.reference_mode == "copy" else None
        base_model = self._load_base_model(model, args) if losses.TERMS_NEEDING_BASE & set(args.loss_terms) else None
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's initial weights are drawn here, before Trainer seeds anything
            model = self._wrap_peft(model, peft_config, args, len(forget_rows) * args.epochs_per_chunk)
        elif adapter_handed_in:
            model = train_adapter(model)
        if self.reference_mode == "reference_adapter":
            add_reference_adapter(model)
        if args.disable_dropout:
            disable_dropout_and_say(model)  # after PEFT: its lora_dropout too, as TRL does
        for frozen in (reference_copy, base_model):  # in eval mode already; no dropout whatever the setting
            if frozen is not None:
                disable_dropout(frozen)

        tokenize = dict(
            tokenizer=processing_class,
            template=args.text_template,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            add_eos_token=args.add_eos_token,
        )
        forget_examples = tokenize_examples(forget_rows, name="forget set", **tokenize)
        retain_examples = tokenize_examples(retain_rows, name="retain set", **tokenize) if retain_rows else None
        if data_collator is None:
            data_collator = GNMDataCollator(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                retain_examples=retain_examples,
                negative_completions=(
                    tokenize_negatives(
                        negatives_by_id, forget_rows, processing_class, args.text_template, args.add_eos_token
                    )
                    if negatives_by_id
                    else None
                ),
                use_retain=bool({"gd", "klr"}.intersection(args.loss_terms)),
                use_random_match="rm" in args.loss_terms,
                use_negatives="gnm" in args.loss_terms,
                forget_whole_text=not args.forget_completion_only_loss,
                seed=data_order_seed(args),
            )
        if eval_dataset is not None:
            eval_rows = load_unlearning_data(eval_dataset, "forget", tokenizer=processing_class)
            eval_negatives = self._load_negatives(negative_dataset, eval_rows, args)[1]
            if eval_negatives:
                data_collator.negative_completions.update(
                    tokenize_negatives(eval_negatives, eval_rows, processing_class, args.text_template, args.add_eos_token)
                )
            eval_dataset = _as_dataset(tokenize_examples(eval_rows, name="eval set", **tokenize))

        callbacks = list(callbacks or []) + [_RetainPairingEpochCallback(data_collator)]
        self.collapse_guard = None
        if args.collapse_guard:
            from .guard import CollapseGuard

            self.collapse_guard = CollapseGuard(
                args.collapse_retain_nll_ratio, args.collapse_min_retain_nll_increase, args.collapse_warmup,
                args.collapse_guard_action, args.collapse_window,
            )
            callbacks.append(self.collapse_guard)
        if is_adalora(model):
            check_adalora_is_supported()
            callbacks.append(AdaLoraAllocationCallback())
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=_as_dataset(self._schedule(forget_examples, args)),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_model = prepare_reference_model(self.accelerator, reference_copy)
        self.base_model = prepare_reference_model(self.accelerator, base_model)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # (global step, micro-batch index within it) per stream, for the random schedule's seed (see _negative_generator)
        self._micro_step = {"train": (-1, 0), "eval": (-1, 0)}

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _load_model(model, args: GNMConfig):
        if not isinstance(model, str):
            if args.model_init_kwargs:
                raise GNMInputError("model_init_kwargs: only used when `model` is a Hub id or a path")
            return model
        # one-line errors, absolute path
        return from_pretrained(AutoModelForCausalLM, model, "model", **model_init_kwargs(args))

    @staticmethod
    def _load_base_model(model, args: GNMConfig):
        """`args.base_model` (for `klb`), in the model's dtype unless `model_init_kwargs` names one, checked to predict
        over the same vocabulary."""
        base = from_pretrained(AutoModelForCausalLM, args.base_model, "base_model",
                               **model_init_kwargs(args, dtype=model.dtype))
        if base.get_output_embeddings().weight.shape != model.get_output_embeddings().weight.shape:
            raise GNMInputError(
                f"base_model: {args.base_model} predicts over {base.get_output_embeddings().weight.shape[0]} tokens, the "
                f"model over {model.get_output_embeddings().weight.shape[0]}; klb needs the model it was fine-tuned from"
            )
        base.requires_grad_(False)
        return base.eval()  # placed on the device by prepare_reference_model, like the reference copy

    @staticmethod
    def _load_tokenizer(processing_class, model):
        if processing_class is None:
            processing_class = from_pretrained(AutoTokenizer, model.config._name_or_path, "tokenizer")
        if processing_class.pad_token_id is None:
            if processing_class.eos_token_id is None:
                raise GNMInputError(
                    "tokenizer: it has neither a pad token nor an eos token; set one "
                    "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings)"
                )
            logger.warning("The tokenizer has no pad token: using its eos token %r for padding.", processing_class.eos_token)
            processing_class.pad_token = processing_class.eos_token
        return processing_class

    @staticmethod
    def _check_vocabulary(model, tokenizer):
        embeddings = model.get_input_embeddings()
        if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
            raise GNMInputError(
                f"tokenizer: it has {len(tokenizer)} tokens but the model's embedding has {embeddings.num_embeddings} "
                "rows; use the tokenizer the model was trained with (or resize the model's embeddings)"
            )

    @staticmethod
    def _load_negatives(negative_dataset, forget_rows, args: GNMConfig):
        """(negative rows, {forget id: [completion of level 1..K]}) for `gnm`, (None, None) without it."""
        if "gnm" not in args.loss_terms:
            return None, None
        if negative_dataset is None:
            raise GNMInputError(
                "negative_dataset: the 'gnm' term needs gradual negatives; generate them with `gnm negatives` "
                "(or gnm_trainer.negatives) and pass the file, or remove 'gnm' from loss_terms"
            )
        from .negatives.store import check_negatives, read_negatives

        source = "negative_dataset"
        if isinstance(negative_dataset, (str, os.PathLike)):
            source = os.fspath(negative_dataset)
            negative_dataset = read_negatives(source)
        rows = list(negative_dataset)
        return rows, check_negatives(rows, forget_rows, source=source)

    @staticmethod
    def _wrap_peft(model, peft_config, args: GNMConfig, num_forget_examples: int):
        """`model` wrapped by PEFT, its settings checked against the model and the run first (`peft_checks`)."""
        from .peft_checks import prepare_peft_config, wrap_model

        if is_peft_model(model):
            raise GNMInputError("peft_config: the model is already a PEFT model; pass the base model or no peft_config")
        total_steps = training_length(args, num_forget_examples)
        peft_config = prepare_peft_config(peft_config, model, total_steps, args.disable_dropout)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return wrap_model(model, peft_config)

    def _schedule(self, forget_examples, args: GNMConfig):
        """The train dataset's examples: the forget examples, or with `forget_chunks`/`epochs_per_chunk` every block
        of the chunked schedule in order (`data/chunked.py`), whose sizes `_get_train_sampler` needs."""
        self.schedule_block_sizes = None
        if not args.chunked_schedule:
            return forget_examples
        blocks = schedule_blocks(len(forget_examples), args.forget_chunks, args.epochs_per_chunk, data_order_seed(args))
        self.schedule_block_sizes = [len(block) for block in blocks]
        return scheduled_examples(forget_examples, blocks)

    def _get_train_sampler(self, train_dataset=None):
        """The chunked schedule's sampler (`GNMConfig.forget_chunks`), else the Trainer's own."""
        if self.schedule_block_sizes is None:
            return super()._get_train_sampler(train_dataset)
        return ChunkedForgetSampler(self.schedule_block_sizes, data_order_seed(self.args))

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _forward(self, model, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Logits (N, vocab) of every group at the positions that predict its completion tokens, in sequence order
        (they line up with `losses.completion_targets`). Packed rows in one forward pass with `padding_free` (a single
        row for FlashAttention, `packs_into_one_row`); otherwise padded, in one pass or one per group (see
        `GNMConfig.forward_passes`)."""
        if not groups:
            return {}
        unwrapped = self.accelerator.unwrap_model(model)
        pad_id = self.processing_class.pad_token_id
        if self.padding_free:
            one_row = packs_into_one_row(unwrapped)
            packed = pack_groups(list(groups.values()), self.max_packed_length, pad_id, one_row=one_row)
            with logits_only_at(unwrapped, packed.loss_positions):
                logits = model(**packed.model_inputs(), use_cache=False).logits
        else:
            shapes = [g["input_ids"].shape for g in groups.values()]
            passes = [list(groups.values())]
            if not one_forward_pass(self.args.forward_passes, shapes, self._sum_over_processes):
                passes = [[g] for g in groups.values()]
            logits = torch.cat([self._padded_forward(model, unwrapped, batch, pad_id) for batch in passes])
        sizes = [int(losses.completion_positions(g["completion_mask"]).sum()) for g in groups.values()]
        return dict(zip(groups, split_per_group(logits, sizes)))

    @staticmethod
    def _padded_forward(model, unwrapped, groups: list[dict[str, torch.Tensor]], pad_id: int) -> torch.Tensor:
        """One padded forward pass over `groups`, each padded to their common length; logits at the loss positions."""
        length = max(g["input_ids"].shape[1] for g in groups)
        padded = {
            key: torch.cat([pad_to_length(g[key], length, pad_id if key == "input_ids" else 0) for g in groups])
            for key in GROUP_KEYS
        }
        with logits_only_at(unwrapped, padded_loss_positions(padded["completion_mask"])):
            return model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        """`values` summed over all processes (one all-reduce, which every process must make); as is in one process."""
        if self.accelerator.num_processes == 1:
            return values
        local = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(local, "sum").tolist()

    def _reference_forward(self, model, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not groups:
            return {}
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), reference_for(self.reference_mode, model, unwrapped, self.ref_model) as reference:
            return self._forward(reference, groups)

    def _negative_generator(self, mode: str) -> torch.Generator:
        """Seeded by (seed, step, micro-batch, process), apart for training and evaluation: the random schedule is
        reproducible and resumable, and an evaluation never changes the levels training picks."""
        step = self.state.global_step
        last_step, last_micro = self._micro_step[mode]
        micro = last_micro + 1 if last_step == step else 0
        self._micro_step[mode] = (step, micro)
        stream = 0 if mode == "train" else 1
        entropy = [self.args.seed, step, micro, self.args.process_index, stream]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and, as `num_items_in_batch`, their number of forget examples
        (summed over processes with `average_tokens_across_devices`, as the Trainer does for tokens): `compute_loss`
        divides by it, so every example of the step weighs the same however the step is split into micro-batches."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        num_examples = sum(len(batch["forget_input_ids"]) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_examples = int(self._sum_over_processes([num_examples])[0])
        return batch_samples, num_examples

    def _examples_per_step(self, batch_size: int, num_items_in_batch) -> float:
        """What per-example losses are summed and divided by: this micro-batch's size outside training (a mean); in
        training the forget examples of the whole optimizer step, per process when they were counted over all
        processes (DDP and DeepSpeed average the gradients of the processes, the Trainer's own convention)."""
        if num_items_in_batch is None:
            return batch_size
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return float(num_items_in_batch) / self.accelerator.num_processes
        return float(num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms_enabled = set(self.args.loss_terms)
        group = lambda prefix: {key: inputs[f"{prefix}_{key}"] for key in GROUP_KEYS}  # noqa: E731
        policy_groups = {}
        if terms_enabled & losses.TERMS_ON_FORGET:
            policy_groups["forget"] = group("forget")
        if terms_enabled & losses.TERMS_ON_RETAIN:
            policy_groups["retain"] = group("retain")
        if "rm" in terms_enabled:
            policy_groups["random_match"] = group("random_match")
        levels = None
        if "gnm" in terms_enabled:
            progress = self.state.global_step / max(1, self.state.max_steps)
            mode = "train" if model.training else "eval"
            generator = self._negative_generator(mode) if self.args.negative_schedule == "random" else None
            policy_groups["negative"], levels = select_negatives(inputs, self.args.negative_schedule, progress, generator)
        reference_names = []
        if "klr" in terms_enabled:
            reference_names.append("retain")
        if terms_enabled & {"klf", "npo"}:
            reference_names.append("forget")

        logits = self._forward(model, policy_groups)
        reference_logits = self._reference_forward(model, {name: policy_groups[name] for name in reference_names})
        if "klb" in terms_enabled:
            with torch.no_grad():
                base_logits = self._forward(self.base_model, {"forget": policy_groups["forget"]})["forget"]
        targets = {  # (completion tokens, sequence of each, number of sequences) of every group
            name: (*losses.completion_targets(g["input_ids"], g["completion_mask"]), len(g["input_ids"]))
            for name, g in policy_groups.items()
        }
        batch_size = inputs["forget_input_ids"].shape[0]
        nll = {  # per example: the K negatives of one example (schedule `all`) are averaged
            name: losses.sequence_nll(logits[name], *targets[name]).view(batch_size, -1).mean(-1)
            for name in policy_groups
        }

        def kl(name, reference=None):
            _, sequence_index, num_sequences = targets[name]
            reference = reference_logits[name] if reference is None else reference
            return losses.sequence_kl(logits[name], reference, sequence_index, num_sequences)

        per_example = {}
        if "ga" in terms_enabled:
            per_example["ga"] = -nll["forget"]
        if "gd" in terms_enabled:
            per_example["gd"] = nll["retain"]
        if "klr" in terms_enabled:
            per_example["klr"] = kl("retain")
        if "klf" in terms_enabled:
            per_example["klf"] = losses.capped_forget_kl(kl("forget"), self.args.klf_cap)
        if "rm" in terms_enabled:
            per_example["rm"] = nll["random_match"]
        if "gnm" in terms_enabled:
            per_example["gnm"] = nll["negative"]
        if "npo" in terms_enabled:
            policy_logprob = losses.sequence_logprob_sum(logits["forget"], *targets["forget"])
            reference_logprob = losses.sequence_logprob_sum(reference_logits["forget"], *targets["forget"])
            per_example["npo"] = losses.npo_loss(policy_logprob, reference_logprob, self.args.npo_beta)
        if "simnpo" in terms_enabled:
            per_example["simnpo"] = losses.simnpo_loss(nll["forget"], self.args.simnpo_beta, self.args.simnpo_delta)
        if "klb" in terms_enabled:
            per_example["klb"] = kl("forget", base_logits)
        # Sums over this micro-batch divided by the examples of the whole step: every example weighs the same.
        examples = self._examples_per_step(batch_size, num_items_in_batch)
        step_shares = {name: values.sum() / examples for name, values in per_example.items()}
        loss = losses.combine_losses(step_shares, self.args.loss_weights)
        terms = {name: v.mean() for name, v in per_example.items()}

        extra = {}
        if is_adalora(self.accelerator.unwrap_model(model)):
            unwrapped = self.accelerator.unwrap_model(model)
            orthogonality = losses.adalora_orthogonality(unwrapped, unwrapped.active_adapter)
            if orthogonality is not None:
                # once per optimizer step: each micro-batch adds its share of the step's examples
                weight = unwrapped.peft_config[unwrapped.active_adapter].orth_reg_weight * batch_size / examples
                loss = loss + weight * orthogonality
                extra["loss_orth"] = orthogonality
        if levels is not None:
            extra["negative_level"] = levels.float().view(batch_size, -1).mean(-1).mean()
        self._record_metrics(model, terms, nll, extra, batch_size)
        return (loss, {"terms": terms}) if return_outputs else loss

    def _record_metrics(self, model, terms, nll, extra, batch_size: int) -> None:
        """Store each term, the NLL of each group and extras for `log` as (sum over examples, examples), summed over
        processes in one gather: the logged values are per-example means over the logging window and all processes."""
        names = [f"loss_{term}" for term in terms] + [f"nll_{name}" for name in nll] + list(extra)
        values = [v.detach().float() for v in terms.values()]
        values += [v.detach().float().mean() for v in nll.values()]
        values += [v.detach().float() for v in extra.values()]
        stacked = torch.stack(values + [values[0].new_ones(())]) * batch_size
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked[None]).sum(0)
        mode = "train" if model.training else "eval"
        *sums, count = stacked.tolist()  # the same on every process: every rank's guard decides the same
        for name, total in zip(names, sums):
            self._metrics[mode][name].append((total, count))
        if mode == "train" and self.collapse_guard is not None:  # observed per optimizer step, at its end
            self.collapse_guard.add_micro_batch(self.state.global_step, dict(zip(names, sums)), count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {
            key: sum(total for total, _ in values) / sum(count for _, count in values)
            for key, values in self._metrics[mode].items()
            if values
        }
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the same loss (and its terms, through `log`) on the eval forget rows."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the adapter (PEFT) or the full model, plus the tokenizer; merged full weights with `merge_adapters`.

        A final save (not a checkpoint) also writes the run's manifest (`gnm_manifest.json`) and our model card
        (`README.md`, the card a push uploads) in place of PEFT's empty template.
        """
        from .distributed import save_full_weights, saves_sharded_only

        unwrapped = self.accelerator.unwrap_model(self.model)
        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        if saves_sharded_only(self):
            # FSDP with a sharded state dict would leave no loadable weights in the output folder.
            save_full_weights(self, output_dir)
        elif not (self.args.merge_adapters and is_peft_model(unwrapped)):
            super().save_model(output_dir, _internal_call=True)  # internal: the upload waits for manifest and card
        elif self.args.should_save:
            save_merged(unwrapped, self.processing_class, output_dir)
        if self.args.should_save:  # after the weights: a failed write here must not cost the trained model
            self.write_manifest(output_dir)
        self.create_model_card(output_dir=output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save")

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Save the trained adapter only, never the frozen `reference` copy of a PeftModel handed in."""
        with reference_adapter_hidden(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial):
        """Checkpoints of an AdaLoRA model keep its untrimmed weights, rank pattern and importance scores (see
        `gnm_trainer.modeling`): resume and rollback are exact."""
        checkpoint_dir = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        unwrapped = self.accelerator.unwrap_model(self.model)
        with adalora_checkpoint(unwrapped, checkpoint_dir, self.args.should_save, not self.args.save_only_model):
            super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        """Resume loads a PEFT model's trained adapter the way the collapse guard's rollback does."""
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if is_peft_model(unwrapped) and not self.is_fsdp_enabled:
            return load_checkpoint_weights(unwrapped, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def write_manifest(self, output_dir: str) -> str:
        """Write `gnm_manifest.json`: versions, launch, seed, configuration hash, data fingerprints, negatives'
        provenance and the collapse guard's summary (see `gnm_trainer.manifest`)."""
        from .manifest import build_manifest, write_manifest

        return write_manifest(output_dir, build_manifest(self, guard=self.collapse_guard, negative_rows=self.negative_rows))

    # ------------------------------------------------------------------------------------------------------------
    # Hub: our model card and upload (the logic lives in model_card.py and hub.py)
    # ------------------------------------------------------------------------------------------------------------

    def create_model_card(self, evaluation_results=None, output_dir: str | None = None, **card_options) -> None:
        """Write the GNM model card (`gnm_trainer.model_card`) as `README.md` in `output_dir` (default:
        `args.output_dir`), on the main process only."""
        from .hub import write_trainer_card

        write_trainer_card(self, evaluation_results, output_dir=output_dir, **card_options)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs):
        """Upload the adapter (merged weights with `merge_adapters`), the tokenizer and the GNM card with
        `gnm_trainer.hub.push_to_hub`. Always blocking. The token is never logged, written or shown in an error."""
        from .hub import push_trainer

        return push_trainer(self, commit_message, token, revision, private, **kwargs)


def model_init_kwargs(args: GNMConfig, dtype: torch.dtype | None = None) -> dict:
    """`args.model_init_kwargs` for `from_pretrained`, its dtype name as a torch dtype; `dtype` when it names none."""
    init_kwargs = {**({"dtype": dtype} if dtype is not None else {}), **dict(args.model_init_kwargs or {})}
    if isinstance(init_kwargs.get("dtype"), str) and init_kwargs["dtype"] != "auto":
        init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
    return init_kwargs


def check_adalora_is_supported() -> None:
    """AdaLoRA's orthogonality regulariser multiplies each adapter matrix by itself, which ZeRO-3 partitions: gathered
    for the product (PEFT's way) the matrix is released again before the backward pass needs it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise GNMInputError(
            "peft_config: AdaLoRA is not supported under DeepSpeed ZeRO-3 (its orthogonality regulariser needs the "
            "whole adapter matrices); use ZeRO-2 or DDP, or LoRA under ZeRO-3"
        )


def check_forget_chunks(args: GNMConfig, num_forget_rows: int) -> None:
    """Every chunk must hold at least one forget row."""
    if args.forget_chunks > num_forget_rows:
        raise GNMInputError(
            f"forget_chunks: {args.forget_chunks} chunks but the forget set has {num_forget_rows} rows; expected at "
            f"most {num_forget_rows}"
        )


def warn_about_overlap(forget_rows, retain_rows) -> None:
    """Warn (with counts) when rows stand in both sets: the run would push the same text up and down at once."""
    forget_ids, retain_ids = set(forget_rows["id"]), set(retain_rows["id"])
    forget_pairs = set(zip(forget_rows["prompt"], forget_rows["completion"]))
    shared_pairs = forget_pairs.intersection(zip(retain_rows["prompt"], retain_rows["completion"]))
    shared_ids = forget_ids & retain_ids
    if shared_ids or shared_pairs:
        logger.warning(
            "%d ids and %d (prompt, completion) pairs are in both the forget and the retain set (first ids: %s); "
            "they are unlearned and retained at the same time",
            len(shared_ids), len(shared_pairs), sorted(shared_ids)[:5],
        )


def _as_dataset(examples: list[dict[str, Any]]):
    import datasets

    return datasets.Dataset.from_list(examples)
