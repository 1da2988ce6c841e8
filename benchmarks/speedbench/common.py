"""What every measurement shares: presets, data, models, clocks, and the step's layout (packed or padded)."""

import os
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Sizes of one run. `model` and `memory_model` are `build_tiny_llama` arguments."""

    model: dict  # (a), (b), (d), (e) and the step-memory variants of (c)
    vocab_size: int
    train_rows: int  # forget rows the training measurements draw their batches from
    train_batch_size: int  # (a), (b) and the step-memory variants of (c): the trainer's batch
    warmup_steps: int
    measured_steps: int
    memory_model: dict  # (c): klr against no reference term
    memory_batch_size: int
    memory_steps: int
    memory_max_length: int
    step_memory_steps: int  # (c): packed against padded step, full lengths; the first step is not measured
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
        memory_model=TINY, memory_batch_size=2, memory_steps=1, memory_max_length=64, step_memory_steps=2,
        eval_rows=8, mia_documents=4, max_new_tokens=8, eval_batch_size=16, negative_rows=4, negative_levels=2,
        negative_batch_size=16, negative_max_new_tokens=8,
    ),
    "cpu": Preset(
        model=TARGET_SIZE, vocab_size=4096, train_rows=256, train_batch_size=8, warmup_steps=2, measured_steps=6,
        memory_model=LLAMA_100M, memory_batch_size=2, memory_steps=2, memory_max_length=128, step_memory_steps=3,
        eval_rows=96, mia_documents=120, max_new_tokens=64, eval_batch_size=16, negative_rows=32, negative_levels=3,
        negative_batch_size=16, negative_max_new_tokens=64,
    ),
    "gpu": Preset(
        model=LLAMA_100M, vocab_size=8192, train_rows=512, train_batch_size=8, warmup_steps=3, measured_steps=10,
        memory_model=LLAMA_300M, memory_batch_size=8, memory_steps=3, memory_max_length=512, step_memory_steps=3,
        eval_rows=32, mia_documents=80, max_new_tokens=64, eval_batch_size=32, negative_rows=12, negative_levels=3,
        negative_batch_size=12, negative_max_new_tokens=64,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Packed or padded steps
# ---------------------------------------------------------------------------------------------------------------


def supports_padding_free() -> bool:
    """Whether this gnm_trainer has `GNMConfig.padding_free` (packed steps, issue 11)."""
    from gnm_trainer import GNMConfig

    return "padding_free" in GNMConfig.__dataclass_fields__


def padding_options(padding_free: bool | None) -> dict:
    """GNMConfig keyword arguments for the library's default step (None), a padded (False) or a packed step (True).

    A gnm_trainer without `padding_free` pads every step, so False needs no option there and True cannot be had.
    """
    if padding_free is None:
        return {}
    if supports_padding_free():
        return {"padding_free": padding_free}
    if padding_free:
        raise RuntimeError(
            "padding_free=True: this gnm_trainer has no GNMConfig.padding_free (packed steps, issue 11); "
            "the packed figures need a library that has it"
        )
    return {}


def layout_setting(padding_free: bool | None) -> str:
    """How a step was asked to lay out its sequences, as the report names it."""
    if padding_free is None:
        return "library default" + ("" if supports_padding_free() else " (no padding_free yet: padded)")
    return "packed (padding_free=True)" if padding_free else "padded (padding_free=False)"


# ---------------------------------------------------------------------------------------------------------------
# Data, tokenizer, models
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
    """A random Llama of `size` whose positions cover every sequence the tokenizer allows."""
    from gnm_trainer.target import build_tiny_llama

    return build_tiny_llama(tokenizer, max_position_embeddings=tokenizer.model_max_length, **size).to(device)


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


# ---------------------------------------------------------------------------------------------------------------
# Clocks
# ---------------------------------------------------------------------------------------------------------------


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
