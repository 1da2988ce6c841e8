"""Load forget and retain data from any accepted source into one normalised form.

Accepted sources:

- a folder in the LUME / SemEval-2025 Task 4 layout: the official harness names (`forget.jsonl`, `forget.parquet`),
  the LUME file names (`forget_train.jsonl`, ...) or the Hub dataset's parquet names
  (`data/forget_train-00000-of-00001.parquet`);
- a single `.jsonl`, `.json` or `.parquet` file;
- a Hub dataset id (through `datasets.load_dataset`);
- a `datasets.Dataset` / `DatasetDict` or a list of dicts;
- TRL's prompt/completion format, standard (strings) or conversational (lists of messages, rendered with the
  tokenizer's chat template).

Every source becomes a `datasets.Dataset` with the columns of `NORMALISED_COLUMNS`:
`id` (str), `prompt` (str), `completion` (str), `task` (str, "" when unknown), `kind` ("sc" for sentence completion,
"qa" for question answering, "other"), and `chat` (True when prompt and completion were rendered with a chat
template and must be joined verbatim).
"""

import glob
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import GNMInputError, where
from ..io_utils import decode_utf8, read_text_file

NORMALISED_COLUMNS = ("id", "prompt", "completion", "task", "kind", "chat")
SPLITS = ("forget", "retain")
# Field names accepted for the prompt and the completion, in order of preference.
PROMPT_FIELDS = ("prompt", "input")
COMPLETION_FIELDS = ("completion", "output")


def classify_kind(row_id: str) -> str:
    """Task kind from a LUME id: `...sc1` is sentence completion, `...qa0`..`qa4` question answering."""
    stem = str(row_id)[:-1]
    if stem.endswith("sc"):
        return "sc"
    if stem.endswith("qa"):
        return "qa"
    return "other"


# ---------------------------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------------------------


def split_file_candidates(directory: str, split: str, partition: str = "train") -> list[str]:
    """The file names that may hold `split` in a data folder, most specific first."""
    return [
        os.path.join(directory, f"{split}.jsonl"),
        os.path.join(directory, f"{split}.parquet"),
        os.path.join(directory, f"{split}_{partition}.jsonl"),
        os.path.join(directory, f"{split}_{partition}.parquet"),
        os.path.join(directory, "data", f"{split}_{partition}-*.parquet"),
        os.path.join(directory, f"{split}_{partition}-*.parquet"),
        os.path.join(directory, f"{split}.json"),
    ]


def find_split_files(directory: str, split: str, partition: str = "train") -> list[str]:
    """The files holding `split` ("forget" or "retain") in `directory`; a clear error when there are none."""
    if not os.path.isdir(directory):
        raise GNMInputError(f"{directory}: data folder not found (expected a folder holding forget and retain files)")
    for pattern in split_file_candidates(directory, split, partition):
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches
    tried = ", ".join(os.path.relpath(p, directory) for p in split_file_candidates(directory, split, partition))
    raise GNMInputError(f"{directory}: no {split} file found; looked for {tried}")


def read_records(path: str) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`, `.json` (a list of objects) or `.parquet` file, with errors naming file and line."""
    if not os.path.isfile(path):
        raise GNMInputError(f"{path}: file not found")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise GNMInputError(f"{path}: not a readable parquet file ({error})") from error
    if path.endswith(".json"):
        try:
            data = json.loads(read_text_file(path))
        except json.JSONDecodeError as error:
            raise GNMInputError(f"{path}: invalid JSON ({error})") from error
        if not isinstance(data, list):
            raise GNMInputError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        return data
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = decode_utf8(raw_line, path, line_number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise GNMInputError(f"{path}, line {line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise GNMInputError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_split(directory: str, split: str, partition: str = "train") -> tuple[list[dict[str, Any]], str]:
    """Raw rows of one split of a data folder, and a name for error messages."""
    paths = find_split_files(directory, split, partition)
    rows = []
    for path in paths:
        rows.extend(read_records(path))
    return rows, paths[0] if len(paths) == 1 else f"{directory} ({split} files)"


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def _pick_field(row: Mapping[str, Any], names: Iterable[str]) -> str | None:
    for name in names:
        if name in row:
            return name
    return None


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value) and len(value) > 0


def render_conversation(prompt: list, completion: list, tokenizer, source: str, row: int) -> tuple[str, str]:
    """Render TRL's conversational prompt/completion with the tokenizer's chat template, split at the prompt's end."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise GNMInputError(
            f"{where(source, row, 'prompt')}: conversational rows need a tokenizer with a chat template "
            "(pass processing_class / --model with one, or use plain prompt/completion strings)"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise GNMInputError(
            f"{where(source, row, 'completion')}: the chat template renders the prompt differently on its own and "
            "inside the full conversation, so the completion cannot be located"
        )
    return prompt_text, full_text[len(prompt_text) :]


def _text_field(row: Mapping[str, Any], field: str, source: str, index: int) -> str:
    value = row[field]
    if value is None:
        raise GNMInputError(f"{where(source, index, field)}: is empty (None); expected a non-empty string")
    if not isinstance(value, str):
        raise GNMInputError(f"{where(source, index, field)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise GNMInputError(f"{where(source, index, field)}: is empty; expected a non-empty string")
    return value


def normalise_row(row: Mapping[str, Any], index: int, source: str, split: str, tokenizer=None) -> dict[str, Any]:
    """One raw row (LUME `input`/`output` or TRL `prompt`/`completion`) in the normalised form."""
    if not isinstance(row, Mapping):
        raise GNMInputError(f"{where(source, index)}: expected a row object, got {type(row).__name__}")
    prompt_field = _pick_field(row, PROMPT_FIELDS)
    completion_field = _pick_field(row, COMPLETION_FIELDS)
    if prompt_field is None or completion_field is None:
        missing = "prompt (or input)" if prompt_field is None else "completion (or output)"
        raise GNMInputError(
            f"{where(source, index)}: missing field {missing}; the row has {sorted(row.keys())}. Expected LUME rows "
            "(id, input, output) or TRL rows (prompt, completion)"
        )
    prompt, completion = row[prompt_field], row[completion_field]
    chat = _is_conversation(prompt) or _is_conversation(completion)
    if chat:
        if not (_is_conversation(prompt) and _is_conversation(completion)):
            raise GNMInputError(
                f"{where(source, index, prompt_field)}: prompt and completion must both be lists of messages "
                "(conversational) or both be strings"
            )
        prompt, completion = render_conversation(prompt, completion, tokenizer, source, index)
    else:
        prompt = _text_field(row, prompt_field, source, index)
        completion = _text_field(row, completion_field, source, index)
    row_id = row.get("id")
    if row_id is None:
        row_id = f"{split}-{index}"
    elif not isinstance(row_id, (str, int)):
        raise GNMInputError(f"{where(source, index, 'id')}: expected a string or integer id, got {type(row_id).__name__}")
    row_id = str(row_id)
    task = row.get("task") or ""
    return {
        "id": row_id,
        "prompt": prompt,
        "completion": completion,
        "task": str(task),
        "kind": classify_kind(row_id),
        "chat": chat,
    }


def normalise_rows(rows: Iterable[Mapping[str, Any]], source: str, split: str, tokenizer=None) -> list[dict[str, Any]]:
    """Normalise every row, then check that the set is non-empty and its ids unique."""
    normalised = [normalise_row(row, index, source, split, tokenizer) for index, row in enumerate(rows)]
    if not normalised:
        raise GNMInputError(f"{source}: the {split} set is empty; expected at least one row")
    first_seen: dict[str, int] = {}
    for index, row in enumerate(normalised):
        if row["id"] in first_seen:
            raise GNMInputError(
                f"{where(source, index, 'id')}: duplicate id {row['id']!r} (first seen at row {first_seen[row['id']]}); "
                "ids must be unique so that negatives can be matched to their forget row"
            )
        first_seen[row["id"]] = index
    return normalised


def is_normalised(dataset) -> bool:
    """True when a `datasets.Dataset` already has exactly the normalised columns."""
    return set(getattr(dataset, "column_names", []) or []) == set(NORMALISED_COLUMNS)


def to_dataset(rows: list[dict[str, Any]]):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "completion": datasets.Value("string"),
            "task": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "chat": datasets.Value("bool"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _select_from_dataset_dict(dataset_dict, split: str, partition: str, source: str):
    for key in (f"{split}_{partition}", split, partition if split == "forget" else None):
        if key is not None and key in dataset_dict:
            return dataset_dict[key]
    raise GNMInputError(
        f"{source}: no '{split}_{partition}' or '{split}' split; available splits: {sorted(dataset_dict.keys())}"
    )


def load_unlearning_data(source, split: str = "forget", partition: str = "train", tokenizer=None):
    """Load one split ("forget" or "retain") of any accepted source as a normalised `datasets.Dataset`.

    Args:
        source: a data folder, a file, a Hub dataset id, a `datasets.Dataset`/`DatasetDict` or a list of dicts.
        split: which set to read from a folder, a `DatasetDict` or a Hub dataset: "forget" or "retain".
        partition: "train" or "validation" (LUME's file and split names carry it; the harness names do not).
        tokenizer: renders conversational rows with its chat template.
    """
    if split not in SPLITS:
        raise GNMInputError(f"split must be one of {SPLITS}, got {split!r}")
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source_name = f"DatasetDict[{split}]"
        source = _select_from_dataset_dict(source, split, partition, source_name)
    if isinstance(source, datasets.Dataset):
        if is_normalised(source):
            return source
        return to_dataset(normalise_rows(source, f"{split} dataset", split, tokenizer))
    if isinstance(source, list):
        return to_dataset(normalise_rows(source, f"{split} rows", split, tokenizer))
    if not isinstance(source, (str, os.PathLike)):
        raise GNMInputError(f"unsupported {split} data source of type {type(source).__name__}")
    source = os.fspath(source)
    if os.path.isdir(source):
        rows, name = read_split(source, split, partition)
        return to_dataset(normalise_rows(rows, name, split, tokenizer))
    if os.path.isfile(source):
        return to_dataset(normalise_rows(read_records(source), source, split, tokenizer))
    if not looks_like_hub_id(source):
        raise GNMInputError(f"{source}: file or folder not found")
    return _load_hub_dataset(source, split, partition, tokenizer)


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path (a Hub id is `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' or 'name' without a path prefix or a data-file suffix: worth asking the Hub for."""
    if looks_like_local_path(name):
        return False
    return not name.endswith((".jsonl", ".json", ".parquet", ".csv"))


def _load_hub_dataset(dataset_id: str, split: str, partition: str, tokenizer):
    import datasets

    try:
        dataset_dict = datasets.load_dataset(dataset_id)
    except FileNotFoundError as error:
        raise GNMInputError(f"{dataset_id}: not a local file or folder, and not a reachable Hub dataset ({error})") from error
    except Exception as error:  # network, authentication or gating errors come in many types
        raise GNMInputError(f"{dataset_id}: could not load it from the Hub ({type(error).__name__}: {error})") from error
    if isinstance(dataset_dict, datasets.Dataset):
        selected = dataset_dict
    else:
        selected = _select_from_dataset_dict(dataset_dict, split, partition, dataset_id)
    return to_dataset(normalise_rows(selected, f"{dataset_id}[{split}]", split, tokenizer))


def refuse_single_file(source, option: str | None = None) -> None:
    """A source of both sets must not be one file: it would silently become both the forget and the retain set."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        name = f"{option}: {os.fspath(source)}" if option else os.fspath(source)
        raise GNMInputError(
            f"{name} is a single file, which cannot hold both sets; expected a folder holding a forget and a retain "
            "file (forget.jsonl and retain.jsonl, or LUME's names)"
        )


def load_unlearning_splits(source, partition: str = "train", tokenizer=None):
    """Both sets of a source that holds them (folder, Hub id, `DatasetDict`): returns `(forget, retain)`."""
    refuse_single_file(source)
    forget = load_unlearning_data(source, "forget", partition, tokenizer)
    retain = load_unlearning_data(source, "retain", partition, tokenizer)
    return forget, retain
