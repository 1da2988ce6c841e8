"""`GNMTrainer`: unlearning with Gradual Negative Matching on the Hugging Face `Trainer`.

The data flow of one step: the forget set is the train dataset; `GNMDataCollator` pairs each forget example with a
retain example, a random retain completion and its K gradual negatives; `compute_loss` picks the scheduled negative
level, runs every sequence that needs gradients through the model (one forward by default) and, when a term needs
it, the reference model once without gradients, then combines the terms of `losses.py`.
"""

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, set_seed
from transformers.utils import logging

from . import losses
from .data.collator import GNMDataCollator, select_negatives, tokenize_examples, tokenize_negatives
from .data.loading import load_unlearning_data
from .errors import GNMInputError
from .gnm_config import GNMConfig
from .modeling import from_pretrained, is_adalora, is_peft_model, save_merged
from .reference import adapter_disabled, frozen_copy, prepare_reference_model, resolve_reference_mode

logger = logging.get_logger(__name__)

GROUP_KEYS = ("input_ids", "attention_mask", "completion_mask")


def training_length(args: GNMConfig, num_examples: int) -> int:
    """Optimizer steps that `Trainer.train` will run (its own formula), known before it starts."""
    if args.max_steps > 0:
        return args.max_steps
    batches_per_epoch = math.ceil(num_examples / (args.per_device_train_batch_size * max(1, args.world_size)))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * steps_per_epoch)


# `auto` runs one forward pass unless padding every group to the common length adds more than this share of tokens.
MAX_PADDING_OVERHEAD = 0.25


def one_forward_pass(mode: str, shapes: list[tuple[int, int]]) -> bool:
    """Whether groups of (rows, length) go through the model together (padded to the longest) or one by one."""
    if len(shapes) == 1 or mode == "one":
        return True
    if mode == "per_group":
        return False
    padded_apart = sum(rows * length for rows, length in shapes)
    padded_together = sum(rows for rows, _ in shapes) * max(length for _, length in shapes)
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
    """Unlearn a causal LM with any mix of the GNM loss terms (`ga`, `gd`, `klr`, `klf`, `rm`, `gnm`, `npo`).

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
    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

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
        processing_class = self._load_tokenizer(processing_class, model)
        self._check_vocabulary(model, processing_class)

        forget_rows = load_unlearning_data(train_dataset, "forget", tokenizer=processing_class)
        retain_rows = None
        needs_retain = sorted(losses.TERMS_NEEDING_RETAIN.intersection(args.loss_terms))
        if retain_dataset is not None:
            retain_rows = load_unlearning_data(retain_dataset, "retain", tokenizer=processing_class)
        elif needs_retain:
            raise GNMInputError(f"retain_dataset: required by the term(s) {needs_retain}")
        self.negative_rows, negatives_by_id = self._load_negatives(negative_dataset, forget_rows, args)
        self.forget_rows, self.retain_rows = forget_rows, retain_rows
        if retain_rows is not None:
            warn_about_overlap(forget_rows, retain_rows)

        # Reference strategy, decided before PEFT wraps the model so that a copy is of the base weights.
        self.reference_mode = resolve_reference_mode(args.reference_model, args.loss_terms, peft_config is not None or is_peft_model(model))
        reference_copy = frozen_copy(model) if self.reference_mode == "copy" else None
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's initial weights are drawn here, before Trainer seeds anything
            model = self._wrap_peft(model, peft_config, args, len(forget_rows))

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
                seed=args.data_seed if args.data_seed is not None else args.seed,
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
            callbacks.append(AdaLoraAllocationCallback())
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=_as_dataset(forget_examples),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_model = prepare_reference_model(self.accelerator, reference_copy)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._micro_step = (-1, 0)  # (global step, micro-batch index within it) for the random schedule's seed

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _load_model(model, args: GNMConfig):
        if not isinstance(model, str):
            if args.model_init_kwargs:
                raise GNMInputError("model_init_kwargs: only used when `model` is a Hub id or a path")
            return model
        init_kwargs = dict(args.model_init_kwargs or {})
        dtype = init_kwargs.get("dtype")
        if isinstance(dtype, str) and dtype != "auto":
            init_kwargs["dtype"] = getattr(torch, dtype)
        return from_pretrained(AutoModelForCausalLM, model, "model", **init_kwargs)  # one-line errors, absolute path

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
        import dataclasses

        from peft import AdaLoraConfig, get_peft_model

        if is_peft_model(model):
            raise GNMInputError("peft_config: the model is already a PEFT model; pass the base model or no peft_config")
        if isinstance(peft_config, AdaLoraConfig):
            total_step = training_length(args, num_forget_examples)
            if peft_config.total_step not in (None, total_step):
                logger.warning("AdaLoRA total_step %s replaced by the training length %s.", peft_config.total_step, total_step)
            peft_config = dataclasses.replace(peft_config, total_step=total_step)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        try:
            return get_peft_model(model, peft_config)
        except ValueError as error:  # PEFT's NoMatchingPeftModuleError and config checks: a wrong setting
            raise GNMInputError(f"peft_config: {error}") from error

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _forward(self, model, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Logits of every group, in one forward pass or one per group (see `GNMConfig.forward_passes`)."""
        if not groups:
            return {}
        if not one_forward_pass(self.args.forward_passes, [g["input_ids"].shape for g in groups.values()]):
            return {
                name: model(input_ids=g["input_ids"], attention_mask=g["attention_mask"], use_cache=False).logits
                for name, g in groups.items()
            }
        length = max(g["input_ids"].shape[1] for g in groups.values())
        pad_id = self.processing_class.pad_token_id
        input_ids = torch.cat([pad_to_length(g["input_ids"], length, pad_id) for g in groups.values()])
        attention_mask = torch.cat([pad_to_length(g["attention_mask"], length, 0) for g in groups.values()])
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        sizes = [g["input_ids"].shape[0] for g in groups.values()]
        return {
            name: chunk[:, : g["input_ids"].shape[1]]
            for (name, g), chunk in zip(groups.items(), torch.split(logits, sizes))
        }

    def _reference_forward(self, model, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not groups:
            return {}
        with torch.no_grad():
            if self.reference_mode == "adapter_disabled":
                with adapter_disabled(model, self.accelerator.unwrap_model(model)) as base:
                    return self._forward(base, groups)
            return self._forward(self.ref_model, groups)

    def _negative_generator(self) -> torch.Generator:
        """Seeded by (seed, step, micro-batch, process): the random schedule is reproducible and resumable."""
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        seed = np.random.SeedSequence([self.args.seed, step, micro, self.args.process_index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

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
            generator = self._negative_generator() if self.args.negative_schedule == "random" else None
            policy_groups["negative"], levels = select_negatives(inputs, self.args.negative_schedule, progress, generator)
        reference_names = []
        if "klr" in terms_enabled:
            reference_names.append("retain")
        if terms_enabled & {"klf", "npo"}:
            reference_names.append("forget")

        logits = self._forward(model, policy_groups)
        reference_logits = self._reference_forward(model, {name: policy_groups[name] for name in reference_names})
        mask = lambda name: policy_groups[name]["completion_mask"]  # noqa: E731
        nll = {
            name: losses.completion_nll(logits[name], policy_groups[name]["input_ids"], mask(name))
            for name in policy_groups
        }

        terms = {}
        if "ga" in terms_enabled:
            terms["ga"] = -nll["forget"].mean()
        if "gd" in terms_enabled:
            terms["gd"] = nll["retain"].mean()
        if "klr" in terms_enabled:
            terms["klr"] = losses.completion_kl(logits["retain"], reference_logits["retain"], mask("retain")).mean()
        if "klf" in terms_enabled:
            forget_kl = losses.completion_kl(logits["forget"], reference_logits["forget"], mask("forget"))
            terms["klf"] = losses.capped_forget_kl(forget_kl, self.args.klf_cap).mean()
        if "rm" in terms_enabled:
            terms["rm"] = nll["random_match"].mean()
        if "gnm" in terms_enabled:
            terms["gnm"] = nll["negative"].mean()
        if "npo" in terms_enabled:
            ids = policy_groups["forget"]["input_ids"]
            policy_logprob = losses.completion_logprob_sum(logits["forget"], ids, mask("forget"))
            reference_logprob = losses.completion_logprob_sum(reference_logits["forget"], ids, mask("forget"))
            terms["npo"] = losses.npo_loss(policy_logprob, reference_logprob, self.args.npo_beta).mean()
        loss = losses.combine_losses(terms, self.args.loss_weights)

        extra = {}
        if is_adalora(self.accelerator.unwrap_model(model)):
            unwrapped = self.accelerator.unwrap_model(model)
            orthogonality = losses.adalora_orthogonality(unwrapped, unwrapped.active_adapter)
            if orthogonality is not None:
                loss = loss + unwrapped.peft_config[unwrapped.active_adapter].orth_reg_weight * orthogonality
                extra["loss_orth"] = orthogonality
        if levels is not None:
            extra["negative_level"] = levels.float().mean()
        self._record_metrics(model, terms, nll, extra)
        return (loss, {"terms": terms}) if return_outputs else loss

    def _record_metrics(self, model, terms, nll, extra) -> None:
        """Store each term, the NLL of each group and extras for `log`, averaged over processes in one gather."""
        names = [f"loss_{term}" for term in terms] + [f"nll_{name}" for name in nll] + list(extra)
        values = [v.detach().float() for v in terms.values()]
        values += [v.detach().float().mean() for v in nll.values()]
        values += [v.detach().float() for v in extra.values()]
        stacked = torch.stack(values)
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked[None]).mean(0)
        mode = "train" if model.training else "eval"
        values = stacked.tolist()  # averaged over processes: every rank's guard decides the same
        for name, value in zip(names, values):
            self._metrics[mode][name].append(value)
        if mode == "train" and self.collapse_guard is not None:
            self.collapse_guard.observe(self.state.global_step, dict(zip(names, values)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
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

        A final save (not a checkpoint) also writes the run's manifest (`gnm_manifest.json`).
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
            super().save_model(output_dir, _internal_call=True)  # True: the upload waits for the manifest
        elif self.args.should_save:
            save_merged(unwrapped, self.processing_class, output_dir)
        if self.args.should_save:  # after the weights: a failed write here must not cost the trained model
            self.write_manifest(output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save")

    def write_manifest(self, output_dir: str) -> str:
        """Write `gnm_manifest.json`: versions, launch, seed, configuration hash, data fingerprints, negatives'
        provenance and the collapse guard's summary (see `gnm_trainer.manifest`)."""
        from .manifest import build_manifest, write_manifest

        return write_manifest(output_dir, build_manifest(self, guard=self.collapse_guard, negative_rows=self.negative_rows))

    # ------------------------------------------------------------------------------------------------------------
    # Hub: our model card and upload (the logic lives in model_card.py and hub.py)
    # ------------------------------------------------------------------------------------------------------------

    def create_model_card(self, evaluation_results=None, **card_options) -> None:
        """Write the GNM model card (`gnm_trainer.model_card`) as `README.md` in `output_dir`."""
        from .hub import write_trainer_card

        write_trainer_card(self, evaluation_results, **card_options)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs):
        """Upload the adapter (merged weights with `merge_adapters`), the tokenizer and the GNM card with
        `gnm_trainer.hub.push_to_hub`. Always blocking. The token is never logged, written or shown in an error."""
        from .hub import push_trainer

        return push_trainer(self, commit_message, token, revision, private, **kwargs)


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
