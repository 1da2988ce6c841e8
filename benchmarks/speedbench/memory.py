"""(c) Peak memory, each variant in a fresh interpreter so that the peak is its own.

Two comparisons:
- the reference term: LoRA training with `klr` (the adapter-disabled reference) against the same run with `gd` in its
  place (the same sequences through the model, no reference term), and against `reference_model="copy"`, on a
  Llama whose weights dominate (short sequences);
- the layout of a step: a packed step (`padding_free=True`) against today's padded step (`padding_free=False`) on
  LUME's full lengths at the trainer's batch, the paper's terms ga+klr+gnm.

On a CPU the figures are the operating system's (VmHWM: the peak resident set of the process); large allocations
are returned to it when freed (`MALLOC_MMAP_THRESHOLD_`), so that the resident set follows what is alive. On a GPU
they are `torch.cuda.max_memory_allocated`. A step's own peak is its peak above the memory alive when it began
(weights, optimizer state), reset at every step; the first step (lazy allocations) is not counted.
"""

import json
import os
import resource
import subprocess
import sys

from .common import (
    Data,
    Preset,
    build_model,
    layout_setting,
    lora_config,
    padding_options,
    parameter_count,
    quiet,
    supports_padding_free,
    texts_of,
    training_rows,
)

# variant: the loss terms, where the reference comes from, the layout of the step, and which sizes of the preset
MEMORY_VARIANTS = {
    "no_reference": {"terms": ["ga", "gd", "gnm"], "reference": "auto", "padding_free": None, "sizes": "memory"},
    "klr_adapter_disabled": {"terms": ["ga", "klr", "gnm"], "reference": "auto", "padding_free": None,
                             "sizes": "memory"},
    "klr_copy": {"terms": ["ga", "klr", "gnm"], "reference": "copy", "padding_free": None, "sizes": "memory"},
    "padded_step": {"terms": ["ga", "klr", "gnm"], "reference": "auto", "padding_free": False, "sizes": "step"},
    "packed_step": {"terms": ["ga", "klr", "gnm"], "reference": "auto", "padding_free": True, "sizes": "step"},
}  # fmt: skip
# Allocations of at least this many bytes are mmapped, hence returned to the system when freed (glibc).
MMAP_THRESHOLD_BYTES = 128 * 1024


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


def reset_peak_rss() -> bool:
    """Set VmHWM back to the resident memory now (Linux >= 4.0); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Memory alive now, the peak since the last reset, and a reset, on a GPU or on a CPU (MiB)."""

    def __init__(self, device: str):
        self.on_gpu = device.startswith("cuda")
        self.kind = "torch.cuda.max_memory_allocated" if self.on_gpu else "VmHWM (peak resident set)"

    def now(self) -> float:
        import torch

        if self.on_gpu:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return current_rss_mib()

    def peak(self) -> float:
        import torch

        if self.on_gpu:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mib()

    def reset(self) -> bool:
        import torch

        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return True
        return reset_peak_rss()


def step_peak_callback(meter: MemoryMeter, step_peaks: list):
    """A TrainerCallback that appends each step's peak above the memory alive when it began (None: no reset)."""
    from transformers import TrainerCallback

    class StepPeak(TrainerCallback):
        process_peak = 0.0  # the whole run's peak, kept across the resets

        def on_step_begin(self, args, state, control, **kwargs):
            self.process_peak = max(self.process_peak, meter.peak())
            self.reset, self.start = meter.reset(), meter.now()

        def on_step_end(self, args, state, control, **kwargs):
            peak = meter.peak()
            step_peaks.append(peak - self.start if self.reset else None)
            self.process_peak = max(self.process_peak, peak)

    return StepPeak()


def run_memory_variant(variant: str, preset: Preset, data: Data, device: str, work_dir: str, task: str | None) -> dict:
    """Train a few steps of one variant and report its peaks and the baseline after model load (MiB)."""
    import torch

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.target import train_tokenizer

    settings = MEMORY_VARIANTS[variant]
    on_step_sizes = settings["sizes"] == "step"
    forget, retain = training_rows(data, preset, task)
    tokenizer = train_tokenizer(texts_of(forget + retain), vocab_size=preset.vocab_size)
    negatives = perturb_negatives(forget, retain, levels=3, seed=0)
    model = build_model(tokenizer, preset.model if on_step_sizes else preset.memory_model, device)
    parameters = parameter_count(model)  # before PEFT adds the adapter's
    meter = MemoryMeter(device)
    meter.reset()
    baseline = meter.now()
    lengths = {} if on_step_sizes else {"max_length": preset.memory_max_length,
                                        "max_prompt_length": preset.memory_max_length // 2}  # fmt: skip
    args = GNMConfig(
        output_dir=os.path.join(work_dir, f"memory-{variant}"), loss_terms=settings["terms"],
        reference_model=settings["reference"], **lengths, **padding_options(settings["padding_free"]),
        per_device_train_batch_size=preset.train_batch_size if on_step_sizes else preset.memory_batch_size,
        max_steps=preset.step_memory_steps if on_step_sizes else preset.memory_steps, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not meter.on_gpu, seed=0,
    )  # fmt: skip
    trainer = GNMTrainer(model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=negatives,
                         processing_class=tokenizer, peft_config=lora_config())  # fmt: skip
    step_peaks = []
    step_peak = step_peak_callback(meter, step_peaks)
    trainer.add_callback(step_peak)
    torch.manual_seed(0)
    quiet(trainer).train()
    peak = max(step_peak.process_peak, meter.peak())
    measured_steps = [value for value in step_peaks[1:] if value is not None]
    return {
        "variant": variant,
        "loss_terms": settings["terms"],
        "reference_mode": trainer.reference_mode,
        "layout": layout_setting(settings["padding_free"]),
        "model_parameters": parameters,
        "batch_size": args.per_device_train_batch_size,
        "max_length": args.max_length,
        "memory": meter.kind,
        "baseline_after_model_load_mib": baseline,
        "peak_mib": peak,
        "increase_mib": peak - baseline,
        "step_peaks_mib": step_peaks,
        "step_peak_mib": max(measured_steps) if measured_steps else None,
    }


def ratio_or_none(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def variant_environment() -> dict:
    """The environment of a variant's interpreter: freed tensors go back to the system, so VmHWM follows them."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}


def run_in_own_interpreter(script: str, variant: str, argv_for_variants: list[str]) -> dict:
    command = [sys.executable, script, "--memory-variant", variant] + argv_for_variants
    completed = subprocess.run(command, capture_output=True, text=True, env=variant_environment())
    if completed.returncode != 0:
        raise RuntimeError(f"memory variant {variant} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_memory(script: str, argv_for_variants: list[str]) -> dict:
    """(c): each variant in a fresh interpreter (`script --memory-variant NAME`), so that its peak is its own. The
    packed variant needs `GNMConfig.padding_free`; without it, it is reported as not run, with the reason."""
    variants = {}
    for variant, settings in MEMORY_VARIANTS.items():
        if settings["padding_free"] and not supports_padding_free():
            variants[variant] = {"variant": variant, "not_run": "this gnm_trainer has no GNMConfig.padding_free"}
            continue
        variants[variant] = run_in_own_interpreter(script, variant, argv_for_variants)
    none, disabled, copied = (variants[name] for name in ("no_reference", "klr_adapter_disabled", "klr_copy"))
    padded, packed = variants["padded_step"], variants["packed_step"]
    return {
        "variants": variants,
        "model_parameters": disabled["model_parameters"],
        "klr_over_no_reference": disabled["peak_mib"] / none["peak_mib"],
        "copy_over_klr": copied["peak_mib"] / disabled["peak_mib"],
        "klr_increase_over_no_reference_increase": ratio_or_none(disabled["increase_mib"], none["increase_mib"]),
        "copy_increase_over_klr_increase": ratio_or_none(copied["increase_mib"], disabled["increase_mib"]),
        "step_model_parameters": padded["model_parameters"],
        "packed_over_padded_step_peak": ratio_or_none(packed.get("step_peak_mib"), padded["step_peak_mib"]),
        "packed_over_padded_peak": ratio_or_none(packed.get("peak_mib"), padded["peak_mib"]),
    }
