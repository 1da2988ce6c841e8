"""Quality benchmark: unlearning methods compared on LUME with the SemEval-2025 Task 4 metric.

    python benchmarks/quality.py --preset cpu --workers 2       # about an hour on 2 CPU cores
    python benchmarks/quality.py --preset gpu                    # all of LUME, a ~100M model (GPU)
    python benchmarks/quality.py --preset smoke                  # seconds; what the test suite runs

What one run does, in order (every stage is cached in `--output`, so a re-run only does what is missing):

1. Data: LUME from `../shared/data/lume` when present, else LUME's Hub dataset id (or `--data`: a folder, a Hub id,
   or `synthetic` for the embedded LUME-format set), cut to the preset's documents per task and partition (a
   document's sentence-completion and QA rows stay together).
2. Target: `make_target` trains a tiny Llama to memorise the forget and retain rows of both partitions and the MIA
   member documents, as the organisers fine-tuned OLMo on theirs.
3. Negatives for the forget rows: the model-free backend, and the LLM backend prompted through the target itself.
4. Weight choice for "GNM (tuned)": the grid in the preset, each point unlearning the *validation* forget set with
   the validation retain set, scored by HM12 on those validation rows only. The train rows are never looked at.
5. Every method x seed unlearns the train forget set (LoRA, same optimiser, learning rate and steps for all,
   collapse guard off so that a collapse shows) and is evaluated every `eval_every` steps. Every method trains on
   GNMConfig's default text, prompt and completion joined by one space, so the raw prompts the evaluation feeds are
   the format each was trained in ("GNM (paper)" is the paper's loss and weights, not its `>> ... is the answer.`
   template, which would confound the comparison: see recipes/olmo-7b/semeval25/README.md).
6. `summary.md`, `summary.json` and `tradeoff.png` in `--output`: mean +- sd over seeds, and the curves.

The metric per evaluation: the official one (regurgitation and knowledge per task and split, HM12, MIA AUC and
score, final score without MMLU), the paper's QA ROUGE-L (F-measure, per split), a utility proxy (mean token NLL
of held-out Wikipedia documents the target never saw; MMLU cannot run offline) and a collapse check.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import DEFAULT_LUME, HERE  # noqa: E402
from quality_report import measure_model, write_summary  # noqa: E402

from gnm_trainer.io_utils import atomic_write_json, read_json_file  # noqa: E402

LUME_HUB_ID = "llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public"
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Method:
    """One unlearning method: its loss terms, weights that differ from GNMConfig's defaults, and its negatives."""

    name: str
    loss_terms: tuple[str, ...]
    weights: tuple[tuple[str, float], ...] = ()
    negatives: str | None = None  # "perturb" or "llm" for methods with the gnm term
    tuned: bool = False  # weights come from the validation grid


METHODS = (
    Method("GA", ("ga",)),
    Method("GA+GD", ("ga", "gd")),
    Method("GA+KL", ("ga", "klr")),
    Method("NPO+GD", ("npo", "gd")),
    Method("RM (GA+KL+RM)", ("ga", "klr", "rm")),
    Method("GNM (paper)", ("ga", "klr", "gnm"), negatives="perturb"),
    Method("GNM (paper, LLM negatives)", ("ga", "klr", "gnm"), negatives="llm"),
    Method("GNM (tuned on validation)", ("ga", "klr", "gnm"), negatives="perturb", tuned=True),
)


@dataclass(frozen=True)
class Preset:
    """Everything that decides the figures. Documents: partition -> task -> count (None keeps every document)."""

    documents: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    max_steps: int = 84
    eval_every: int = 21
    batch_size: int = 8
    learning_rate: float = 5e-3
    lora_r: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    curve_seeds: tuple[int, ...] = (0,)  # evaluated every `eval_every` steps; the other seeds only at the end
    negative_levels: int = 4
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    mia_nonmembers: int = 50  # non-members used by the attack; the others are the held-out utility documents
    heldout_documents: int = 50
    tuning_grid: tuple[tuple[tuple[str, float], ...], ...] = ()
    tuning_steps: int = 84  # the same number of steps as the comparison, on the smaller validation forget set
    methods: tuple[str, ...] = tuple(method.name for method in METHODS)


GNM_GRID = tuple((("ga", ga), ("gnm", gnm)) for ga in (0.5, 1.0) for gnm in (0.04, 0.2, 1.0))

PRESETS = {
    "cpu": Preset(
        documents={"train": {"Task1": 6, "Task2": 32, "Task3": 10}, "validation": {"Task1": 3, "Task2": 10, "Task3": 3}},
        target={"hidden_size": 256, "num_layers": 4, "num_heads": 4, "epochs": 40, "include_validation": True},
        tuning_grid=GNM_GRID,
    ),
    "gpu": Preset(
        documents={"train": None, "validation": None},
        target={"hidden_size": 768, "num_layers": 12, "num_heads": 12, "vocab_size": 8192, "epochs": 40,
                "learning_rate": 5e-4, "include_validation": True},
        max_steps=800, eval_every=100, batch_size=8, learning_rate=2e-4, lora_r=16, eval_batch_size=64,
        mia_nonmembers=75, heldout_documents=75, tuning_grid=GNM_GRID, tuning_steps=100,
    ),
    "smoke": Preset(
        documents={"train": {"Task1": 1, "Task2": 2, "Task3": 1}, "validation": {"Task1": 0, "Task2": 1, "Task3": 0}},
        target={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 512, "epochs": 3, "max_epochs": 3,
                "include_validation": True, "require_memorised": False},  # a smoke target memorises nothing
        max_steps=4, eval_every=2, batch_size=4, seeds=(0, 1), curve_seeds=(0, 1), negative_levels=2, max_new_tokens=16,
        mia_nonmembers=4, heldout_documents=4, tuning_grid=GNM_GRID[:2], tuning_steps=2,
        methods=("GA", "GNM (paper)", "GNM (paper, LLM negatives)", "GNM (tuned on validation)"),
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Data and target
# ---------------------------------------------------------------------------------------------------------------


def lume_subset(source, documents: dict, seed: int = 0) -> dict[str, list[dict]]:
    """The target's data: `documents[partition][task]` documents drawn with `seed` from each split of `source`
    (None for a partition or a task count keeps all), the MIA members of the kept forget documents and every
    non-member."""
    from gnm_trainer.target import document_key, load_target_data

    data = load_target_data(source)
    rng = random.Random(seed)
    subset: dict[str, list[dict]] = {}
    for key, rows in data.items():
        if key.startswith("mia"):
            continue
        counts = documents.get(key.split("_")[1])
        keep: set[str] = set()
        for task in sorted({row["task"] for row in rows}):
            keys = sorted({document_key(row["id"]) for row in rows if row["task"] == task})
            count = len(keys) if counts is None or counts.get(task) is None else min(counts[task], len(keys))
            keep |= set(rng.sample(keys, count))
        subset[key] = [row for row in rows if document_key(row["id"]) in keep]
    kept_forget = {document_key(row["id"]) for row in subset["forget_train"]}
    subset["mia_member"] = [row for row in data["mia_member"] if row["id"] in kept_forget]
    subset["mia_nonmember"] = list(data["mia_nonmember"])
    return subset


def build_target(preset: Preset, data_source: str, output: str) -> str:
    from gnm_trainer.data.synthetic import make_synthetic_lume
    from gnm_trainer.target import make_target

    if data_source == SYNTHETIC:
        data_source = make_synthetic_lume(seed=0)
    return make_target(lume_subset(data_source, preset.documents), output_dir=os.path.join(output, "target"),
                       seed=0, progress=True, **preset.target)


@dataclass(frozen=True)
class Workspace:
    """Paths that every job reads: the target and its data, the negatives, the documents for MIA and utility."""

    output: str
    target_dir: str

    @property
    def data_dir(self) -> str:
        return os.path.join(self.target_dir, "data")

    def negatives_path(self, backend: str, partition: str) -> str:
        return os.path.join(self.output, "negatives", f"{backend}_{partition}.jsonl")

    def job_path(self, job_name: str) -> str:
        return os.path.join(self.output, "runs", f"{job_name}.json")


def documents_for_evaluation(data_dir: str, preset: Preset) -> dict[str, list[str]]:
    """MIA members, the non-members the attack uses, and disjoint held-out documents for the utility proxy."""
    from gnm_trainer.evaluation import load_mia_documents

    members, nonmembers = load_mia_documents(data_dir)
    return {
        "members": members,
        "nonmembers": nonmembers[: preset.mia_nonmembers],
        "heldout": nonmembers[preset.mia_nonmembers : preset.mia_nonmembers + preset.heldout_documents],
    }


def build_negative_sets(preset: Preset, workspace: Workspace, backends: set[str]) -> dict[str, dict]:
    """Negatives for the train forget rows (each backend in use) and for the validation forget rows (perturb);
    returns, per set, its size, the share of LLM rewrites that fell back to the perturb backend and one example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnm_trainer.data import load_unlearning_splits
    from gnm_trainer.negatives import build_negatives

    stats = {}
    wanted = [(backend, "train") for backend in sorted(backends)]
    if preset.tuning_grid:
        wanted.append(("perturb", "validation"))
    for backend, partition in wanted:
        forget, retain = load_unlearning_splits(workspace.data_dir, partition)
        llm = {}
        if backend == "llm":
            tokenizer = AutoTokenizer.from_pretrained(workspace.target_dir)
            llm = {"generator": AutoModelForCausalLM.from_pretrained(workspace.target_dir), "tokenizer": tokenizer,
                   "batch_size": 32}
        started = time.perf_counter()
        rows = build_negatives(forget, backend, preset.negative_levels, workspace.negatives_path(backend, partition),
                               retain_rows=retain, seed=0, progress=False, **llm)
        print(f"[quality] negatives {backend}/{partition}: {time.perf_counter() - started:.0f} s", flush=True)
        example = forget[0]
        stats[f"{backend}/{partition}"] = {
            "rows": len(rows),
            "fallback_share": sum(row["fallback"] for row in rows) / max(1, len(rows)),
            "example": {"prompt": example["prompt"], "completion": example["completion"],
                        "levels": [row["completion"] for row in rows if row["id"] == example["id"]]},
        }
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One unlearning run and its evaluations."""

    name: str
    method: Method
    seed: int
    partition: str  # "train" for the comparison, "validation" for the weight grid
    max_steps: int
    eval_every: int
    with_mia: bool


def job_fingerprint(job: Job, preset: Preset, target_fingerprint: str) -> str:
    payload = {"job": asdict(job), "preset": asdict(preset), "target": target_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_job(job: Job, preset: Preset, workspace: Workspace, fingerprint: str, threads: int) -> dict:
    """Unlearn with `job.method`, evaluating every `eval_every` steps; writes and returns the job's record."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.data import load_unlearning_splits
    from gnm_trainer.negatives import read_negatives

    torch.set_num_threads(threads)
    started = time.perf_counter()
    forget, retain = load_unlearning_splits(workspace.data_dir, job.partition)
    documents = documents_for_evaluation(workspace.data_dir, preset) if job.with_mia else None
    tokenizer = AutoTokenizer.from_pretrained(workspace.target_dir)
    model = AutoModelForCausalLM.from_pretrained(workspace.target_dir)
    negatives = None
    if job.method.negatives:
        negatives = read_negatives(workspace.negatives_path(job.method.negatives, job.partition))
    curve: list[dict] = []

    def measure(current_model, step: int) -> None:
        metrics = measure_model(current_model, tokenizer, forget, retain, documents, preset)
        curve.append({"step": step, **metrics})
        print(f"[quality] {job.name} step {step}: HM12 {metrics['hm12']:.3f}", flush=True)

    class EvaluateEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % job.eval_every == 0 or state.global_step == state.max_steps:
                measure(model, state.global_step)

    args = GNMConfig(
        output_dir=os.path.join(workspace.output, "scratch", job.name),
        loss_terms=list(job.method.loss_terms),
        **{f"{term}_weight": weight for term, weight in job.method.weights},
        max_steps=job.max_steps,
        max_prompt_length=384,  # long Task1/Task3 prompts are cut from the left, leaving room for the completion
        per_device_train_batch_size=preset.batch_size,
        learning_rate=preset.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=max(1, job.eval_every),
        save_strategy="no",
        report_to="none",
        seed=job.seed,
        collapse_guard=False,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=preset.lora_r, lora_alpha=2 * preset.lora_r, lora_dropout=0.0, target_modules="all-linear")
    trainer = GNMTrainer(model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=negatives,
                         processing_class=tokenizer, peft_config=lora, callbacks=[EvaluateEvery()])
    trainer.train()
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "name": job.name, "method": job.method.name, "seed": job.seed, "partition": job.partition,
        "loss_terms": list(job.method.loss_terms), "weights": dict(job.method.weights),
        "fingerprint": fingerprint, "curve": curve, "log_history": losses,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(workspace.job_path(job.name), record)
    return record


def cached_record(workspace: Workspace, job: Job, fingerprint: str) -> dict | None:
    path = workspace.job_path(job.name)
    if not os.path.isfile(path):
        return None
    record = read_json_file(path, "benchmark job record")
    return record if record.get("fingerprint") == fingerprint else None


def run_jobs(jobs: list[Job], preset: Preset, workspace: Workspace, target_fingerprint: str, workers: int,
             threads: int) -> tuple[list[dict], int]:
    """Every job's record, from cache when its fingerprint matches, else run on `workers` processes; and how many
    ran."""
    records: dict[str, dict] = {}
    pending = []
    for job in jobs:
        fingerprint = job_fingerprint(job, preset, target_fingerprint)
        cached = cached_record(workspace, job, fingerprint)
        if cached is not None:
            records[job.name] = cached
        else:
            pending.append((job, fingerprint))
    print(f"[quality] {len(jobs) - len(pending)} cached, {len(pending)} to run on {workers} worker(s)", flush=True)
    if workers <= 1:
        for job, fingerprint in pending:
            records[job.name] = run_job(job, preset, workspace, fingerprint, threads)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {job.name: pool.submit(run_job, job, preset, workspace, fingerprint, threads)
                       for job, fingerprint in pending}
            for name, future in futures.items():
                records[name] = future.result()
    return [records[job.name] for job in jobs], len(pending)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def tuning_jobs(preset: Preset) -> list[Job]:
    gnm = next(method for method in METHODS if method.tuned)
    return [
        Job(f"tune_{slug(str(dict(weights)))}", replace(gnm, name="GNM grid point", weights=weights, tuned=False),
            seed=0, partition="validation", max_steps=preset.tuning_steps, eval_every=preset.tuning_steps,
            with_mia=False)
        for weights in preset.tuning_grid
    ]


def choose_weights(records: list[dict]) -> tuple[tuple[tuple[str, float], ...], list[dict]]:
    """The grid point with the best final validation HM12 (ties: the earlier point); and the grid's table."""
    table = [{"weights": record["weights"], "hm12": record["curve"][-1]["hm12"]} for record in records]
    best = max(range(len(table)), key=lambda i: (table[i]["hm12"], -i))
    return tuple(sorted(table[best]["weights"].items())), table


def comparison_jobs(preset: Preset, tuned_weights) -> list[Job]:
    jobs = []
    for method in METHODS:
        if method.name not in preset.methods:
            continue
        if method.tuned:
            method = replace(method, weights=tuned_weights)
        for seed in preset.seeds:
            eval_every = preset.eval_every if seed in preset.curve_seeds else preset.max_steps
            jobs.append(Job(f"{slug(method.name)}_seed{seed}", method, seed, "train", preset.max_steps, eval_every,
                            with_mia=True))
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", default=None, help="a LUME-format folder, a Hub dataset id, or 'synthetic' for the "
                        "embedded LUME-format set (default: ../shared/data/lume when present, else LUME's Hub id)")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/quality/<preset>")
    parser.add_argument("--workers", type=int, default=1, help="unlearning runs in parallel (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores/workers)")
    args = parser.parse_args(argv)

    import torch

    preset = PRESETS[args.preset]
    output = os.path.abspath(args.output or os.path.join(HERE, "results", "quality", args.preset))
    data_source = args.data or (os.path.normpath(DEFAULT_LUME) if os.path.isdir(DEFAULT_LUME) else LUME_HUB_ID)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    torch.set_num_threads(threads)
    wall_start = time.perf_counter()
    os.makedirs(output, exist_ok=True)

    print(f"[quality] target ({args.preset} preset, data: {data_source})", flush=True)
    target_dir = build_target(preset, data_source, output)
    target_info = read_json_file(os.path.join(target_dir, "target_info.json"), "target info")
    workspace = Workspace(output, target_dir)
    methods = [method for method in METHODS if method.name in preset.methods]
    negatives = build_negative_sets(preset, workspace, {method.negatives for method in methods if method.negatives})

    before_path = os.path.join(output, "before.json")
    before = read_json_file(before_path, "evaluation of the target") if os.path.isfile(before_path) else None
    if before is None or before.get("fingerprint") != target_info["fingerprint"]:
        from gnm_trainer.data import load_unlearning_splits
        from transformers import AutoModelForCausalLM, AutoTokenizer

        forget, retain = load_unlearning_splits(workspace.data_dir)
        model = AutoModelForCausalLM.from_pretrained(target_dir)
        metrics = measure_model(model, AutoTokenizer.from_pretrained(target_dir), forget, retain,
                                documents_for_evaluation(workspace.data_dir, preset), preset)
        before = {"fingerprint": target_info["fingerprint"], "step": 0, **metrics}
        atomic_write_json(before_path, before)

    tuned_weights, tuning_table, jobs_run = (), [], 0
    if any(method.tuned for method in methods):
        tuning, ran = run_jobs(tuning_jobs(preset), preset, workspace, target_info["fingerprint"], args.workers, threads)
        jobs_run += ran
        tuned_weights, tuning_table = choose_weights(tuning)
        print(f"[quality] weights chosen on validation: {dict(tuned_weights)}", flush=True)
    records, ran = run_jobs(comparison_jobs(preset, tuned_weights), preset, workspace, target_info["fingerprint"],
                            args.workers, threads)
    jobs_run += ran

    run_info = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "preset_settings": asdict(preset), "data": data_source,
        "target": {key: target_info[key] for key in ("parameters", "rows", "epochs", "memorised", "memorisation",
                                                     "wall_time_s", "config")},
        "negatives": negatives, "tuning": tuning_table, "tuned_weights": dict(tuned_weights), "threads_per_worker": threads,
        "workers": args.workers, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "jobs_run": jobs_run,
        "jobs_total": len(records) + len(tuning_table),
    }
    summary = write_summary(output, before, records, run_info)
    print(f"[quality] done in {run_info['wall_seconds']:.0f} s; see {output}/summary.md", flush=True)
    return summary


if __name__ == "__main__":
    main()
