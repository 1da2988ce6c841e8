"""The rows a target is trained on: the synthetic default, a LUME folder or Hub id, and deterministic subsets that
keep a document's rows together."""

import os
import random

from ..data.loading import classify_kind
from ..errors import GNMInputError, where
from .config import LUME_SPLITS, MIA_SPLITS, PRETRAINING_SPLIT


def document_key(row_id: str) -> str:
    """The id of the document a LUME row belongs to: the id without its `sc1` / `qaN` suffix."""
    return row_id[:-3] if classify_kind(row_id) in ("sc", "qa") else row_id


def _lume_rows(source, split: str, partition: str, name: str) -> list[dict[str, str]]:
    """One split of any accepted source, checked by the loader, as LUME rows (id, input, output, task, split)."""
    from ..data import load_unlearning_data

    dataset = load_unlearning_data(source, split, partition)
    rows = []
    for index, row in enumerate(dataset):
        if row["chat"]:
            raise GNMInputError(f"{where(name, index, 'input')}: conversational rows cannot train a target model")
        rows.append(
            {"id": row["id"], "input": row["prompt"], "output": row["completion"], "task": row["task"], "split": split}
        )
    return rows


def _mia_rows(rows: list[dict], name: str) -> list[dict[str, str]]:
    """MIA rows reduced to (id, document), with errors naming the row."""
    checked = []
    for index, row in enumerate(rows):
        document = row.get("document") if isinstance(row, dict) else None
        if not isinstance(document, str) or not document.strip():
            raise GNMInputError(f"{where(name, index, 'document')}: expected a non-empty string")
        checked.append({"id": str(row.get("id", index)), "document": document})
    return checked


def _has_validation_files(folder: str, split: str) -> bool:
    """Whether `folder` holds a validation file for `split` (the harness's `forget.jsonl` names no partition)."""
    from ..data.loading import find_split_files

    try:
        paths = find_split_files(folder, split, "validation")
    except GNMInputError:
        return False
    return all("validation" in os.path.basename(path) for path in paths)


def load_target_data(data=None, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The dataset a target is trained on, shaped like `make_synthetic_lume`'s output.

    `data` is None (the synthetic default for `seed`), a LUME-format folder (validation files, `mia/` and
    `pretraining.jsonl` are optional there), a Hub dataset id with LUME's splits (no MIA documents then) or a dict
    shaped like `make_synthetic_lume`'s output. The optional `pretraining` split (rows with `id` and `document`)
    holds documents the target reads before it memorises the rest; none of them may be a benchmark row.
    """
    from ..data.loading import looks_like_hub_id, read_records
    from ..data.synthetic import make_synthetic_lume

    if data is None:
        data = make_synthetic_lume(seed=seed)
    if isinstance(data, dict):
        loaded = {}
        for key in LUME_SPLITS:
            if data.get(key):
                split, partition = key.split("_")
                loaded[key] = _lume_rows(list(data[key]), split, partition, key)
        for key in (*MIA_SPLITS, PRETRAINING_SPLIT):
            loaded[key] = _mia_rows(list(data.get(key) or []), key)
    elif isinstance(data, str) and not os.path.exists(data) and looks_like_hub_id(data):
        loaded = {key: _lume_rows(data, *key.split("_"), f"{data}[{key}]") for key in LUME_SPLITS}
        loaded.update({key: [] for key in MIA_SPLITS})
    elif isinstance(data, (str, os.PathLike)):
        folder = os.fspath(data)
        if not os.path.isdir(folder):
            raise GNMInputError(f"{folder}: data folder not found (expected a LUME-format folder)")
        loaded = {}
        for key in LUME_SPLITS:
            split, partition = key.split("_")
            if partition == "train" or _has_validation_files(folder, split):
                loaded[key] = _lume_rows(folder, split, partition, os.path.join(folder, key))
        for key, file_name in zip(MIA_SPLITS, ("member.jsonl", "nonmember.jsonl")):
            path = os.path.join(folder, "mia", file_name)
            loaded[key] = _mia_rows(read_records(path), path) if os.path.isfile(path) else []
        path = os.path.join(folder, f"{PRETRAINING_SPLIT}.jsonl")
        loaded[PRETRAINING_SPLIT] = _mia_rows(read_records(path), path) if os.path.isfile(path) else []
    else:
        raise GNMInputError(f"data: expected None, a LUME-format folder or a dict of splits, got {type(data).__name__}")
    for key in ("forget_train", "retain_train"):
        if not loaded.get(key):
            raise GNMInputError(f"data: the {key} split is missing or empty")
    check_pretraining_is_apart(loaded)
    return loaded


def check_pretraining_is_apart(dataset: dict[str, list[dict]]) -> None:
    """A GNMInputError naming the first pretraining row whose id is a benchmark document or an MIA document: text
    the target pretrains on must not be what it is later asked to forget, retain or be attacked on."""
    benchmark = {document_key(row["id"]) for key in LUME_SPLITS for row in dataset.get(key, [])}
    benchmark |= {row["id"] for key in MIA_SPLITS for row in dataset.get(key, [])}
    for index, row in enumerate(dataset.get(PRETRAINING_SPLIT, [])):
        if row["id"] in benchmark:
            raise GNMInputError(f"{where(PRETRAINING_SPLIT, index, 'id')}: {row['id']!r} is also a benchmark or MIA "
                                "document; pretraining documents must be other text")


def draw_documents(rows: list[dict], limit: int | None, rng: random.Random) -> set[str]:
    """At most `limit` document keys of `rows`, taken round-robin across tasks in a seeded order, so that every
    task keeps documents whenever `limit` allows."""
    by_task: dict[str, set[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], set()).add(document_key(row["id"]))
    queues = []
    for task in sorted(by_task):
        keys = sorted(by_task[task])
        rng.shuffle(keys)
        queues.append(keys)
    chosen: list[str] = []
    while queues and (limit is None or len(chosen) < limit):
        for queue in list(queues):
            if limit is not None and len(chosen) >= limit:
                break
            chosen.append(queue.pop())
            if not queue:
                queues.remove(queue)
    return set(chosen)


def select_documents(
    dataset: dict[str, list[dict]], max_documents_per_split: int | None, tasks, seed: int
) -> dict[str, list[dict]]:
    """Keep only `tasks` and at most `max_documents_per_split` documents per split, drawn with `seed` across tasks.

    An sc row stays with the QA rows of its document, and rows keep their order. MIA members stay only when their
    document is kept in forget train, and non-members are thinned to as many as the members left.
    """
    if max_documents_per_split is None and not tasks:
        return dataset
    rng = random.Random(seed)
    selected: dict[str, list[dict]] = {}
    kept_forget_documents: set[str] = set()
    for key in LUME_SPLITS:
        if key not in dataset:
            continue
        rows = [row for row in dataset[key] if not tasks or row["task"] in tasks]
        chosen = draw_documents(rows, max_documents_per_split, rng)
        selected[key] = [row for row in rows if document_key(row["id"]) in chosen]
        if key == "forget_train":
            kept_forget_documents = chosen
    members = [row for row in dataset.get("mia_member", []) if row["id"] in kept_forget_documents]
    nonmembers = list(dataset.get("mia_nonmember", []))
    if len(nonmembers) > len(members):
        chosen_indices = sorted(rng.sample(range(len(nonmembers)), len(members)))
        nonmembers = [nonmembers[i] for i in chosen_indices]
    selected["mia_member"], selected["mia_nonmember"] = members, nonmembers
    selected[PRETRAINING_SPLIT] = list(dataset.get(PRETRAINING_SPLIT, []))
    for key in ("forget_train", "retain_train"):
        if not selected.get(key):
            raise GNMInputError(f"data: no {key} rows left after keeping tasks {list(tasks or [])}")
    return selected
