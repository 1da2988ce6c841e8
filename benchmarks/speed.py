"""Speed and memory of gnm_trainer, side by side with the way the published code works (issue 5, part 2).

    python benchmarks/speed.py                          # cpu preset, all five measurements (a few minutes)
    python benchmarks/speed.py --preset gpu             # on a GPU machine: ~100M-300M models (under 8 minutes)
    python benchmarks/speed.py --preset smoke --only a,d   # seconds: what the test suite runs

Five measurements, each printed with its ratio, its target and PASS/MISS, all written to `--output` as JSON:

(a) Seconds per training example of a GNMTrainer step (the paper's terms ga+klr+gnm, LoRA r8 on all linear layers,
    AdamW, batch `train_batch_size`) against a loop that works like the published code: one example at a time, one
    forward per term, the reference as a second full fp32 copy of the model. First line: that loop as it runs
    (each sequence padded only to its own length). Second line, a strawman: every sequence padded to the
    tokenizer's maximum length. Both loops see the very same examples (the rows of each GNMTrainer batch).
(b) The same GNMTrainer step against its compute floor, timed alone on the same batch and model: the forward and
    backward pass over the step's sequences (grouped as the trainer groups them), the adapter-disabled reference
    forward and the optimizer step. What is left is the trainer's own work: collation, the loss math, the Trainer
    loop's bookkeeping, metrics and the collapse guard.
(c) Peak memory of LoRA training with `klr` (the adapter-disabled reference) against the same run with `gd` in its
    place (the same sequences through the model, no reference term), and against `reference_model="copy"`, on a
    Llama of ~100M parameters. Each variant runs in its own process so that the operating system's peak (VmHWM,
    the peak resident set of that process alone) belongs to it; on a GPU the figure is
    torch.cuda.max_memory_allocated.
(d) Evaluation: `evaluate_model` (batched) against the organisers' loop (one generation and one NLL forward at a
    time) on the same model, Task2 rows and MIA documents (the organisers' own benchmark has 240 Task2 rows for
    150+150 MIA documents; the presets keep that proportion). The scores must be equal.
(e) Gradual negatives from a generator LLM: `generate_llm_negatives` batched against batch_size=1, same rows,
    same outputs.

Every model is a randomly initialised Llama built from a config with a tokenizer trained on the data (nothing is
downloaded); the data is LUME from ../shared/data/lume when that folder exists, else the package's synthetic LUME
set. Random weights never emit eos, so every generation runs to `max_new_tokens` in both loops.
"""

import argparse
import copy
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import DEFAULT_LUME, HERE  # noqa: E402

DEFAULT_OUTPUT = os.path.join(HERE, "results", "speed.json")
MEASUREMENTS = ("a", "b", "c", "d", "e")
MEMORY_VARIANTS = ("no_reference", "klr_adapter_disabled", "klr_copy")
TARGETS = {  # measurement: (target, "min" when the ratio must reach it, "max" when it must stay under it)
    "a": (5.0, "min"),
    "b": (1.2, "max"),
    "c": (1.1, "max"),
    "d": (5.0, "min"),
    "e": (4.0, "min"),
}


@dataclass(frozen=True)
class Preset:
    """Sizes of one run. `model` and `memory_model` are `build_tiny_llama` arguments."""

    model: dict
    vocab_size: int
    train_rows: int  # forget rows the training measurements draw their batches from
    train_batch_size: int
    warmup_steps: int
    measured_steps: int
    strawman_examples: int  # examples of the padded-to-maximum loop, one after each measured step
    strawman_length: int | None  # None: the tokenizer's model_max_length
    memory_model: dict
    memory_batch_size: int
    memory_steps: int
    memory_max_length: int
    eval_rows: int  # Task2 rows, half forget, half retain
    mia_documents: int  # half members, half non-members
    max_new_tokens: int
    eval_batch_size: int
    negative_rows: int
    negative_levels: int
    negative_batch_size: int
    negative_max_new_tokens: int


TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
TARGET_SIZE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}  # the embedded target's size (4.7M parameters)
LLAMA_100M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048}
LLAMA_300M = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 2816}

PRESETS = {
    "smoke": Preset(
        model=TINY, vocab_size=512, train_rows=16, train_batch_size=4, warmup_steps=1, measured_steps=2,
        strawman_examples=1, strawman_length=256, memory_model=TINY, memory_batch_size=2, memory_steps=1,
        memory_max_length=64, eval_rows=8, mia_documents=4, max_new_tokens=8, eval_batch_size=16, negative_rows=4,
        negative_levels=2, negative_batch_size=16, negative_max_new_tokens=8,
    ),
    "cpu": Preset(
        model=TARGET_SIZE, vocab_size=4096, train_rows=256, train_batch_size=8, warmup_steps=2, measured_steps=6,
        strawman_examples=3, strawman_length=None, memory_model=LLAMA_100M, memory_batch_size=2, memory_steps=2,
        memory_max_length=128, eval_rows=96, mia_documents=120, max_new_tokens=64, eval_batch_size=16,
        negative_rows=32, negative_levels=3, negative_batch_size=16, negative_max_new_tokens=64,
    ),
    "gpu": Preset(
        model=LLAMA_100M, vocab_size=8192, train_rows=512, train_batch_size=8, warmup_steps=3, measured_steps=10,
        strawman_examples=5, strawman_length=None, memory_model=LLAMA_300M, memory_batch_size=8, memory_steps=3,
        memory_max_length=512, eval_rows=64, mia_documents=80, max_new_tokens=64, eval_batch_size=32,
        negative_rows=24, negative_levels=3, negative_batch_size=24, negative_max_new_tokens=64,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Set-up: data, tokenizer, models, clocks
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    source: str
    forget: list  # normalised rows (dicts), shuffled with a fixed seed so that tasks mix
    retain: list
    members: list[str]
    nonmembers: list[str]


def load_data(lume_dir: str, seed: int = 0) -> Data:
    """LUME when the folder exists, else the synthetic LUME-format set (the product never needs LUME)."""
    from gnm_trainer.data import load_unlearning_data

    if os.path.isdir(lume_dir):
        from gnm_trainer.evaluation.evaluator import load_mia_documents

        source = os.path.abspath(lume_dir)
        forget_source, retain_source = lume_dir, lume_dir
        members, nonmembers = load_mia_documents(lume_dir)
    else:
        from gnm_trainer.data.synthetic import make_synthetic_lume

        synthetic = make_synthetic_lume(seed=seed, num_documents=96)
        source = "synthetic (gnm_trainer.data.synthetic.make_synthetic_lume)"
        forget_source, retain_source = synthetic["forget_train"], synthetic["retain_train"]
        members = [row["document"] for row in synthetic["mia_member"]]
        nonmembers = [row["document"] for row in synthetic["mia_nonmember"]]
    forget = list(load_unlearning_data(forget_source, "forget"))
    retain = list(load_unlearning_data(retain_source, "retain"))
    rng = random.Random(seed)
    rng.shuffle(forget)
    rng.shuffle(retain)
    return Data(source, forget, retain, members, nonmembers)


def training_rows(data: Data, preset: Preset, task: str | None) -> tuple[list, list]:
    """The forget and retain rows that the training measurements use: the preset's count, of one task if asked."""
    pick = lambda rows: [row for row in rows if task is None or row["task"] == task][: preset.train_rows]  # noqa: E731
    forget, retain = pick(data.forget), pick(data.retain)
    if not forget or not retain:
        raise SystemExit(f"--train-task {task}: no such rows in {data.source}")
    return forget, retain


def texts_of(rows) -> list[str]:
    return [f"{row['prompt']} {row['completion']}" for row in rows]


def build_model(tokenizer, size: dict, device: str):
    """A random Llama of `size` whose positions cover the tokenizer's maximum length (the strawman pads to it)."""
    from gnm_trainer.target import build_tiny_llama

    positions = max(4096, tokenizer.model_max_length)
    return build_tiny_llama(tokenizer, max_position_embeddings=positions, **size).to(device)


def parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def quiet(trainer):
    """The trainer without its printed logs: the benchmark's stdout is its table (and a variant's JSON line)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def clock(device: str) -> float:
    """Wall time after the device has finished the work queued so far."""
    synchronize(device)
    return time.perf_counter()


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------
# (a) and (b): a GNMTrainer step, the published loop and the compute floor, side by side on the same batches
# ---------------------------------------------------------------------------------------------------------------


def step_groups(inputs, progress: float) -> dict:
    """The sequences the paper's recipe (ga+klr+gnm) puts through the model, as GNMTrainer.compute_loss picks them."""
    from gnm_trainer.data.collator import select_negatives
    from gnm_trainer.gnm_trainer import GROUP_KEYS

    groups = {name: {key: inputs[f"{name}_{key}"] for key in GROUP_KEYS} for name in ("forget", "retain")}
    groups["negative"], _ = select_negatives(inputs, "gradual", progress)
    return groups


def example_groups(groups: dict, row: int, pad_to: int | None, pad_id: int) -> dict:
    """Row `row` of every group alone (batch 1): cut to its own length, or padded to `pad_to` like the published
    code's `padding="max_length"`."""
    import torch.nn.functional as F

    single = {}
    for name, group in groups.items():
        length = int(group["attention_mask"][row].sum())
        cut = {key: value[row : row + 1, :length] for key, value in group.items()}
        if pad_to is not None:
            fill = {"input_ids": pad_id, "attention_mask": 0, "completion_mask": 0}
            cut = {key: F.pad(value, (0, pad_to - length), value=fill[key]) for key, value in cut.items()}
        single[name] = cut
    return single


def padded_tokens(groups: dict, forward_passes: str) -> int:
    """Token positions the trainer's policy forward computes, padding included (see `one_forward_pass`)."""
    from gnm_trainer.gnm_trainer import one_forward_pass

    shapes = [tuple(group["input_ids"].shape) for group in groups.values()]
    if one_forward_pass(forward_passes, shapes):
        return sum(rows for rows, _ in shapes) * max(length for _, length in shapes)
    return sum(rows * length for rows, length in shapes)


class PublishedLoop:
    """Training as the published code does it: batch 1, one forward per term, the reference a second full fp32 copy.

    The loss math is ours (the published KL was not a KL, see SPEC §1), which costs the same; the adapter is LoRA
    like GNMTrainer's (the published code used AdaLoRA, which adds a little work per step).
    """

    def __init__(self, base_model, weights: dict, pad_id: int, device: str):
        import torch
        from peft import get_peft_model

        self.reference = copy.deepcopy(base_model).float().eval().requires_grad_(False)
        self.policy = get_peft_model(copy.deepcopy(base_model), lora_config()).train()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.weights, self.pad_id, self.device = weights, pad_id, device

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

    def seconds_per_example(self, groups: dict, rows: range, pad_to: int | None = None) -> float:
        start = clock(self.device)
        for row in rows:
            self.train_example(example_groups(groups, row, pad_to, self.pad_id))
        return (clock(self.device) - start) / len(rows)


class ComputeFloor:
    """The passes one GNMTrainer step cannot avoid, on its own batch and model, with no loss math around them."""

    def __init__(self, model, pad_id: int, forward_passes: str, device: str):
        import torch

        trainable = [p for p in model.parameters() if p.requires_grad]
        # lr 0: the optimizer does all of its work but leaves the weights the trainer is training untouched.
        self.optimizer = torch.optim.AdamW(trainable, lr=0.0)
        self.pad_id, self.forward_passes, self.device = pad_id, forward_passes, device

    def seconds(self, model, groups: dict) -> float:
        import torch

        from gnm_trainer.gnm_trainer import one_forward_pass, pad_to_length
        from gnm_trainer.reference import adapter_disabled

        start = clock(self.device)
        shapes = [group["input_ids"].shape for group in groups.values()]
        if one_forward_pass(self.forward_passes, shapes):
            length = max(shape[1] for shape in shapes)
            input_ids = torch.cat([pad_to_length(g["input_ids"], length, self.pad_id) for g in groups.values()])
            attention_mask = torch.cat([pad_to_length(g["attention_mask"], length, 0) for g in groups.values()])
            batches = [(input_ids, attention_mask)]
        else:
            batches = [(g["input_ids"], g["attention_mask"]) for g in groups.values()]
        total = sum(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.mean() for ids, mask in batches)
        total.backward()
        with torch.no_grad(), adapter_disabled(model, model) as base:
            retain = groups["retain"]
            base(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False)
        self.optimizer.step()
        model.zero_grad(set_to_none=True)
        return clock(self.device) - start


def measure_training(preset: Preset, data: Data, device: str, work_dir: str, task: str | None,
                     sampling: str = "random") -> tuple[dict, dict]:
    """(a) and (b): after every GNMTrainer step, on that step's batch: the compute floor, the published loop over
    the same examples and (after measured steps) the padded-to-maximum loop over a few of them."""
    import torch
    from transformers import TrainerCallback

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.gnm_config import DEFAULT_WEIGHTS, PAPER_LOSS_TERMS
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.target import train_tokenizer

    forget, retain = training_rows(data, preset, task)
    tokenizer = train_tokenizer(texts_of(forget + retain), vocab_size=preset.vocab_size)
    pad_to = preset.strawman_length or tokenizer.model_max_length
    model = build_model(tokenizer, preset.model, device)
    parameters = parameter_count(model)
    published = PublishedLoop(model, DEFAULT_WEIGHTS, tokenizer.pad_token_id, device)
    negatives = perturb_negatives(forget, retain, levels=3, seed=0)
    batch_size, steps = preset.train_batch_size, preset.warmup_steps + preset.measured_steps
    args = GNMConfig(
        output_dir=os.path.join(work_dir, "training"), loss_terms=list(PAPER_LOSS_TERMS),
        per_device_train_batch_size=batch_size, max_steps=steps, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=device == "cpu", seed=0, train_sampling_strategy=sampling,
    )

    class RecordingTrainer(GNMTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.last_inputs = inputs
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = RecordingTrainer(model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=negatives,
                               processing_class=tokenizer, peft_config=lora_config())  # fmt: skip
    quiet(trainer)
    floor = ComputeFloor(trainer.model, tokenizer.pad_token_id, args.forward_passes, device)
    record = {"step": [], "floor": [], "published": [], "strawman": [], "tokens": [], "padded_tokens": []}

    class SideBySide(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.resume = clock(device)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            record["step"].append(clock(device) - self.resume)
            progress = (state.global_step - 1) / max(1, state.max_steps)
            groups = step_groups(trainer.last_inputs, progress)
            record["tokens"].append(sum(int(g["attention_mask"].sum()) for g in groups.values()))
            record["padded_tokens"].append(padded_tokens(groups, args.forward_passes))
            record["floor"].append(floor.seconds(model, groups))
            record["published"].append(published.seconds_per_example(groups, range(len(groups["forget"]["input_ids"]))))
            measured = state.global_step - preset.warmup_steps
            if 0 < measured <= preset.strawman_examples:
                record["strawman"].append(published.seconds_per_example(groups, range(1), pad_to=pad_to))
            self.resume = clock(device)

    trainer.add_callback(SideBySide())
    torch.manual_seed(0)
    trainer.train()
    measured = slice(preset.warmup_steps, None)
    step_seconds, floor_seconds = mean(record["step"][measured]), mean(record["floor"][measured])
    per_example = step_seconds / batch_size
    published_per_example = mean(record["published"][measured])
    strawman_per_example = mean(record["strawman"])
    common = {
        "model_parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "train_task": task or "all",
        "train_sampling_strategy": sampling,
        "loss_terms": list(PAPER_LOSS_TERMS),
        "batch_size": batch_size,
        "measured_steps": preset.measured_steps,
        "mean_real_tokens_per_step": mean(record["tokens"][measured]),
        "mean_padded_tokens_per_step": mean(record["padded_tokens"][measured]),
        "gnm_step_seconds": step_seconds,
    }
    training = {
        **common,
        "gnm_seconds_per_example": per_example,
        "published_seconds_per_example": published_per_example,
        "published_speedup": published_per_example / per_example,
        "strawman_padded_length": pad_to,
        "strawman_seconds_per_example": strawman_per_example,
        "strawman_speedup": strawman_per_example / per_example,
        "raw_seconds": {key: record[key] for key in ("step", "published", "strawman")},
    }
    overhead = {
        **common,
        "floor_step_seconds": floor_seconds,
        "overhead_ratio": step_seconds / floor_seconds,
        "raw_seconds": {key: record[key] for key in ("step", "floor")},
    }
    return training, overhead


# ---------------------------------------------------------------------------------------------------------------
# (c) peak memory, one process per variant
# ---------------------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """The process's peak resident memory by the operating system's accounting.

    VmHWM where /proc exists: ru_maxrss would do in a process of its own, but Linux carries the parent's peak into
    a child started with fork/vfork + exec, and the benchmark's parent holds the training models of (a) by then.
    """
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """The process's resident memory now (VmRSS); its peak so far where /proc is missing."""
    current = _status_mib("VmRSS")
    return current if current is not None else peak_rss_mib()


def ratio_or_none(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def run_memory_variant(variant: str, preset: Preset, data: Data, device: str, work_dir: str, task: str | None) -> dict:
    """Train a few steps of one variant and report its peak memory and the baseline after model load (MiB)."""
    import torch

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.target import train_tokenizer

    forget, retain = training_rows(data, preset, task)
    tokenizer = train_tokenizer(texts_of(forget + retain), vocab_size=preset.vocab_size)
    negatives = perturb_negatives(forget, retain, levels=3, seed=0)
    model = build_model(tokenizer, preset.memory_model, device)
    parameters = parameter_count(model)  # before PEFT adds the adapter's
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = current_rss_mib()
    terms = ["ga", "gd", "gnm"] if variant == "no_reference" else ["ga", "klr", "gnm"]
    args = GNMConfig(
        output_dir=os.path.join(work_dir, f"memory-{variant}"), loss_terms=terms,
        reference_model="copy" if variant == "klr_copy" else "auto", max_length=preset.memory_max_length,
        max_prompt_length=preset.memory_max_length // 2,
        per_device_train_batch_size=preset.memory_batch_size, max_steps=preset.memory_steps, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not on_gpu, seed=0,
    )
    trainer = GNMTrainer(model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=negatives,
                         processing_class=tokenizer, peft_config=lora_config())  # fmt: skip
    quiet(trainer).train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mib()
    return {
        "variant": variant,
        "loss_terms": terms,
        "reference_mode": trainer.reference_mode,
        "model_parameters": parameters,
        "memory": "torch.cuda.max_memory_allocated" if on_gpu else "VmHWM (peak resident set)",
        "baseline_after_model_load_mib": baseline,
        "peak_mib": peak,
        "increase_mib": peak - baseline,
    }


def measure_memory(argv_for_variants: list[str]) -> dict:
    """(c): each variant in a fresh interpreter (`--memory-variant`), so that its peak is its own."""
    variants = {}
    for variant in MEMORY_VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--memory-variant", variant] + argv_for_variants
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"memory variant {variant} failed:\n{completed.stderr[-4000:]}")
        variants[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    none, disabled, copied = (variants[name] for name in MEMORY_VARIANTS)
    return {
        "variants": variants,
        "model_parameters": disabled["model_parameters"],
        "klr_over_no_reference": disabled["peak_mib"] / none["peak_mib"],
        "copy_over_klr": copied["peak_mib"] / disabled["peak_mib"],
        "klr_increase_over_no_reference_increase": ratio_or_none(disabled["increase_mib"], none["increase_mib"]),
        "copy_increase_over_klr_increase": ratio_or_none(copied["increase_mib"], disabled["increase_mib"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# (d) evaluation and (e) negatives
# ---------------------------------------------------------------------------------------------------------------


def task2_rows(rows: list, count: int) -> list:
    chosen = [row for row in rows if row["task"] == "Task2"] or rows
    return chosen[:count]


def official_evaluation(model, tokenizer, examples, members, nonmembers, max_new_tokens, device) -> dict:
    """The organisers' evaluation: one generation and one NLL forward at a time; each part timed."""
    from gnm_trainer.evaluation.evaluator import score_generations
    from gnm_trainer.evaluation.generation import document_nll_one_by_one, generate_one_by_one
    from gnm_trainer.evaluation.semeval import semeval_results

    start = clock(device)
    generations = generate_one_by_one(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    rows = score_generations(examples, generations)
    middle = clock(device)
    member_nll = document_nll_one_by_one(model, tokenizer, members)
    nonmember_nll = document_nll_one_by_one(model, tokenizer, nonmembers)
    results = semeval_results(rows, member_nll, nonmember_nll)
    end = clock(device)
    return {"results": results, "rows": rows, "generation_seconds": middle - start, "nll_seconds": end - middle}


def measure_evaluation(preset: Preset, data: Data, device: str) -> dict:
    """(d): evaluate_model against the organisers' loop, plus each loop's generation and NLL parts timed apart."""
    from gnm_trainer.evaluation.evaluator import evaluate_model
    from gnm_trainer.evaluation.generation import document_nll, generate_greedy
    from gnm_trainer.target import train_tokenizer

    forget = task2_rows(data.forget, preset.eval_rows // 2)
    retain = task2_rows(data.retain, preset.eval_rows - len(forget))
    members = data.members[: preset.mia_documents // 2]
    nonmembers = data.nonmembers[: preset.mia_documents - len(members)]
    tokenizer = train_tokenizer(texts_of(forget + retain) + members + nonmembers, vocab_size=preset.vocab_size)
    model = build_model(tokenizer, preset.model, device).eval()
    batch_size, max_new_tokens = preset.eval_batch_size, preset.max_new_tokens
    generate_greedy(model, tokenizer, [forget[0]["prompt"]], max_new_tokens=2)  # warm-up, not timed

    start = clock(device)
    results, rows = evaluate_model(model, tokenizer, forget, retain, members, nonmembers,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
    batched_seconds = clock(device) - start
    examples = [{key: row[key] for key in ("id", "split", "task", "prompt", "reference")} for row in rows]
    official = official_evaluation(model, tokenizer, examples, members, nonmembers, max_new_tokens, device)
    # The two parts of the batched run, timed apart (evaluate_model does exactly these two calls).
    start = clock(device)
    generate_greedy(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size)
    middle = clock(device)
    document_nll(model, tokenizer, members + nonmembers, batch_size)
    end = clock(device)

    official_seconds = official["generation_seconds"] + official["nll_seconds"]
    same_generations = [r["generation"] for r in rows] == [r["generation"] for r in official["rows"]]
    same_scores = [r["score"] for r in rows] == [r["score"] for r in official["rows"]] and all(
        results[key] == official["results"][key] for key in official["results"]
    )
    settings = results.pop("settings")  # how the batched run generated (dtype, batch size, prompts); not a result
    return {
        "model_parameters": parameter_count(model),
        "rows": len(rows),
        "mia_documents": len(members) + len(nonmembers),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "batched_seconds": batched_seconds,
        "one_by_one_seconds": official_seconds,
        "speedup": official_seconds / batched_seconds,
        "generation_speedup": official["generation_seconds"] / (middle - start),
        "nll_speedup": official["nll_seconds"] / (end - middle),
        "parts_seconds": {
            "batched_generation": middle - start, "batched_nll": end - middle,
            "one_by_one_generation": official["generation_seconds"], "one_by_one_nll": official["nll_seconds"],
        },
        "same_generations": same_generations,
        "same_scores": same_scores,
        "batched_scores": [r["score"] for r in rows],
        "one_by_one_scores": [r["score"] for r in official["rows"]],
        "evaluation_settings": settings,
        "batched_results": results,
        "one_by_one_results": official["results"],
    }


def measure_negatives(preset: Preset, data: Data, device: str) -> dict:
    """(e): generate_llm_negatives batched against batch_size=1 on the same rows (same outputs required)."""
    from gnm_trainer.negatives import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, generate_llm_negatives
    from gnm_trainer.target import train_tokenizer

    rows = data.forget[: preset.negative_rows]
    texts = texts_of(rows + data.retain[: preset.negative_rows]) + [DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE]
    tokenizer = train_tokenizer(texts, vocab_size=preset.vocab_size)
    model = build_model(tokenizer, preset.model, device).eval()
    options = dict(levels=preset.negative_levels, max_new_tokens=preset.negative_max_new_tokens,
                   retain_rows=data.retain[: preset.negative_rows], seed=0)  # fmt: skip
    generate_llm_negatives(rows[:1], model, tokenizer, **{**options, "levels": 1, "max_new_tokens": 2})  # warm-up
    timings, outputs = {}, {}
    for name, batch_size in (("batched", preset.negative_batch_size), ("sequential", 1)):
        start = clock(device)
        outputs[name] = generate_llm_negatives(rows, model, tokenizer, batch_size=batch_size, **options)
        timings[name] = clock(device) - start
    return {
        "model_parameters": parameter_count(model),
        "rows": len(rows),
        "levels": preset.negative_levels,
        "max_new_tokens": preset.negative_max_new_tokens,
        "batch_size": preset.negative_batch_size,
        "batched_seconds": timings["batched"],
        "sequential_seconds": timings["sequential"],
        "speedup": timings["sequential"] / timings["batched"],
        "same_outputs": outputs["batched"] == outputs["sequential"],
        "fallback_levels": sum(row["fallback"] for row in outputs["batched"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def verdict(measurement: str, ratio: float) -> str:
    target, direction = TARGETS[measurement]
    passed = ratio >= target if direction == "min" else ratio <= target
    return "PASS" if passed else "MISS"


def table_rows(figures: dict) -> list[tuple[str, str, str, str, str]]:
    """(id, what, measured, ratio, target + verdict) for every measurement in `figures`."""
    rows = []
    if "a" in figures:
        a = figures["a"]
        grouped = ", grouped by length" if a.get("train_sampling_strategy") == "group_by_length" else ""
        ours = f"GNMTrainer {a['gnm_seconds_per_example'] * 1e3:.1f} ms/example (batch {a['batch_size']}{grouped})"
        rows.append(("a", "training vs published loop as it runs (batch 1, dynamic padding, fp32 copy)",
                     f"{ours}; published {a['published_seconds_per_example'] * 1e3:.1f} ms/example",
                     f"{a['published_speedup']:.2f}x", f">= 5x {verdict('a', a['published_speedup'])}"))  # fmt: skip
        rows.append(("a'", f"strawman: every sequence padded to {a['strawman_padded_length']} tokens",
                     f"strawman {a['strawman_seconds_per_example'] * 1e3:.1f} ms/example",
                     f"{a['strawman_speedup']:.2f}x", f">= 5x {verdict('a', a['strawman_speedup'])}"))  # fmt: skip
    if "b" in figures:
        b = figures["b"]
        rows.append(("b", "GNMTrainer step vs its compute floor (same batch and model)",
                     f"step {b['gnm_step_seconds'] * 1e3:.1f} ms; floor {b['floor_step_seconds'] * 1e3:.1f} ms",
                     f"{b['overhead_ratio']:.3f}x", f"<= 1.2x {verdict('b', b['overhead_ratio'])}"))  # fmt: skip
    if "c" in figures:
        c = figures["c"]
        v = c["variants"]
        describe = lambda name: f"{v[name]['peak_mib']:.0f} MiB (+{v[name]['increase_mib']:.0f})"  # noqa: E731
        size = f"{c['model_parameters'] / 1e6:.0f}M" if c["model_parameters"] >= 1e6 else f"{c['model_parameters']}"
        rows.append(("c", f"peak memory, LoRA klr vs no reference term ({size}-parameter model)",
                     f"klr {describe('klr_adapter_disabled')}; no reference {describe('no_reference')}",
                     f"{c['klr_over_no_reference']:.3f}x",
                     f"<= 1.1x {verdict('c', c['klr_over_no_reference'])}"))  # fmt: skip
        rows.append(("c'", "peak memory, reference as a second copy vs adapter-disabled",
                     f"copy {describe('klr_copy')}", f"{c['copy_over_klr']:.3f}x", "(information)"))  # fmt: skip
    if "d" in figures:
        d = figures["d"]
        rows.append(("d", f"evaluation, batched vs one at a time ({d['rows']} rows, {d['mia_documents']} MIA docs)",
                     f"batched {d['batched_seconds']:.1f} s; one by one {d['one_by_one_seconds']:.1f} s; "
                     f"generation {d['generation_speedup']:.1f}x, NLL {d['nll_speedup']:.2f}x; "
                     f"same generations: {d['same_generations']}, same scores: {d['same_scores']}",
                     f"{d['speedup']:.2f}x", f">= 5x {verdict('d', d['speedup'])}"))  # fmt: skip
    if "e" in figures:
        e = figures["e"]
        rows.append(("e", f"LLM negatives, batch {e['batch_size']} vs 1 ({e['rows']} rows x {e['levels']} levels)",
                     f"batched {e['batched_seconds']:.1f} s; sequential {e['sequential_seconds']:.1f} s; "
                     f"same outputs: {e['same_outputs']}",
                     f"{e['speedup']:.2f}x", f">= 4x {verdict('e', e['speedup'])}"))  # fmt: skip
    return rows


def format_table(rows) -> str:
    lines = ["| | measurement | figures | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def tiny(preset: Preset) -> Preset:
    """`preset` with the smoke preset's model sizes and counts (its batch sizes kept): a CPU dry run of its code."""
    smoke = PRESETS["smoke"]
    kept = {"train_batch_size", "eval_batch_size", "negative_batch_size", "memory_batch_size"}
    return replace(smoke, **{name: getattr(preset, name) for name in kept})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the preset's code with the smoke sizes (a dry run)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="measurements to run, e.g. a,d (default all)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON of every figure (default %(default)s)")
    parser.add_argument("--data", default=DEFAULT_LUME, help="LUME folder; the synthetic set is used when it is absent")
    parser.add_argument("--train-task", choices=["Task1", "Task2", "Task3"],
                        help="(a), (b), (c): train on rows of this task only (similar lengths); default all rows")
    parser.add_argument("--group-by-length", action="store_true",
                        help="(a), (b): GNMTrainer with train_sampling_strategy=group_by_length (less padding)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an integer field of the preset, e.g. --set eval_batch_size=32 (repeatable)")
    parser.add_argument("--memory-variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(MEASUREMENTS))
    if unknown or not chosen:
        parser.error(f"--only: expected some of {','.join(MEASUREMENTS)}, got {args.only!r}")
    args.only = [name for name in MEASUREMENTS if name in chosen]
    integer_fields = {name for name, value in asdict(PRESETS["cpu"]).items() if isinstance(value, int)}
    args.overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in integer_fields or not value.isdigit():
            parser.error(f"--set {item}: expected FIELD=INTEGER with FIELD among {', '.join(sorted(integer_fields))}")
        args.overrides[name] = int(value)
    return args


def summarise(args, preset: Preset, data: Data, figures: dict, seconds: dict) -> dict:
    rows = table_rows(figures)
    table = format_table(rows)
    return {
        "preset": args.preset + (" (tiny)" if args.tiny else ""), "preset_sizes": asdict(preset), "data": data.source,
        "machine": machine(), "targets": {name: {"target": target, "ratio_must_be": "at least" if way == "min" else
                                                 "at most"} for name, (target, way) in TARGETS.items()},
        "figures": figures, "verdicts": {row[0]: row[4] for row in rows}, "table": table,
        "measurement_seconds": seconds,
    }  # fmt: skip


def main(argv=None) -> dict:
    import torch

    from gnm_trainer.io_utils import atomic_write_json

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = replace(tiny(PRESETS[args.preset]) if args.tiny else PRESETS[args.preset], **args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_data(args.data)
    with tempfile.TemporaryDirectory(prefix="gnm-speed-") as work_dir:
        if args.memory_variant:
            result = run_memory_variant(args.memory_variant, preset, data, device, work_dir, args.train_task)
            print(json.dumps(result))
            return result
        variant_argv = ["--preset", args.preset, "--data", args.data] + (["--tiny"] if args.tiny else [])
        variant_argv += (["--threads", str(args.threads)] if args.threads else [])
        variant_argv += (["--train-task", args.train_task] if args.train_task else [])
        variant_argv += [f"--set={item}" for item in args.set]
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        figures, seconds = {}, {}
        for name in args.only:
            start = time.perf_counter()
            if name in ("a", "b") and name not in figures:
                sampling = "group_by_length" if args.group_by_length else "random"
                figures["a"], figures["b"] = measure_training(preset, data, device, work_dir, args.train_task, sampling)
            elif name == "c":
                figures["c"] = measure_memory(variant_argv)
            elif name == "d":
                figures["d"] = measure_evaluation(preset, data, device)
            elif name == "e":
                figures["e"] = measure_negatives(preset, data, device)
            seconds[name] = time.perf_counter() - start
            print(f"[{name}] done in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
            # Written after every measurement, so that a run cut short (a GPU time limit) keeps what it measured.
            kept = {key: value for key, value in figures.items() if key in args.only}
            atomic_write_json(args.output, summarise(args, preset, data, kept, seconds))
    summary = summarise(args, preset, data, {key: figures[key] for key in args.only}, seconds)
    print(summary["table"])
    atomic_write_json(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
