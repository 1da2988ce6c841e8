"""Evaluate a model on forget/retain rows (and MIA documents) with the SemEval-2025 Task 4 metric.

`evaluate_model` works on a model in memory (used by `gnm evaluate` and by the in-training callback);
`evaluate_path` loads a saved model, evaluates it and writes `evaluation_results.json` and `per_example.jsonl`.

Several processes (`accelerate launch`, `torchrun`): each process takes one contiguous shard of the examples and of
the MIA documents, and the scored rows and NLLs are gathered with accelerate's `gather_object` in process order, so
every process ends with the same rows, in the same order, as a single process would, and the same results. Only
the main process writes files. (The organisers' script pads the last shard with repeated examples, which counts
them twice; here nothing is repeated.) Every process must call `evaluate_model` with the same data. Models
sharded by DeepSpeed ZeRO-3 or FSDP are not supported here: generation needs the full weights on each process.
"""

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ..data import load_unlearning_data, load_unlearning_splits, read_records
from ..errors import GNMInputError, where
from ..io_utils import atomic_write_json, atomic_write_jsonl, check_output_folder, read_json_file
from .generation import document_nll, generate_greedy
from .semeval import score_example, semeval_results

RESULTS_FILE = "evaluation_results.json"
PER_EXAMPLE_FILE = "per_example.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


def _partial_state():
    """accelerate's process state; on a machine without CUDA it must be asked for CPU processes (gloo) explicitly,
    or `torchrun` / `accelerate launch` processes each believe they are alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _process_layout() -> tuple[int, int]:
    """(number of processes, index of this one); (1, 0) when not launched in parallel."""
    state = _partial_state()
    return state.num_processes, state.process_index


def is_main_process() -> bool:
    return _process_layout()[1] == 0


def shard_bounds(total: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """`[start, stop)` of this process's contiguous shard; the first `total % num_processes` shards get one more."""
    base, extra = divmod(total, num_processes)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def _local_shard(items: Sequence[Any]) -> list[Any]:
    num_processes, process_index = _process_layout()
    start, stop = shard_bounds(len(items), num_processes, process_index)
    return list(items[start:stop])


def _gather(local_items: list[Any]) -> list[Any]:
    """All processes' items, in process order (the identity with one process)."""
    if _process_layout()[0] == 1:
        return local_items
    from accelerate.utils import gather_object

    return list(gather_object(local_items))


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode (no dropout) for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of a model in memory
# ---------------------------------------------------------------------------------------------------------------


def _examples(forget, retain) -> list[dict[str, Any]]:
    examples = []
    for split, source in (("forget", forget), ("retain", retain)):
        for row in load_unlearning_data(source, split=split):
            examples.append({"id": row["id"], "split": split, "task": row["task"], "prompt": row["prompt"],
                             "reference": row["completion"]})
    return examples


def score_generations(examples: Sequence[dict[str, Any]], generations: Sequence[str]) -> list[dict[str, Any]]:
    """Per-example rows (id, split, task, kind, prompt, reference, generation, score) from examples and outputs."""
    rows = []
    for example, generation in zip(examples, generations, strict=True):
        kind, score = score_example(example["id"], example["reference"], generation)
        rows.append({
            "id": example["id"], "split": example["split"], "task": example["task"], "kind": kind,
            "prompt": example["prompt"], "reference": example["reference"], "generation": generation, "score": score,
        })
    return rows


def evaluate_model(
    model,
    tokenizer,
    forget,
    retain,
    mia_members: Sequence[str] | None = None,
    mia_nonmembers: Sequence[str] | None = None,
    mmlu_score: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `model` with the SemEval-2025 Task 4 metric; returns `(results, per_example_rows)`.

    Args:
        forget, retain: normalised datasets (`load_unlearning_data`) or lists of rows in any accepted format.
        mia_members, mia_nonmembers: documents for the loss-based membership attack (both or neither).
        mmlu_score: an MMLU average computed elsewhere (enters the final score when given).
    """
    if (mia_members is None) != (mia_nonmembers is None):
        raise GNMInputError("MIA needs both member and non-member documents (got only one of them)")
    examples = _examples(forget, retain)
    local_examples = _local_shard(examples)
    with eval_mode(model):
        generations = generate_greedy(
            model, tokenizer, [e["prompt"] for e in local_examples], max_new_tokens=max_new_tokens, batch_size=batch_size
        ) if local_examples else []
        rows = _gather(score_generations(local_examples, generations))
        member_nll = nonmember_nll = None
        if mia_members is not None:
            documents = list(mia_members) + list(mia_nonmembers)
            local_documents = _local_shard(documents)
            local_nll = document_nll(model, tokenizer, local_documents, batch_size=batch_size) if local_documents else []
            nll = _gather(local_nll)
            member_nll, nonmember_nll = nll[: len(mia_members)], nll[len(mia_members) :]
    results = semeval_results(rows, member_nll, nonmember_nll, mmlu_score)
    return results, rows


# ---------------------------------------------------------------------------------------------------------------
# Inputs from files
# ---------------------------------------------------------------------------------------------------------------


def _mia_file(directory: str, name: str) -> str:
    for candidate in (os.path.join(directory, "mia", name), os.path.join(directory, name)):
        if os.path.isfile(candidate):
            return candidate
    raise GNMInputError(f"{directory}: no MIA file {name} (looked for mia/{name} and {name})")


def _documents(path: str) -> list[str]:
    documents = []
    for index, row in enumerate(read_records(path)):
        if "document" not in row:
            raise GNMInputError(f"{where(path, index)}: missing field 'document'; the row has {sorted(row)}")
        document = row["document"]
        if not isinstance(document, str) or not document.strip():
            raise GNMInputError(f"{where(path, index, 'document')}: expected a non-empty string, got {document!r:.60}")
        documents.append(document)
    if not documents:
        raise GNMInputError(f"{path}: no documents; expected one JSON object with a 'document' field per line")
    return documents


def load_mia_documents(directory: str) -> tuple[list[str], list[str]]:
    """`(members, nonmembers)` from `mia/member.jsonl` + `mia/nonmember.jsonl` in `directory` (or directly in it)."""
    if not os.path.isdir(directory):
        raise GNMInputError(f"{directory}: MIA folder not found (expected member.jsonl and nonmember.jsonl in it)")
    return _documents(_mia_file(directory, "member.jsonl")), _documents(_mia_file(directory, "nonmember.jsonl"))


def resolve_mmlu_score(value: float | str | None) -> float | None:
    """An MMLU average from a number, a numeric string, or a JSON file with `mmlu_average` (or `average_acc`)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = _mmlu_from_file(value)
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise GNMInputError(f"MMLU score must be an accuracy between 0 and 1, got {value}")
    return value


def _mmlu_from_file(path: str) -> float:
    if not os.path.isfile(path):
        raise GNMInputError(f"{path}: MMLU score is neither a number nor an existing JSON file")
    data = read_json_file(path, "MMLU results file")
    for key in ("mmlu_average", "average_acc"):
        if isinstance(data, dict) and isinstance(data.get(key), (int, float)):
            return float(data[key])
    raise GNMInputError(f"{where(path, field='mmlu_average')}: expected a number under 'mmlu_average' (or 'average_acc')")


def run_lm_eval_mmlu(model, tokenizer, batch_size: int = 16) -> tuple[float | None, str]:
    """MMLU accuracy (0-shot, highest-likelihood choice) with `lm_eval` when it is installed, and a note.

    Runs on the main process only and is shared with the others. Returns `(None, reason)` when lm_eval is missing.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return None, "MMLU not run: lm_eval is not installed (pip install lm_eval), pass --mmlu-score instead"
    score = None
    if is_main_process():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        with eval_mode(model):
            output = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                     tasks=["mmlu"], num_fewshot=0)
        score = float(output["results"]["mmlu"]["acc,none"])
    if _process_layout()[0] > 1:
        from accelerate.utils import broadcast_object_list

        score = broadcast_object_list([score])[0]
    return score, "MMLU run with lm_eval (task 'mmlu', 0-shot); the organisers used Open-Instruct's runner"


def load_model_and_tokenizer(model_path: str):
    """A causal LM (or a PEFT adapter folder over one) and its tokenizer, on this process's device.

    The dtype is bf16 on a GPU, as in the organisers' script, and float32 on a CPU (bf16 matmuls are slow there).
    """
    import torch

    from ..modeling import load_model_and_tokenizer as load_model_files

    device = _partial_state().device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model_files(model_path, dtype=dtype)  # one-line errors for a bad folder
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of a saved model
# ---------------------------------------------------------------------------------------------------------------


def evaluate_path(
    model_path: str,
    data_dir: str,
    output_dir: str,
    mia_dir: str | None = None,
    mmlu_score: float | str | None = None,
    partition: str = "train",
    max_new_tokens: int = 256,
    batch_size: int = 16,
    run_mmlu: bool = False,
    baseline_results: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate the model saved at `model_path` on `data_dir` and write the results into `output_dir`.

    Writes `evaluation_results.json` and `per_example.jsonl` (and, with `report`, `report.md` and `plot.png`,
    comparing with `baseline_results`, an earlier `evaluation_results.json`, when given). Inputs are checked before
    the model is loaded.
    """
    check_output_folder(output_dir, "output_dir")
    mmlu = resolve_mmlu_score(mmlu_score)
    baseline = _read_results(baseline_results) if baseline_results else None
    forget, retain = load_unlearning_splits(data_dir, partition=partition)
    members, nonmembers = load_mia_documents(mia_dir) if mia_dir else (None, None)
    model, tokenizer = load_model_and_tokenizer(model_path)
    extra_notes = []
    if run_mmlu and mmlu is None:
        mmlu, note = run_lm_eval_mmlu(model, tokenizer, batch_size=batch_size)
        extra_notes.append(note)
    results, rows = evaluate_model(model, tokenizer, forget, retain, members, nonmembers, mmlu,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    results["notes"] = extra_notes + results["notes"]
    results["settings"] = {
        "model": model_path, "data": data_dir, "partition": partition, "mia_data": mia_dir,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
    }
    if is_main_process():
        atomic_write_json(os.path.join(output_dir, RESULTS_FILE), results)
        atomic_write_jsonl(os.path.join(output_dir, PER_EXAMPLE_FILE), rows)
        if report:
            from .report import write_report

            title = f"SemEval-2025 Task 4 evaluation of {model_path}"
            if baseline is None:
                write_report(output_dir, results, title=title)
            else:
                write_report(output_dir, baseline, results, title=title)
    return results


def _read_results(path: str) -> dict[str, Any]:
    data = read_json_file(path, "baseline results file (expected an evaluation_results.json)")
    if not isinstance(data, dict) or "harmonic-mean-task-aggregate" not in data:
        raise GNMInputError(f"{where(path, field='harmonic-mean-task-aggregate')}: not an evaluation_results.json")
    return data
