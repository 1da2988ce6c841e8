"""Evaluate a model on forget/retain rows (and MIA documents) with the SemEval-2025 Task 4 metric.

`evaluate_model` works on a model in memory (used by `gnm evaluate` and by the in-training callback);
`evaluate_path` loads a saved model, evaluates it and writes `evaluation_results.json` and `per_example.jsonl`.

Several processes (`accelerate launch`, `torchrun`): each process takes one contiguous shard of the examples and of
the MIA documents, and the scored rows and NLLs are gathered with accelerate's `gather_object` in process order, so
every process ends with the same rows, in the same order, as a single process would, and the same results. Only
the main process writes files. (The organisers' script pads the last shard with repeated examples, which counts
them twice; here nothing is repeated.) Every process must call `evaluate_model` with the same data. Models
sharded by DeepSpeed ZeRO-3 or FSDP are not supported here: generation needs the full weights on each process.

Precision (`dtype`): `evaluate_path` and `gnm evaluate` load the model in float32 by default, where batched and
one-example-at-a-time generation give the same tokens (tested), so the batch size never changes a score. The
leaderboard's numbers come from the organisers' script, which loads the model in bf16 and generates one example at a
time: `dtype="bfloat16"` with `batch_size=1` reproduces them. Batched bf16 generation can take another greedy path
than one-at-a-time bf16 where two tokens are within bf16 rounding of each other (`generation.py`).

Prompt format (`text_template`, the same name and meaning as `GNMConfig.text_template`): by default (None) each
prompt is fed raw, as the organisers do. With a template, generation is prompted with its prompt side (the text
before `{completion}`, e.g. `"{prompt} >>"` for the paper's `"{prompt} >> {completion} is the answer."`), and the
template's closing text (`" is the answer."`) is removed from the end of a generation before it is scored, so that a
model answering in its training format is scored on its answer. The MIA NLL is always computed on the raw documents,
as the organisers do: they are whole documents, not prompt/completion pairs. A template makes the evaluation a
diagnostic of the training format, not the official score; the results record it under `settings`.
"""

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ..data import load_unlearning_data, load_unlearning_splits, read_records
from ..data.collator import render_prompt, split_template
from ..errors import GNMInputError, where
from ..io_utils import atomic_write_json, atomic_write_jsonl, check_output_folder, read_json_file
from .generation import document_nll, generate_greedy
from .semeval import score_example, semeval_results

RESULTS_FILE = "evaluation_results.json"
PER_EXAMPLE_FILE = "per_example.jsonl"
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_DTYPE = "float32"  # batch-invariant: batched generation gives the one-at-a-time tokens
OFFICIAL_PROMPT = "{prompt}"  # the organisers feed each prompt raw


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
# Precision and prompt format
# ---------------------------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    """The torch dtype called `name` (one of `DTYPES`; "auto" stays "auto")."""
    import torch

    if name not in DTYPES:
        raise GNMInputError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return name if name == "auto" else getattr(torch, name)


def dtype_name(model) -> str:
    """The dtype of the model's parameters, as in `DTYPES` ("float32", "bfloat16", ...)."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


@contextlib.contextmanager
def in_dtype(model, dtype: str) -> Iterator[Any]:
    """`model` itself when `dtype` is "auto" or its own dtype, else a copy cast to `dtype` for the block.

    The model is never cast in place: casting it to a lower precision and back would round its weights.
    """
    target = torch_dtype(dtype)
    if target == "auto" or next(model.parameters()).dtype == target:
        yield model
    else:
        yield copy.deepcopy(model).to(target)  # freed when the block ends


def prompt_format(text_template: str | None) -> str:
    """The prompt side of `text_template` (the text before `{completion}`); `"{prompt}"`, the raw prompt, for None."""
    if text_template is None:
        return OFFICIAL_PROMPT
    if "{completion}" not in text_template or "{prompt}" not in split_template(text_template)[0]:
        raise GNMInputError(f"text_template: {text_template!r} must contain '{{prompt}}' followed by '{{completion}}'")
    return split_template(text_template)[0]


def closing_text(text_template: str | None) -> str:
    """What a template puts after `{completion}` (`" is the answer."` for the paper's), stripped; "" for None."""
    if text_template is None:
        return ""
    return split_template(text_template)[1].split("{completion}", 1)[1].strip()


def answer_of(generation: str, closing: str) -> str:
    """The generation without the template's closing text at its end (the generation itself without one)."""
    text = generation.rstrip()
    return text[: -len(closing)].rstrip() if closing and text.endswith(closing) else generation


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of a model in memory
# ---------------------------------------------------------------------------------------------------------------


def _examples(forget, retain, text_template: str | None = None) -> list[dict[str, Any]]:
    """One example per forget and retain row (a split given as None has none); `prompt` is the text generation is
    prompted with."""
    examples = []
    for split, source in (("forget", forget), ("retain", retain)):
        for row in [] if source is None else load_unlearning_data(source, split=split):
            prompt = row["prompt"]
            if text_template is not None:
                prompt = render_prompt(prompt, text_template, row["chat"])
            examples.append({"id": row["id"], "split": split, "task": row["task"], "prompt": prompt,
                             "reference": row["completion"]})
    return examples


def score_generations(
    examples: Sequence[dict[str, Any]], generations: Sequence[str], text_template: str | None = None
) -> list[dict[str, Any]]:
    """Per-example rows (id, split, task, kind, prompt, reference, generation, score) from examples and outputs.

    With a template that closes the completion with text of its own, the score is that of the generation without it,
    and the rows also hold that text as `answer`.
    """
    closing = closing_text(text_template)
    rows = []
    for example, generation in zip(examples, generations, strict=True):
        answer = answer_of(generation, closing)
        kind, score = score_example(example["id"], example["reference"], answer)
        row = {
            "id": example["id"], "split": example["split"], "task": example["task"], "kind": kind,
            "prompt": example["prompt"], "reference": example["reference"], "generation": generation, "score": score,
        }
        rows.append(row | {"answer": answer} if closing else row)
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
    dtype: str = "auto",
    text_template: str | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `model` with the SemEval-2025 Task 4 metric; returns `(results, per_example_rows)`.

    Args:
        forget, retain: normalised datasets (`load_unlearning_data`) or lists of rows in any accepted format; None
            for a split leaves it out (the attacks score part of the forget set alone).
        mia_members, mia_nonmembers: documents for the loss-based membership attack (both or neither).
        mmlu_score: an MMLU average computed elsewhere (enters the final score when given).
        dtype: "auto" evaluates the model as it is; "float32", "bfloat16" or "float16" evaluate a copy cast to that
            dtype when the model is in another one. The leaderboard's numbers are bf16, one example at a time
            (`batch_size=1`); batched bf16 generation can differ from them (see the module docstring).
        text_template: None feeds the raw prompts (the official format); a training template (as in
            `GNMConfig.text_template`) prompts with its prompt side and scores generations without its closing text.
            MIA documents are always scored raw.
        show_progress: tqdm bars for generation and MIA (on the main process).

    The results record `dtype`, `text_template`, `prompt_format`, `batch_size` and `max_new_tokens` under
    `settings`, beside the official keys.
    """
    if (mia_members is None) != (mia_nonmembers is None):
        raise GNMInputError("MIA needs both member and non-member documents (got only one of them)")
    prompt_side = prompt_format(text_template)
    examples = _examples(forget, retain, text_template)
    local_examples = _local_shard(examples)
    show_progress = show_progress and is_main_process()
    with in_dtype(model, dtype) as evaluated, eval_mode(evaluated):
        generations = generate_greedy(
            evaluated, tokenizer, [e["prompt"] for e in local_examples], max_new_tokens=max_new_tokens,
            batch_size=batch_size, show_progress=show_progress,
        ) if local_examples else []
        rows = _gather(score_generations(local_examples, generations, text_template))
        member_nll, nonmember_nll = mia_document_nll(evaluated, tokenizer, mia_members, mia_nonmembers, batch_size,
                                                     show_progress)
        evaluated_dtype = dtype_name(evaluated)
    results = semeval_results(rows, member_nll, nonmember_nll, mmlu_score)
    if prompt_side != OFFICIAL_PROMPT:
        results["notes"].append(f"prompts rendered as {prompt_side!r} (text_template {text_template!r}), not fed raw "
                                "as in the official evaluation; MIA documents scored raw")
    results["settings"] = {"dtype": evaluated_dtype, "text_template": text_template, "prompt_format": prompt_side,
                           "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    return results, rows


def mia_document_nll(model, tokenizer, members, nonmembers, batch_size: int, show_progress: bool):
    """`(member_nll, nonmember_nll)` of the raw documents, sharded across processes; `(None, None)` without MIA."""
    if members is None:
        return None, None
    local_documents = _local_shard(list(members) + list(nonmembers))
    local_nll = document_nll(model, tokenizer, local_documents, batch_size=batch_size,
                             show_progress=show_progress) if local_documents else []
    nll = _gather(local_nll)
    return nll[: len(members)], nll[len(members) :]


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


def load_model_and_tokenizer(model_path: str, dtype: str = DEFAULT_DTYPE):
    """A causal LM (or a PEFT adapter folder over one) and its tokenizer, on this process's device.

    `dtype` is one of `DTYPES`: "auto" keeps the checkpoint's dtype; the organisers load bf16, our default is float32
    (see the module docstring).
    """
    from ..model_loading import load_model_and_tokenizer as load_model_files

    device = _partial_state().device
    model, tokenizer = load_model_files(model_path, dtype=torch_dtype(dtype))  # one-line errors for a bad folder
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
    dtype: str = DEFAULT_DTYPE,
    text_template: str | None = None,
    show_progress: bool = True,
    attacks: str | Sequence[str] | None = None,
    attack_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the model saved at `model_path` on `data_dir` and write the results into `output_dir`.

    Writes `evaluation_results.json` and `per_example.jsonl` (and, with `report`, `report.md` and `plot.png`,
    comparing with `baseline_results`, an earlier `evaluation_results.json`, when given). Inputs are checked before
    the model is loaded. The model is loaded in `dtype` (float32 by default; `"bfloat16"` with `batch_size=1` is
    the organisers' setting, which the leaderboard's numbers come from); `text_template` and `show_progress` as in
    `evaluate_model`.

    `attacks` (names from `attacks.ATTACKS`) also runs those attacks on the model (`attacks.run_attacks`, with
    `attack_options`: `target`, `seed`, `relearn_steps`, ...) and stores their figures under the `attacks` key, beside
    the official keys, which stay as they are.
    """
    check_output_folder(output_dir, "output_dir")
    mmlu = resolve_mmlu_score(mmlu_score)
    baseline = _read_results(baseline_results) if baseline_results else None
    prompt_format(text_template), torch_dtype(dtype)  # checked before anything is loaded
    forget, retain = load_unlearning_splits(data_dir, partition=partition)
    members, nonmembers = load_mia_documents(mia_dir) if mia_dir else (None, None)
    attack_options = dict(attack_options or {})
    if attacks:
        from .attacks import check_attack_inputs

        attacks = check_attack_inputs(attacks, forget, **_attack_checks(attack_options))
    model, tokenizer = load_model_and_tokenizer(model_path, dtype)
    extra_notes = []
    if run_mmlu and mmlu is None:
        mmlu, note = run_lm_eval_mmlu(model, tokenizer, batch_size=batch_size)
        extra_notes.append(note)
    results, rows = evaluate_model(model, tokenizer, forget, retain, members, nonmembers, mmlu,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                                   text_template=text_template, show_progress=show_progress)
    results["notes"] = extra_notes + results["notes"]
    results["settings"] = {"model": model_path, "data": data_dir, "partition": partition, "mia_data": mia_dir,
                           **results["settings"]}
    if attacks:
        from .attacks import RESULTS_KEY, run_attacks

        results[RESULTS_KEY] = run_attacks(model, tokenizer, forget, retain, attacks, unlearned_rows=rows,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           text_template=text_template, show_progress=show_progress, **attack_options)
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


def _attack_checks(attack_options: dict[str, Any]) -> dict[str, Any]:
    """The options `check_attack_inputs` looks at, with `run_attacks`'s defaults for those not given."""
    from . import attacks

    return {"relearn_steps": attack_options.get("relearn_steps", attacks.DEFAULT_RELEARN_STEPS),
            "relearn_learning_rate": attack_options.get("relearn_learning_rate", attacks.DEFAULT_RELEARN_LEARNING_RATE),
            "relearn_lora_r": attack_options.get("relearn_lora_r", attacks.DEFAULT_RELEARN_LORA_R),
            "target": attack_options.get("target")}


def _read_results(path: str) -> dict[str, Any]:
    data = read_json_file(path, "baseline results file (expected an evaluation_results.json)")
    if not isinstance(data, dict) or "harmonic-mean-task-aggregate" not in data:
        raise GNMInputError(f"{where(path, field='harmonic-mean-task-aggregate')}: not an evaluation_results.json")
    return data
