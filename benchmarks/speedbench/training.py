"""(a) and (b): a GNMTrainer step against the published loop and against its compute floor, on the same batches.

Two GNMTrainer runs see the very same batches (same seed, same data; checked by their step losses): first today's
padded step (`padding_free=False`), which also records the sequences of every step; then the library's default step
(packed where the model supports it). After each default step, on the sequences of that step: the compute floor,
then the published loop over the same examples. The trainers' times are wall times between two step ends (data
loading, collation, the loss math, logging and the collapse guard included), the side measurements excluded.
"""

import copy
import os
from dataclasses import dataclass

from .common import (
    Data,
    Preset,
    build_model,
    clock,
    layout_setting,
    lora_config,
    mean,
    padding_options,
    parameter_count,
    quiet,
    texts_of,
    training_rows,
)
from .flops import linear_weights, lora_step_flops, matmul_precision, utilisation

# The steps compared must have trained on the same batches: their losses agree to this relative difference.
SAME_LOSS_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The sequences of a step
# ---------------------------------------------------------------------------------------------------------------


def step_groups(inputs, progress: float) -> dict:
    """The sequences the paper's recipe (ga+klr+gnm) puts through the model, as GNMTrainer.compute_loss picks them,
    from a padded batch of the collator (right-padded groups)."""
    from gnm_trainer.data.collator import select_negatives

    keys = ("input_ids", "attention_mask", "completion_mask")
    groups = {name: {key: inputs[f"{name}_{key}"] for key in keys} for name in ("forget", "retain")}
    groups["negative"], _ = select_negatives(inputs, "gradual", progress)
    return groups


def real_sequences(group: dict) -> list[tuple]:
    """Each row of a right-padded group cut to its own length: (input_ids, reads), where `reads` marks the positions
    whose logit a loss reads (those that predict a completion token)."""
    import torch

    sequences = []
    for row, length in enumerate(group["attention_mask"].sum(-1).tolist()):
        input_ids = group["input_ids"][row, :length]
        completion = group["completion_mask"][row, :length].bool()
        sequences.append((input_ids, torch.cat([completion[1:], completion.new_zeros(1)])))
    return sequences


def policy_tokens(groups: dict) -> int:
    """Tokens of the sequences the trained model reads in a step (forget, retain, negatives), padding excluded."""
    return sum(int(group["attention_mask"].sum()) for group in groups.values())


def reference_tokens(groups: dict) -> int:
    """Tokens the reference reads in a step (the retain sequences, for klr), padding excluded."""
    return int(groups["retain"]["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------------
# The published loop
# ---------------------------------------------------------------------------------------------------------------


def example_groups(groups: dict, row: int) -> dict:
    """Row `row` of every group alone (batch 1), cut to its own length: the published loop's input."""
    single = {}
    for name, group in groups.items():
        length = int(group["attention_mask"][row].sum())
        single[name] = {key: value[row : row + 1, :length] for key, value in group.items()}
    return single


class PublishedLoop:
    """Training as the published code does it: batch 1, one forward per term, the reference a second full fp32 copy.

    The loss math is ours (the published KL was not a KL, see SPEC §1), which costs the same; the adapter is LoRA
    like GNMTrainer's (the published code used AdaLoRA, which adds a little work per step).
    """

    def __init__(self, base_model, weights: dict, device: str):
        import torch
        from peft import get_peft_model

        self.reference = copy.deepcopy(base_model).float().eval().requires_grad_(False)
        self.policy = get_peft_model(copy.deepcopy(base_model), lora_config()).train()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.weights, self.device = weights, device

    def train_example(self, groups: dict) -> None:
        import torch

        from gnm_trainer import losses

        def logits(model, name):
            group = groups[name]
            return model(input_ids=group["input_ids"], attention_mask=group["attention_mask"], use_cache=False).logits

        forget, retain, negative = groups["forget"], groups["retain"], groups["negative"]
        ga = -losses.completion_nll(logits(self.policy, "forget"), forget["input_ids"], forget["completion_mask"])
        retain_logits = logits(self.policy, "retain")
        with torch.no_grad():
            reference_logits = logits(self.reference, "retain")
        klr = losses.completion_kl(retain_logits, reference_logits, retain["completion_mask"])
        gnm = losses.completion_nll(logits(self.policy, "negative"), negative["input_ids"], negative["completion_mask"])
        loss = self.weights["ga"] * ga.mean() + self.weights["klr"] * klr.mean() + self.weights["gnm"] * gnm.mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds_per_example(self, groups: dict) -> float:
        rows = range(len(groups["forget"]["input_ids"]))
        start = clock(self.device)
        for row in rows:
            self.train_example(example_groups(groups, row))
        return (clock(self.device) - start) / len(rows)


# ---------------------------------------------------------------------------------------------------------------
# The compute floor: real tokens only, plain torch and the model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PackedRow:
    input_ids: object  # (tokens,) the row's sequences end to end
    position_ids: object  # (tokens,) restarting at 0 for each sequence
    reads: object  # (tokens,) bool: the positions whose logit a loss reads
    sequences: list  # the indices of the sequences it holds, in order


def packed_rows(sequences: list[tuple], row_tokens: int | None = None) -> list[PackedRow]:
    """`sequences` (input_ids, reads) packed first-fit decreasing into rows of at most `row_tokens` tokens, or of the
    longest sequence where that is longer (None: the longest sequence), with no padding."""
    import torch

    bound = max([row_tokens or 0] + [len(input_ids) for input_ids, _ in sequences])
    rows, lengths = [], []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0])):
        length = len(sequences[index][0])
        place = next((row for row, used in enumerate(lengths) if used + length <= bound), None)
        if place is None:
            rows.append([])
            lengths.append(0)
            place = len(rows) - 1
        rows[place].append(index)
        lengths[place] += length
    return [
        PackedRow(
            input_ids=torch.cat([sequences[i][0] for i in row]),
            position_ids=torch.cat([torch.arange(len(sequences[i][0]), device=sequences[i][0].device) for i in row]),
            reads=torch.cat([sequences[i][1] for i in row]),
            sequences=row,
        )
        for row in rows
    ]


def read_logits(causal_lm, row: PackedRow):
    """The logits a loss reads in one packed row: position ids and no attention mask, so that transformers keeps
    each sequence to itself (block-diagonal causal attention); the LM head only on the read positions."""
    hidden = causal_lm.get_decoder()(
        input_ids=row.input_ids[None], position_ids=row.position_ids[None], use_cache=False
    ).last_hidden_state
    return causal_lm.get_output_embeddings()(hidden[0, row.reads])


# Row lengths the floor tries in the warm-up steps (None: the longest sequence of the step; the last: one row here).
# Attention over a packed row costs its length squared, a row one call of per-call overhead: on a CPU short rows
# win, on a GPU one long row; the floor keeps the fastest.
FLOOR_ROW_TOKENS = (None, 512, 1024, 2048, 4096, 16384)


class PackedFloor:
    """The work one step of ga+klr+gnm cannot avoid, counting only real tokens: the step's sequences packed with no
    padding, one forward + backward with the LM head applied only where a loss reads a logit, the adapter-disabled
    reference forward over the retain sequences packed the same way, and the AdamW step. No loss math: what the
    trainer adds to this (collation, packing, the losses, the Trainer loop, metrics, the collapse guard) is its own
    overhead. Built from torch, PEFT and the model, not from the trainer, so that it measures it independently.
    `calibrate` times every row length of FLOOR_ROW_TOKENS (in the warm-up steps), `fastest_seconds` the fastest.
    """

    def __init__(self, model, device: str):
        import torch

        trainable = [p for p in model.parameters() if p.requires_grad]
        # lr 0: the optimizer does all of its work but leaves the weights the trainer is training untouched.
        self.optimizer = torch.optim.AdamW(trainable, lr=0.0)
        self.device = device
        self.trials = {row_tokens: 0.0 for row_tokens in FLOOR_ROW_TOKENS}

    def calibrate(self, model, groups: dict) -> None:
        if not any(self.trials.values()):
            self.seconds(model, groups, None)  # warm-up, not counted
        for row_tokens in self.trials:
            self.trials[row_tokens] += self.seconds(model, groups, row_tokens)

    def fastest_seconds(self, model, groups: dict) -> float:
        return self.seconds(model, groups, self.row_tokens)

    @property
    def row_tokens(self) -> int | None:
        return min(self.trials, key=self.trials.get)

    def seconds(self, model, groups: dict, row_tokens: int | None) -> float:
        import torch

        start = clock(self.device)
        causal_lm = model.get_base_model()
        policy = [sequence for group in groups.values() for sequence in real_sequences(group)]
        total = sum(read_logits(causal_lm, row).mean() for row in packed_rows(policy, row_tokens))
        total.backward()
        with torch.no_grad(), model.disable_adapter():
            for row in packed_rows(real_sequences(groups["retain"]), row_tokens):
                read_logits(causal_lm, row)
        self.optimizer.step()
        model.zero_grad(set_to_none=True)
        return clock(self.device) - start


# ---------------------------------------------------------------------------------------------------------------
# GNMTrainer runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainerRun:
    layout: str
    step_seconds: list  # every step, warm-up included
    computed_tokens: list  # token positions the model's embedding layer saw in each step (padding included)
    losses: list
    groups: list  # each step's sequences (padded layout), when recorded
    peak_memory_mib: list  # on a GPU: torch.cuda.max_memory_allocated during each step (every model alive counts)


def run_trainer(model, padding_free: bool | None, setup: dict, device: str, record_groups=False, after_step=None):
    """Train `model` with GNMTrainer for `setup["steps"]` steps; `after_step(step_index, trained_model)` runs after
    each step, outside its timing. `setup` holds the data, tokenizer and sizes common to every run."""
    import torch
    from transformers import TrainerCallback

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.gnm_config import PAPER_LOSS_TERMS

    run = TrainerRun(layout_setting(padding_free), [], [], [], [], [])
    on_gpu = device.startswith("cuda")

    class RecordingTrainer(GNMTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            result = super().compute_loss(model, inputs, *args, **kwargs)
            run.losses.append((result[0] if isinstance(result, tuple) else result).detach())
            if record_groups:
                run.groups.append(step_groups(inputs, self.state.global_step / max(1, self.state.max_steps)))
            return result

    class StepClock(TrainerCallback):
        def __init__(self):
            self.positions = 0

        def count(self, module, args):
            self.positions += args[0].numel()

        def on_train_begin(self, args, state, control, **kwargs):
            self.resume = clock(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self.positions = 0
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            run.step_seconds.append(clock(device) - self.resume)
            run.computed_tokens.append(self.positions)
            if on_gpu:
                run.peak_memory_mib.append(torch.cuda.max_memory_allocated() / 2**20)
            if after_step is not None:
                after_step(state.global_step - 1, model)
            self.resume = clock(device)

    args = GNMConfig(
        output_dir=os.path.join(setup["work_dir"], f"training-{padding_free}"), loss_terms=list(PAPER_LOSS_TERMS),
        per_device_train_batch_size=setup["batch_size"], max_steps=setup["steps"], save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device == "cpu", seed=0,
        train_sampling_strategy=setup["sampling"], **padding_options(padding_free),
    )  # fmt: skip
    trainer = RecordingTrainer(model, args, train_dataset=setup["forget"], retain_dataset=setup["retain"],
                               negative_dataset=setup["negatives"], processing_class=setup["tokenizer"],
                               peft_config=lora_config())  # fmt: skip
    step_clock = StepClock()
    trainer.model.get_input_embeddings().register_forward_pre_hook(step_clock.count)
    trainer.add_callback(step_clock)
    torch.manual_seed(0)
    quiet(trainer).train()
    run.losses = [float(loss) for loss in run.losses]
    return run


def largest_relative_difference(first: list, second: list) -> float:
    if len(first) != len(second):
        return float("inf")
    return max((abs(a - b) / max(1.0, abs(b)) for a, b in zip(first, second)), default=0.0)


def measure_training(preset: Preset, data: Data, device: str, work_dir: str, task: str | None,
                     sampling: str = "random") -> tuple[dict, dict]:
    """(a) and (b): the padded run, then the default run with the floor and the published loop after each step."""
    import torch

    from gnm_trainer.gnm_config import DEFAULT_WEIGHTS, PAPER_LOSS_TERMS
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.target import train_tokenizer

    forget, retain = training_rows(data, preset, task)
    tokenizer = train_tokenizer(texts_of(forget + retain), vocab_size=preset.vocab_size)
    model = build_model(tokenizer, preset.model, device)
    setup = {
        "forget": forget, "retain": retain, "negatives": perturb_negatives(forget, retain, levels=3, seed=0),
        "tokenizer": tokenizer, "batch_size": preset.train_batch_size, "sampling": sampling, "work_dir": work_dir,
        "steps": preset.warmup_steps + preset.measured_steps,
    }  # fmt: skip
    published = PublishedLoop(model, DEFAULT_WEIGHTS, device)
    padded = run_trainer(copy.deepcopy(model), False, setup, device, record_groups=True)
    side = {"floor": [], "published": []}
    floor = None

    def floor_and_published(step: int, trained_model) -> None:
        nonlocal floor
        floor = floor or PackedFloor(trained_model, device)
        if step < preset.warmup_steps:
            floor.calibrate(trained_model, padded.groups[step])
        else:
            side["floor"].append(floor.fastest_seconds(trained_model, padded.groups[step]))
        side["published"].append(published.seconds_per_example(padded.groups[step]))

    default = run_trainer(copy.deepcopy(model), None, setup, device, after_step=floor_and_published)

    measured = slice(preset.warmup_steps, None)
    batch_size = preset.train_batch_size
    step_seconds, padded_seconds = mean(default.step_seconds[measured]), mean(padded.step_seconds[measured])
    published_per_example = mean(side["published"][measured])
    floor_seconds = mean(side["floor"])
    loss_difference = largest_relative_difference(default.losses, padded.losses)
    measured_groups = padded.groups[measured]
    policy_per_step = mean(policy_tokens(groups) for groups in measured_groups)
    reference_per_step = mean(reference_tokens(groups) for groups in measured_groups)
    flops = lora_step_flops(linear_weights(model), policy_per_step, reference_per_step)
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    precision = matmul_precision(next(model.parameters()).dtype)
    common = {
        "model_parameters": parameter_count(model),
        "train_task": task or "all",
        "train_sampling_strategy": sampling,
        "loss_terms": list(PAPER_LOSS_TERMS),
        "batch_size": batch_size,
        "measured_steps": preset.measured_steps,
        "layout": default.layout,
        "real_tokens_per_step": policy_per_step + reference_per_step,  # padding excluded, the reference's included
        "policy_tokens_per_step": policy_per_step,
        "computed_tokens_per_step": mean(default.computed_tokens[measured]),
        "gnm_step_seconds": step_seconds,
        "tokens_per_second": policy_per_step / step_seconds,  # the trained model's real tokens (no padding)
        "utilisation": utilisation(flops, step_seconds, device_name, precision),
        "peak_memory_mib": max(default.peak_memory_mib, default=None),
    }
    training = {
        **common,
        "padded_computed_tokens_per_step": mean(padded.computed_tokens[measured]),
        "padded_tokens_per_second": policy_per_step / padded_seconds,
        "padded_peak_memory_mib": max(padded.peak_memory_mib, default=None),
        "gnm_seconds_per_example": step_seconds / batch_size,
        "padded_seconds_per_example": padded_seconds / batch_size,
        "published_seconds_per_example": published_per_example,
        "published_speedup": published_per_example / (step_seconds / batch_size),
        "padded_published_speedup": published_per_example / (padded_seconds / batch_size),
        "packing_speedup": padded_seconds / step_seconds,
        "largest_loss_difference": loss_difference,
        "same_batches": loss_difference <= SAME_LOSS_TOLERANCE,
        "raw_seconds": {"step": default.step_seconds, "padded_step": padded.step_seconds,
                        "published": side["published"]},
        "losses": {"default": default.losses, "padded": padded.losses},
    }  # fmt: skip
    overhead = {
        **common,
        "floor_step_seconds": floor_seconds,
        "floor_row_tokens": floor.row_tokens or "the longest sequence of each step",
        "floor_calibration_seconds": {str(row_tokens): seconds for row_tokens, seconds in floor.trials.items()},
        "overhead_ratio": step_seconds / floor_seconds,
        # (a) for a step that took no more than its floor: the most batching can gain over the published loop here
        "published_speedup_at_floor": published_per_example / (floor_seconds / batch_size),
        "raw_seconds": {"step": default.step_seconds, "floor": side["floor"]},
    }
    return training, overhead
