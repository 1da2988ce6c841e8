"""Targets, verdicts, the printed table and the machine of a run of `benchmarks/speed.py`."""

import os
import platform

# measurement: (target, "min" when the ratio must reach it, "max" when it must stay under it); (a) on a CPU
TARGETS = {
    "a": (1.5, "min"),
    "b": (1.2, "max"),
    "c": (1.1, "max"),
    "c''": (0.5, "max"),  # an aim the issue asks to report, not a requirement
    "d": (5.0, "min"),
    "e": (4.0, "min"),
}
GPU_TARGETS = {"a": (3.0, "min")}  # where a GPU is expected to do better


def targets(device: str) -> dict:
    return {**TARGETS, **(GPU_TARGETS if device.startswith("cuda") else {})}


def verdict(measurement: str, ratio: float | None, device: str) -> str:
    """The target and PASS or MISS, e.g. '>= 1.5x PASS'."""
    target, direction = targets(device)[measurement]
    wanted = f"{'>=' if direction == 'min' else '<='} {target:g}x"
    if ratio is None:
        return f"{wanted} (not run)"
    passed = ratio >= target if direction == "min" else ratio <= target
    return f"{wanted} {'PASS' if passed else 'MISS'}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def training_rows(a: dict, device: str) -> list[tuple]:
    grouped = ", grouped by length" if a.get("train_sampling_strategy") == "group_by_length" else ""
    tokens = f"{a['computed_tokens_per_step']:.0f} token positions per step for {a['real_tokens_per_step']:.0f} real"
    return [
        ("a", f"training vs published loop as it runs (batch 1, own lengths, fp32 copy); GNMTrainer batch "
              f"{a['batch_size']}{grouped}, {a['layout']}",
         f"GNMTrainer {ms(a['gnm_seconds_per_example'])}/example ({tokens}); published "
         f"{ms(a['published_seconds_per_example'])}/example; same batches as a': {a['same_batches']}",
         f"{a['published_speedup']:.2f}x", verdict("a", a["published_speedup"], device)),
        ("a'", "the same with today's padded step (padding_free=False)",
         f"padded {ms(a['padded_seconds_per_example'])}/example ({a['padded_computed_tokens_per_step']:.0f} token "
         f"positions per step); packing gain {a['packing_speedup']:.2f}x",
         f"{a['padded_published_speedup']:.2f}x", "(information)"),
        throughput_row(a),
    ]  # fmt: skip


def throughput_row(a: dict) -> tuple:
    """Tokens per second, model FLOPs utilisation and a step's peak memory of the GNMTrainer step of (a)."""
    use = a["utilisation"]
    mfu = (f"MFU {use['mfu']:.1%} of the {use['peak_tflops']:g}-TFLOPS {use['matmul_precision']} peak"
           if use["mfu"] is not None else f"MFU: no peak known for this device ({use['matmul_precision']})")
    memory = ("" if a["peak_memory_mib"] is None else
              f"; step peak memory {a['peak_memory_mib']:.0f} MiB (padded {a['padded_peak_memory_mib']:.0f} MiB)")
    return ("a''", "GNMTrainer step throughput (real tokens of the trained model, padding excluded)",
            f"{a['tokens_per_second']:.0f} tokens/s (padded step {a['padded_tokens_per_second']:.0f}); "
            f"{use['achieved_model_tflops']:.2f} model TFLOPS; {mfu}{memory}",
            "-", "(information)")  # fmt: skip


def floor_row(b: dict, device: str) -> tuple:
    return ("b", "GNMTrainer step vs its compute floor (real tokens only, packed, same batch and model)",
            f"step {ms(b['gnm_step_seconds'])}; floor {ms(b['floor_step_seconds'])}, which is "
            f"{b['published_speedup_at_floor']:.2f}x the published loop per example (the bound of a)",
            f"{b['overhead_ratio']:.3f}x", verdict("b", b["overhead_ratio"], device))  # fmt: skip


def memory_rows(c: dict, device: str) -> list[tuple]:
    v = c["variants"]
    describe = lambda name: f"{v[name]['peak_mib']:.0f} MiB (+{v[name]['increase_mib']:.0f})"  # noqa: E731
    size = lambda count: f"{count / 1e6:.0f}M" if count >= 1e6 else f"{count}"  # noqa: E731
    padded, packed = v["padded_step"], v["packed_step"]
    if "not_run" in packed:
        packed_figures = f"packed: not run ({packed['not_run']})"
    else:
        packed_figures = f"packed {packed['step_peak_mib']:.0f} MiB (process {packed['peak_mib']:.0f} MiB)"
    ratio = c["packed_over_padded_step_peak"]
    return [
        ("c", f"peak memory, LoRA klr vs no reference term ({size(c['model_parameters'])}-parameter model)",
         f"klr {describe('klr_adapter_disabled')}; no reference {describe('no_reference')}",
         f"{c['klr_over_no_reference']:.3f}x", verdict("c", c["klr_over_no_reference"], device)),
        ("c'", "peak memory, reference as a second copy vs adapter-disabled",
         f"copy {describe('klr_copy')}", f"{c['copy_over_klr']:.3f}x", "(information)"),
        ("c''", f"a step's own peak memory, packed vs padded (LUME, batch {padded['batch_size']}, "
                f"{size(c['step_model_parameters'])}-parameter model)",
         f"padded {padded['step_peak_mib']:.0f} MiB (process {padded['peak_mib']:.0f} MiB); {packed_figures}",
         "n/a" if ratio is None else f"{ratio:.3f}x", "aim " + verdict("c''", ratio, device)),
    ]  # fmt: skip


def table_rows(figures: dict, device: str) -> list[tuple[str, str, str, str, str]]:
    """(id, what, measured, ratio, target + verdict) for every measurement in `figures`."""
    rows = []
    if "a" in figures:
        rows += training_rows(figures["a"], device)
    if "b" in figures:
        rows.append(floor_row(figures["b"], device))
    if "c" in figures:
        rows += memory_rows(figures["c"], device)
    if "d" in figures:
        d = figures["d"]
        rows.append(("d", f"evaluation, batched vs one at a time ({d['rows']} rows, {d['mia_documents']} MIA docs)",
                     f"batched {d['batched_seconds']:.1f} s; one by one {d['one_by_one_seconds']:.1f} s; "
                     f"generation {d['generation_speedup']:.1f}x, NLL {d['nll_speedup']:.2f}x; "
                     f"same generations: {d['same_generations']}, same scores: {d['same_scores']}",
                     f"{d['speedup']:.2f}x", verdict("d", d["speedup"], device)))  # fmt: skip
    if "e" in figures:
        e = figures["e"]
        rows.append(("e", f"LLM negatives, batch {e['batch_size']} vs 1 ({e['rows']} rows x {e['levels']} levels)",
                     f"batched {e['batched_seconds']:.1f} s; sequential {e['sequential_seconds']:.1f} s; "
                     f"same outputs: {e['same_outputs']}",
                     f"{e['speedup']:.2f}x", verdict("e", e["speedup"], device)))  # fmt: skip
    return rows


def format_table(rows) -> str:
    lines = ["| | measurement | figures | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(), "processor": processor_name(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def processor_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
