"""Multi-process training and evaluation on CPU: 2 processes give what 1 process gives.

Each distributed run is `accelerate launch` with 2 processes (the repo's accelerate configs for DeepSpeed, with
`--num_processes 2 --mixed_precision no` for CPU) at per-process batch 2, compared with ONE process at batch 4 (the same
effective batch), step by step on every logged loss term, NLL and the gradient norm from trainer_state.json.

Tolerance: 1e-4 absolute on values of magnitude up to ~10 (measured: at most 1.6e-5). The runs are fp32 but not
bit-identical: 2 processes pad each half-batch to its own longest sequence (other matmul shapes) and sum the gradient
in another order (all-reduce of two half-batch means instead of one mean); the ~1e-7 relative difference of step 1
grows through Adam, which divides by sqrt(v) and so amplifies tiny differences in near-zero gradients.

The helper `distributed_scripts/gnm_with_report.py` runs the `gnm` command as the console script does and writes
what each process saw (rank, world size, ZeRO stage, how much of the reference model it holds), so a launch that
silently ran one process, or a reference replicated under ZeRO-3, fails the test. No launch sets ACCELERATE_USE_CPU:
`GNMConfig` must supply what a CPU-only multi-process launch needs by itself.

The DeepSpeed cases need the `deepspeed` extra; its first run JIT-builds a small extension, cached in
TORCH_EXTENSIONS_DIR (default here: the pytest cache), which adds 0.5-2 minutes once.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FACTS, fact_negatives, fact_rows, write_jsonl, write_workspace

from gnm_trainer.distributed import cpu_launch_overrides, parameter_counts
from gnm_trainer.reference import reference_deepspeed_config
from gnm_trainer.target import build_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "distributed_scripts", "gnm_with_report.py")
CONFIGS = os.path.join(REPO, "accelerate_configs")
TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-2  # relative to the size of the update (measured: at most 2.2e-3 on Intel, 6.75e-3 on AMD EPYC)
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
]  # fmt: skip
PEFT_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "all-linear"]
# Launcher flags per setting: plain DDP needs --multi_gpu on CPU (--cpu would start ONE process, see SPEC §4).
SETTINGS = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--config_file", os.path.join(CONFIGS, "deepspeed_zero2.yaml")],
    "zero3": ["--config_file", os.path.join(CONFIGS, "deepspeed_zero3.yaml")],
}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_launch_needs_use_cpu_for_ddp_and_gloo_for_deepspeed():
    launched = {"WORLD_SIZE": "2"}
    assert cpu_launch_overrides(launched, accelerator_available=False) == {"use_cpu": True}
    deepspeed = {**launched, "ACCELERATE_USE_DEEPSPEED": "true"}
    assert cpu_launch_overrides(deepspeed, accelerator_available=False) == {"ddp_backend": "gloo"}
    assert cpu_launch_overrides(launched, accelerator_available=True) == {}
    assert cpu_launch_overrides({}, accelerator_available=False) == {}


def test_cpu_launch_defaults_fill_only_what_the_user_left_unset(monkeypatch):
    import types

    import gnm_trainer.distributed as distributed

    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = types.SimpleNamespace(use_cpu=False, ddp_backend=None)
    assert distributed.apply_cpu_launch_defaults(args) == {"use_cpu": True} and args.use_cpu is True
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = types.SimpleNamespace(use_cpu=False, ddp_backend="ccl")
    assert distributed.apply_cpu_launch_defaults(args) == {} and args.ddp_backend == "ccl"


def test_reference_deepspeed_config_is_inference_only():
    training = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": 7},
    }  # fmt: skip
    reference = reference_deepspeed_config(training, hidden_size=8)
    assert "optimizer" not in reference and "scheduler" not in reference
    assert reference["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 64, "stage3_prefetch_bucket_size": 57, "stage3_param_persistence_threshold": 7
    }  # fmt: skip
    assert training["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}  # the training config is untouched
    for stage in (0, 1, 2):
        config = reference_deepspeed_config({"zero_optimization": {"stage": stage, "overlap_comm": True}})
        assert config["zero_optimization"] == {"stage": 0, "overlap_comm": True}


def test_parameter_counts_of_a_plain_model(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    assert parameter_counts(tiny_model) == (total, total)


# ---------------------------------------------------------------------------------------------------------------
# Workspace: a tiny target, LUME-format data, hand-made negatives, MIA documents
# ---------------------------------------------------------------------------------------------------------------


def sentence_rows(split: str, start: int, stop: int):
    """LUME sentence-completion rows (`...sc1`): the first half of a fact's sentence, the rest as the completion."""
    rows = []
    for i, (_, answer) in enumerate(FACTS[start:stop], start=start):
        words = answer.split()
        half = len(words) // 2
        rows.append({"id": f"{split}{100 + i:03d}sc1", "input": " ".join(words[:half]),
                     "output": " ".join(words[half:]), "task": "Task1", "split": split})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("distributed")
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    write_workspace(root, model, tiny_tokenizer, fact_rows("forget", 0, 8), fact_rows("retain", 0, 8))
    # Evaluation data with an odd number of examples and documents: the 2 shards are uneven.
    write_jsonl(root / "eval" / "forget.jsonl", fact_rows("forget", 0, 3) + sentence_rows("forget", 0, 2))
    write_jsonl(root / "eval" / "retain.jsonl", fact_rows("retain", 4, 6) + sentence_rows("retain", 4, 6))
    texts = [f"{q} {a}" for q, a in FACTS]
    write_jsonl(root / "mia" / "member.jsonl", [{"id": f"m{i}", "document": t} for i, t in enumerate(texts[:3])])
    write_jsonl(root / "mia" / "nonmember.jsonl", [{"id": f"n{i}", "document": t} for i, t in enumerate(texts[3:])])
    return root


@pytest.fixture(scope="module")
def launch_env(request, tmp_path_factory):
    """The launcher's environment: one thread per process, DeepSpeed's JIT-built extension cached across runs
    (in pytest's cache folder; in a temporary one when the cache plugin is off)."""
    cache = getattr(request.config, "cache", None)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.mktemp("torch_extensions")
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=extensions)
    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK"):  # the launch must work without them
        env.pop(name, None)
    return env


def unlearn_arguments(workspace, output_dir, peft: bool, batch_size: int) -> list[str]:
    arguments = [
        "--model_name_or_path", str(workspace / "target"), "--data_dir", str(workspace / "data"),
        "--negatives_path", str(workspace / "negatives.jsonl"), "--loss_terms", "ga", "klr", "gnm",
        "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--seed", "0", "--per_device_train_batch_size", str(batch_size),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    return arguments + (PEFT_FLAGS if peft else [])


def load_script():
    spec = importlib.util.spec_from_file_location("gnm_with_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_lines(log: str) -> str:
    """The lines of a launcher log that say what went wrong (the tail alone is torch's summary)."""
    keep = [line for line in log.splitlines() if re.search(r"error|terminate|abort|exception|traceback", line, re.I)]
    return "\n".join(keep[:40]) + "\n" + log[-2000:]


def launch(workspace, env, launcher_flags: list[str], command: list[str], timeout: int = 480):
    """Run `command` (script arguments) under `accelerate launch` with 2 processes. One retry: the free port
    accelerate picks can be taken by another job before gloo binds it (a real failure fails twice). A launch still
    running after `timeout` seconds (processes waiting in collectives that never line up) fails at once."""
    failures = []
    for _ in range(2):
        shutil.rmtree(command[0], ignore_errors=True)  # the report folder: no rank file left from a failed try
        returncode, log = run_process_group(LAUNCH + launcher_flags + [SCRIPT, *command], env, workspace, timeout)
        if returncode == 0:
            return
        if returncode is None:
            pytest.fail(f"the launch was still running after {timeout} s (a hang):\n{error_lines(log)}")
        failures.append(error_lines(log))
    pytest.fail("\n---\n".join(failures))


def run_process_group(command: list[str], env, cwd, timeout: int) -> tuple[int | None, str]:
    """(return code, output) of `command`; (None, output so far) when it runs past `timeout`, after killing the
    launcher and every process it started (the workers run in sessions of their own: found by parentage)."""
    import psutil  # a dependency of accelerate

    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        for child in [*launcher.children(recursive=True), launcher]:
            child.kill()
        output, _ = process.communicate()
        return None, output


def reports(report_dir) -> list[dict]:
    found = sorted(name for name in os.listdir(report_dir) if name.startswith("rank"))
    return [json.loads((report_dir / name).read_text()) for name in found]


def logged_steps(run_dir) -> list[dict[str, float]]:
    """Per-step losses, NLLs and gradient norm from trainer_state.json."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    keep = lambda key: key.startswith(("loss", "nll_")) or key == "grad_norm"  # noqa: E731
    return [{key: value for key, value in entry.items() if keep(key)} for entry in history if "loss" in entry]


def max_difference(steps, baseline_steps) -> float:
    """The largest difference of a logged value (loss, term, NLL, grad norm) from the one-process run's, absolute for
    values below 1 and relative above: float32 rounding of a reduction in another order grows with the value (under
    ZeRO-2/3, full fine-tuning, a `gnm` term of 6.03 nats differed by 1.02e-4 on an AMD EPYC, 1.7e-5 relative; the
    absolute bound failed there at 2e7cc9a already)."""
    assert len(steps) == len(baseline_steps) == 3
    assert all(step.keys() == base.keys() for step, base in zip(steps, baseline_steps))
    return max(abs(step[key] - base[key]) / max(1.0, abs(base[key]))
               for step, base in zip(steps, baseline_steps) for key in step)


def relative_update_difference(weights, baseline_weights, initial_weights) -> float:
    """‖W − W_one‖ / ‖W_one − W_0‖: how far a run's trained weights are from the one-process run's, relative to
    how far training moved them. (An elementwise bound would not hold: Adam turns gradients of order 1e-9, pure
    rounding noise, into updates of up to the learning rate, so a handful of weights differ by ~1e-4.)"""
    assert weights.keys() == baseline_weights.keys() == initial_weights.keys()
    difference = sum((weights[k].double() - baseline_weights[k].double()).pow(2).sum() for k in weights)
    update = sum((baseline_weights[k].double() - initial_weights[k].double()).pow(2).sum() for k in weights)
    return (difference / update).sqrt().item()


@pytest.fixture(scope="module")
def baselines(workspace):
    """One process at batch 4, full model and LoRA, through the same script (in this process)."""
    script = load_script()
    runs = {}
    for peft in (False, True):
        run_dir = workspace / f"one_{'peft' if peft else 'full'}"
        arguments = unlearn_arguments(workspace, run_dir, peft, batch_size=4)
        assert script.main([str(workspace / f"report_{run_dir.name}"), "unlearn", *arguments]) == 0
        runs[peft] = run_dir
    return runs


def effective_weights(run_dir, workspace, peft: bool) -> dict[str, torch.Tensor]:
    """The saved result loaded back as a user would (the adapter over the base, or the full model), as full weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if run_dir is None:
        return AutoModelForCausalLM.from_pretrained(workspace / "target").state_dict()
    if peft:
        base = AutoModelForCausalLM.from_pretrained(workspace / "target")
        return PeftModel.from_pretrained(base, run_dir).merge_and_unload().state_dict()
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


# ---------------------------------------------------------------------------------------------------------------
# Training: DDP, ZeRO-2, ZeRO-3 (LoRA and full model) against one process
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_runs(workspace, launch_env):
    """`run(setting, peft, padding_free=None)`: (run folder, report folder) of a 2-process run at batch 2 per process,
    launched once per module and shared by the tests that compare it."""
    runs = {}

    def run(setting: str, peft: bool, padding_free: bool | None = None):
        if setting.startswith("zero"):
            assert importlib.util.find_spec("deepspeed"), "DeepSpeed is needed: pip install -e '.[deepspeed]'"
        key = (setting, peft, padding_free)
        if key not in runs:
            name = f"{setting}_{'peft' if peft else 'full'}" + ("" if padding_free is None else f"_pf{int(padding_free)}")
            run_dir, report_dir = workspace / name, workspace / f"report_{name}"
            arguments = unlearn_arguments(workspace, run_dir, peft, batch_size=2)
            if padding_free is not None:
                arguments += ["--padding_free", str(padding_free).lower()]
            launch(workspace, launch_env, SETTINGS[setting], [str(report_dir), "unlearn", *arguments])
            runs[key] = (run_dir, report_dir)
        return runs[key]

    return run


@pytest.mark.parametrize(
    ("setting", "peft"),
    [("ddp", True), ("zero2", False), ("zero3", True), ("zero3", False)],
    ids=["ddp-lora", "zero2-full", "zero3-lora", "zero3-full"],
)
def test_two_processes_train_like_one(workspace, two_process_runs, baselines, setting, peft):
    """Packed rows (the default for this model) on 2 processes against 1 process."""
    name = f"{setting}_{'peft' if peft else 'full'}"
    run_dir, report_dir = two_process_runs(setting, peft)

    ranks = reports(report_dir)
    assert [r["process_index"] for r in ranks] == [0, 1], "accelerate ran fewer than 2 processes"
    assert all(r["num_processes"] == 2 for r in ranks)
    expected_type = "MULTI_CPU" if setting == "ddp" else "DEEPSPEED"
    assert {r["distributed_type"] for r in ranks} == {expected_type}
    for r in ranks:
        assert r["reference_mode"] == ("adapter_disabled" if peft else "copy")
        if peft:
            assert r["reference_type"] is None  # the adapter-disabled model itself: no second copy
            continue
        assert r["reference_type"] == "DeepSpeedEngine" and r["reference_training"] is False
        if setting == "zero3":  # sharded like the trained model, never a full replica per process
            assert r["zero_stage"] == 3 and r["zero3_init"]
            assert r["reference_local_elements"] <= 0.55 * r["reference_total_elements"]
            assert r["model_local_elements"] <= 0.55 * r["model_total_elements"]
        else:  # ZeRO-2 trains replicated weights: the reference is a stage-0 replica
            assert r["zero_stage"] == 2
            assert r["reference_local_elements"] == r["reference_total_elements"]

    steps, baseline_steps = logged_steps(run_dir), logged_steps(baselines[peft])
    difference = max_difference(steps, baseline_steps)
    weights = relative_update_difference(
        effective_weights(run_dir, workspace, peft),
        effective_weights(baselines[peft], workspace, peft),
        effective_weights(None, workspace, peft),
    )
    print(f"\n{name}: max |loss/term/grad-norm difference| over 3 steps = {difference:.2e}; "
          f"relative weight-update difference = {weights:.2e}")  # fmt: skip
    assert steps[0]["loss_klr"] < 1e-6  # the reference equals the model at step 1: a faithful copy or base
    assert difference <= TOLERANCE
    assert weights <= WEIGHT_TOLERANCE


@pytest.mark.parametrize(("setting", "peft"), [("ddp", True), ("zero2", False), ("zero3", False)],
                         ids=["ddp-lora", "zero2-full", "zero3-full"])  # fmt: skip
def test_two_processes_train_packed_like_padded(workspace, two_process_runs, setting, peft):
    """The same 2-process run padded (`--padding_free false`) and packed: the first step's terms, NLLs and gradient
    norm within 1e-5, every step within the 1-vs-2-process tolerance (Adam amplifies rounding, see the top), and the
    trained weights alike."""
    packed_dir, _ = two_process_runs(setting, peft)
    padded_dir, padded_report = two_process_runs(setting, peft, padding_free=False)
    assert [r["process_index"] for r in reports(padded_report)] == [0, 1]
    packed, padded = logged_steps(packed_dir), logged_steps(padded_dir)
    first_step = max(abs(packed[0][key] - padded[0][key]) for key in packed[0])
    difference = max_difference(packed, padded)
    weights = relative_update_difference(
        effective_weights(packed_dir, workspace, peft),
        effective_weights(padded_dir, workspace, peft),
        effective_weights(None, workspace, peft),
    )
    print(f"\n{setting}: packed vs padded, step 1 {first_step:.2e}, 3 steps {difference:.2e}, weights {weights:.2e}")
    assert first_step <= 1e-5
    assert difference <= TOLERANCE
    assert weights <= WEIGHT_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Ranks with batches of very different lengths: every process makes the same collective calls
# ---------------------------------------------------------------------------------------------------------------

HANG_TIMEOUT = 240  # seconds; a launch takes 30-40 s on 2 busy cores, DeepSpeed's first JIT build up to 2 min more


@pytest.fixture(scope="module")
def uneven_workspace(tmp_path_factory, tiny_tokenizer):
    """Forget rows alternating long (every fact in one completion, twice) and short. With sequential sampling and
    batch 1 per process, process 0 always trains on a long row and process 1 on a short one, so the forget and
    negative groups are far longer than the retain group on process 0 only (one pass per group there, `auto` on
    its own counts) and all of similar length on process 1 (one pass). Deciding per process, DDP hung after step 1
    and ZeRO-3 stopped on mismatched parameter gathers; ZeRO-2, whose forward makes no collective call, ran."""
    root = tmp_path_factory.mktemp("uneven")
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    every_fact = " ".join(answer for _, answer in FACTS)
    forget = fact_rows("forget", 0, 8)
    for row in forget[::2]:
        row["output"] = f"{every_fact} {every_fact}"
    return write_workspace(root, model, tiny_tokenizer, forget, fact_rows("retain", 0, 8))


@pytest.mark.parametrize(("setting", "peft", "padding_free"),
                         [("ddp", True, False), ("zero2", False, False), ("zero3", False, False), ("zero3", False, True)],
                         ids=["ddp-lora", "zero2-full", "zero3-full", "zero3-full-packed"])  # fmt: skip
def test_ranks_with_batches_of_different_lengths_do_not_hang(uneven_workspace, launch_env, setting, peft, padding_free):
    """Padded, `forward_passes="auto"` must decide alike on every process; packed, every process makes one pass
    whatever its number of rows."""
    if setting.startswith("zero"):
        assert importlib.util.find_spec("deepspeed"), "DeepSpeed is needed: pip install -e '.[deepspeed]'"
    name = f"uneven_{setting}_pf{int(padding_free)}"
    run_dir, report_dir = uneven_workspace / name, uneven_workspace / f"report_{name}"
    arguments = unlearn_arguments(uneven_workspace, run_dir, peft, batch_size=1)
    arguments += ["--train_sampling_strategy", "sequential", "--forward_passes", "auto"]
    arguments += ["--padding_free", str(padding_free).lower()]
    launch(uneven_workspace, launch_env, SETTINGS[setting], [str(report_dir), "unlearn", *arguments],
           timeout=HANG_TIMEOUT)  # fmt: skip

    assert [(r["process_index"], r["num_processes"]) for r in reports(report_dir)] == [(0, 2), (1, 2)]
    steps = logged_steps(run_dir)
    assert len(steps) == 3 and all(math.isfinite(value) for step in steps for value in step.values())


@pytest.mark.parametrize(("setting", "peft", "padding_free"), [("ddp", True, False), ("zero3", False, True)],
                         ids=["ddp-lora", "zero3-full-packed"])
def test_klb_with_ranks_of_different_batches_does_not_hang(uneven_workspace, launch_env, setting, peft, padding_free):
    """`klb` adds a forward pass of the base model (replicated, or sharded under ZeRO-3): every process makes it, in
    the same order, whatever its batch."""
    if setting.startswith("zero"):
        assert importlib.util.find_spec("deepspeed"), "DeepSpeed is needed: pip install -e '.[deepspeed]'"
    name = f"klb_{setting}"
    run_dir, report_dir = uneven_workspace / name, uneven_workspace / f"report_{name}"
    arguments = unlearn_arguments(uneven_workspace, run_dir, peft, batch_size=1)
    terms = arguments.index("--loss_terms")
    arguments[terms + 1 : terms + 4] = ["simnpo", "klb", "gd"]
    arguments += ["--base_model", str(uneven_workspace / "target"), "--forget_completion_only_loss", "false",
                  "--train_sampling_strategy", "sequential", "--padding_free", str(padding_free).lower()]
    launch(uneven_workspace, launch_env, SETTINGS[setting], [str(report_dir), "unlearn", *arguments],
           timeout=HANG_TIMEOUT)  # fmt: skip

    steps = logged_steps(run_dir)
    print(f"\nklb {setting}: loss_klb per step {[step['loss_klb'] for step in steps]}")
    assert len(steps) == 3 and all(math.isfinite(step["loss_klb"]) for step in steps)
    # At step 1 the base is the model (the target; LoRA's B = 0 adds exactly 0), so klb is 0 up to the rounding of
    # the two forward passes. Padded, `auto` runs the long forget rows in a pass of their own, as the base's pass
    # does: the same computation bit for bit, exactly 0. Packed, the model packs the forget rows beside the retain
    # rows and the base packs them alone: other matmul shapes, logits equal to ~1e-6, a KL of their square (measured
    # 3.1e-9). Either way far below step 2's (4e-5 to 1.4e-4), which the former bound of 1e-4 could not tell apart.
    assert abs(steps[0]["loss_klb"]) <= (1e-7 if padding_free else 0.0)
    assert steps[1]["loss_klb"] > 1e-6  # the model moved, the base did not


# ---------------------------------------------------------------------------------------------------------------
# Shards of different sizes, gradient accumulation, average_tokens_across_devices: how the loss is normalised
# ---------------------------------------------------------------------------------------------------------------

# Plain SGD at a constant rate without clipping: the update is the learning rate times the gradient, so a gradient
# normalised by the wrong count moves the weights by that factor (Adam, nearly blind to a gradient's scale, and
# clipping would hide it), and weights averaged over runs are the runs' updates averaged.
SGD_FLAGS = ["--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--max_grad_norm", "0"]
# Without this, accelerate completes the last batch of a process with examples from the start of the data set
# (`even_batches`): an uneven shard would train on duplicates that one process never sees.
UNEVEN_BATCHES = ["--accelerator_config", '{"even_batches": false}']
# Relative tolerances under SGD (float32; measured at most 8.7e-8 on the logged values and 2.4e-6 on the weights):
# the processes pack their rows apart and sum in another order, which only rounds differently, and SGD, unlike
# Adam (see the top), does not blow rounding up.
SGD_VALUE_TOLERANCE = 1e-5
SGD_WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def seven_rows(tmp_path_factory, tiny_tokenizer):
    """A target and 7 forget rows, rows 0, 1 and 6 made long (every fact in one completion). At 2 rows per batch on 2
    processes in order, without even batches, process 0 trains on rows [0, 1] then [4, 5] and process 1 on [2, 3]
    then [6] alone: the two processes' batches differ in length at every step, and in size at the second (2 rows
    against 1). One process at batch 4 trains on [0..3] then [4, 5, 6]: the same examples per optimizer step."""
    root = tmp_path_factory.mktemp("seven_rows")
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    every_fact = " ".join(answer for _, answer in FACTS)
    forget = fact_rows("forget", 0, 7)
    for index in (0, 1, 6):
        forget[index]["output"] = every_fact
    return write_workspace(root, model, tiny_tokenizer, forget, fact_rows("retain", 0, 8)), forget


def sgd_arguments(workspace, run_dir, batch_size: int, *extra: str) -> list[str]:
    """LoRA, rows in order, plain SGD; `extra` flags override (argparse keeps the last of a repeated flag)."""
    arguments = unlearn_arguments(workspace, run_dir, peft=True, batch_size=batch_size)
    return arguments + ["--train_sampling_strategy", "sequential", *SGD_FLAGS, *extra]


def relative_value_difference(steps, baseline_steps) -> float:
    """Largest |a - b| / max(1, |b|) over every logged loss, term, NLL and gradient norm of every step."""
    assert len(steps) == len(baseline_steps) and all(a.keys() == b.keys() for a, b in zip(steps, baseline_steps))
    return max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(steps, baseline_steps) for k in a)


def one_process_run(workspace, name: str, arguments):
    """The run folder of `gnm unlearn` in this process; `arguments(run_folder)` gives its arguments."""
    run_dir = workspace / name
    assert load_script().main([str(workspace / f"report_{name}"), "unlearn", *arguments(run_dir)]) == 0
    return run_dir


def two_process_run(workspace, env, name: str, arguments):
    """The run folder of `gnm unlearn` on 2 processes (DDP), checked to have run on 2."""
    run_dir, report_dir = workspace / name, workspace / f"report_{name}"
    launch(workspace, env, SETTINGS["ddp"], [str(report_dir), "unlearn", *arguments(run_dir)], timeout=HANG_TIMEOUT)
    assert [(r["process_index"], r["num_processes"]) for r in reports(report_dir)] == [(0, 2), (1, 2)]
    return run_dir


def training_entries(run_dir) -> list[dict]:
    """The training entries (those with a loss) of trainer_state.json."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def assert_same_training(two, one, workspace, what: str) -> None:
    """The 2-process run `two` logged the values and left the weights of the 1-process run `one` (relative
    differences within the SGD tolerances)."""
    values = relative_value_difference(logged_steps(two), logged_steps(one))
    weights = relative_update_difference(
        effective_weights(two, workspace, True), effective_weights(one, workspace, True),
        effective_weights(None, workspace, True),
    )  # fmt: skip
    print(f"\n{what}: logged values {values:.1e}, weights {weights:.1e} (relative)")
    assert values <= SGD_VALUE_TOLERANCE
    assert weights <= SGD_WEIGHT_TOLERANCE


def test_shards_of_different_sizes_train_like_one_process(seven_rows, launch_env):
    """2 processes whose batches differ in size and length against 1 process on the same examples per step: every
    logged term, NLL, the loss and the gradient norm, and the trained adapter, alike. Each process divides its sum
    over its examples by the step's examples over all processes (`average_tokens_across_devices`, the default)
    halved, and DDP averages the 2 gradients: the sum over the 3 examples of step 2 divided by 3, as one process
    does. (Dividing by a process's own count would weigh row 6 twice as much as rows 4 and 5.)"""
    workspace, _ = seven_rows
    one = one_process_run(workspace, "shards_one", lambda run: sgd_arguments(workspace, run, 4, "--max_steps", "2"))
    two = two_process_run(workspace, launch_env, "shards_two",
                          lambda run: sgd_arguments(workspace, run, 2, "--max_steps", "2", *UNEVEN_BATCHES))
    assert len(logged_steps(two)) == 2 and all(step["grad_norm"] > 0 for step in logged_steps(two))
    assert_same_training(two, one, workspace, "shards of 2 and 1 rows")


def test_gradient_accumulation_on_two_processes_is_one_update(seven_rows, launch_env):
    """2 processes x 2 micro-batches (process 1's second holds one row) against 1 process x 4 micro-batches over
    the same 7 rows: one optimizer step per pass over the data, the same update. Every micro-batch divides by the
    step's 7 examples (counted over the micro-batches and the processes), whatever its own size or process."""
    workspace, _ = seven_rows
    one = one_process_run(workspace, "accumulation_one", lambda run: sgd_arguments(
        workspace, run, 2, "--gradient_accumulation_steps", "4", "--max_steps", "2"))
    two = two_process_run(workspace, launch_env, "accumulation_two", lambda run: sgd_arguments(
        workspace, run, 2, "--gradient_accumulation_steps", "2", "--max_steps", "2", *UNEVEN_BATCHES))
    assert [entry["epoch"] for entry in training_entries(two)] == [1.0, 2.0]  # one update per pass over the rows
    assert_same_training(two, one, workspace, "accumulation 2 x 2 processes against 4 x 1")


def test_without_average_tokens_each_process_takes_its_own_mean(seven_rows, launch_env):
    """`average_tokens_across_devices=False`: each process divides by its own examples and DDP averages the
    processes, so on shards of 2 and 1 rows the single row weighs as much as the other two together. Expected
    independently from two one-process runs, one per shard, each a mean over its own rows: with one SGD step from
    the same start, the 2-process weights are the mean of theirs, its loss the mean of their losses, while the
    logged terms stay per-example means over all 3 rows (2:1), as `_record_metrics` gathers them."""
    workspace, forget = seven_rows
    shards = {"all": forget[:3], "a": forget[:2], "b": forget[2:3]}  # rows 0 and 1 (long) on process 0, row 2 alone
    for name, rows in shards.items():
        write_jsonl(workspace / f"data_{name}" / "forget.jsonl", rows)
        write_jsonl(workspace / f"data_{name}" / "retain.jsonl", fact_rows("retain", 0, 8))
        write_jsonl(workspace / f"negatives_{name}.jsonl", fact_negatives(rows))

    def arguments(name: str, batch_size: int, *extra: str):
        # ga and gnm only: they read nothing but each row's own text, so a shard run alone sees what the process
        # saw (klr's retain pairing follows the row's index in the whole forget set).
        data, negatives = workspace / f"data_{name}", workspace / f"negatives_{name}.jsonl"
        return lambda run: sgd_arguments(
            workspace, run, batch_size, "--max_steps", "1", "--loss_terms", "ga", "gnm", "--data_dir", str(data),
            "--negatives_path", str(negatives), *extra,
        )  # fmt: skip

    alone = {name: one_process_run(workspace, f"own_mean_{name}", arguments(name, size)) for name, size in
             (("a", 2), ("b", 1))}  # fmt: skip
    two = two_process_run(workspace, launch_env, "own_mean_two",
                          arguments("all", 2, "--average_tokens_across_devices", "false", *UNEVEN_BATCHES))

    (step,), (a,), (b,) = logged_steps(two), logged_steps(alone["a"]), logged_steps(alone["b"])
    expected = {key: (2 * a[key] + b[key]) / 3 for key in step if key.startswith(("loss_", "nll_"))}
    expected["loss"] = (a["loss"] + b["loss"]) / 2  # what was optimised: the mean of the two processes' means
    values = max(abs(step[key] - value) / max(1.0, abs(value)) for key, value in expected.items())

    start = effective_weights(None, workspace, True)
    trained = {name: effective_weights(run, workspace, True) for name, run in alone.items()}
    mean_of_processes = {k: (trained["a"][k] + trained["b"][k]) / 2 for k in start}
    weights = relative_update_difference(effective_weights(two, workspace, True), mean_of_processes, start)
    # What `average_tokens_across_devices=True` would have given: every row weighing the same (2:1).
    per_example = {k: (2 * trained["a"][k] + trained["b"][k]) / 3 for k in start}
    apart = relative_update_difference(effective_weights(two, workspace, True), per_example, start)
    print(f"\nown means: logged values {values:.1e}, weights {weights:.1e}; from the per-example update {apart:.2f}")
    # the two weightings differ here, by far more than the tolerance (measured: 2.6e-3 on the loss, 0.26 on weights)
    assert abs(expected["loss"] - (2 * a["loss"] + b["loss"]) / 3) > 100 * SGD_VALUE_TOLERANCE
    assert values <= SGD_VALUE_TOLERANCE
    assert weights <= SGD_WEIGHT_TOLERANCE
    assert apart > 100 * SGD_WEIGHT_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def test_two_process_evaluation_equals_one_process(workspace, launch_env):
    def arguments(output_dir):
        return ["--model", str(workspace / "target"), "--data", str(workspace / "eval"),
                "--mia-data", str(workspace / "mia"), "--max-new-tokens", "8", "--batch-size", "2",
                "--output-dir", str(output_dir)]  # fmt: skip

    script = load_script()
    assert script.main([str(workspace / "report_eval_one"), "evaluate", *arguments(workspace / "eval_one")]) == 0
    command = [str(workspace / "report_eval_two"), "evaluate", *arguments(workspace / "eval_two")]
    launch(workspace, launch_env, ["--multi_gpu"], command)

    ranks = reports(workspace / "report_eval_two")
    assert [(r["process_index"], r["num_processes"]) for r in ranks] == [(0, 2), (1, 2)]
    for name in ("evaluation_results.json", "per_example.jsonl"):
        assert (workspace / "eval_two" / name).read_bytes() == (workspace / "eval_one" / name).read_bytes(), name
    results = json.loads((workspace / "eval_one" / "evaluation_results.json").read_text())
    assert results["mia_loss_acc"] is not None and results["forget-set"]["Task1"]["regurgitation-score"] is not None


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 reference (the function alone: accelerate only selects FSDP on GPUs)
# ---------------------------------------------------------------------------------------------------------------


def test_fsdp2_reference_is_sharded_per_layer_and_stays_sharded(tmp_path, launch_env):
    script = os.path.join(REPO, "tests", "distributed_scripts", "fsdp2_reference.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
               str(tmp_path / "report")]  # fmt: skip
    result = subprocess.run(command, env=launch_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, error_lines(result.stdout + result.stderr)
    ranks = reports(tmp_path / "report")
    assert [r["process_index"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["reference_type"].startswith("FSDP") and r["root_sharded"] and all(r["layers_sharded"])
        assert r["reference_training"] is False and r["requires_grad"] is False
        # after a forward pass too: exactly half of every parameter on each of the 2 processes
        assert 2 * r["reference_local_elements"] == r["reference_total_elements"]
        assert r["max_logit_difference"] == 0.0  # rank 1 started from other weights: it got rank 0's
