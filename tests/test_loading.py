"""One loader for every accepted source, and errors that name the file, row and field."""

import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LUME_DIR, fact_rows, write_jsonl

from gnm_trainer.data import NORMALISED_COLUMNS, classify_kind, load_unlearning_data, load_unlearning_splits
from gnm_trainer.errors import GNMInputError


def test_classify_kind_handles_lume_ids():
    assert classify_kind('"2ebbbb06-ab81-4bdf-af75-0157c7178a82"sc1') == "sc"
    assert classify_kind('"2ebbbb06-ab81-4bdf-af75-0157c7178a82"qa0') == "qa"
    assert classify_kind("6714874qa4") == "qa"
    assert classify_kind("retain-3") == "other"


@pytest.mark.parametrize("layout", ["harness_jsonl", "harness_parquet", "lume_jsonl", "hub_parquet"])
def test_folder_layouts(tmp_path, layout):
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    for split, rows in (("forget", forget), ("retain", retain)):
        if layout == "harness_jsonl":
            write_jsonl(tmp_path / f"{split}.jsonl", rows)
        elif layout == "harness_parquet":
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}.parquet")
        elif layout == "lume_jsonl":
            write_jsonl(tmp_path / f"{split}_train.jsonl", rows)
        else:
            (tmp_path / "data").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"{split}_train-00000-of-00001.parquet")
    forget_set, retain_set = load_unlearning_splits(str(tmp_path))
    assert forget_set.column_names == list(NORMALISED_COLUMNS)
    assert forget_set["id"] == [r["id"] for r in forget]
    assert forget_set["prompt"] == [r["input"] for r in forget]
    assert retain_set["completion"] == [r["output"] for r in retain]
    assert set(forget_set["kind"]) == {"qa"}
    assert set(forget_set["task"]) == {"Task2"}


@pytest.mark.skipif(not os.path.isdir(LUME_DIR), reason="shared LUME data not present")
def test_real_lume_folder():
    forget, retain = load_unlearning_splits(LUME_DIR)
    assert len(forget) == 1112 and len(retain) == 1136
    validation = load_unlearning_data(LUME_DIR, "forget", "validation")
    assert len(validation) == 254
    assert set(forget["kind"]) == {"sc", "qa"}
    assert set(forget["task"]) == {"Task1", "Task2", "Task3"}


def test_dataset_objects_and_trl_standard_format():
    rows = [{"prompt": "Where is Quillport?", "completion": "On the coast."}, {"prompt": "Who?", "completion": "Me."}]
    data = load_unlearning_data(datasets.Dataset.from_list(rows), "retain")
    assert data["id"] == ["retain-0", "retain-1"]
    assert data["completion"] == ["On the coast.", "Me."]
    assert data["kind"] == ["other", "other"]
    assert data["chat"] == [False, False]
    # A DatasetDict is read by split name.
    dataset_dict = datasets.DatasetDict({"forget_train": datasets.Dataset.from_list(fact_rows("forget", 0, 2))})
    assert len(load_unlearning_data(dataset_dict, "forget")) == 2


def test_trl_conversational_format_uses_the_chat_template(tiny_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Where was Borin Tal born?"}],
            "completion": [{"role": "assistant", "content": "In Quillport."}],
        }
    ]
    data = load_unlearning_data(rows, "forget", tokenizer=tiny_tokenizer)
    assert data[0]["chat"] is True
    assert data[0]["prompt"] == "<|user|> Where was Borin Tal born?</s><|assistant|>"
    assert data[0]["completion"] == " In Quillport.</s>"
    with pytest.raises(GNMInputError, match="chat template"):
        load_unlearning_data(rows, "forget", tokenizer=None)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "a", "input": None, "output": "x"}, r"row 1, field 'input': is empty \(None\)"),
        ({"id": "a", "input": "q", "output": ""}, r"row 1, field 'output': is empty"),
        ({"id": "a", "input": "q", "output": 3}, r"row 1, field 'output': expected a string, got int"),
        ({"id": "a", "question": "q", "output": "x"}, r"row 1: missing field prompt \(or input\)"),
        ({"id": "forget000qa0", "input": "q", "output": "x"}, r"row 1, field 'id': duplicate id 'forget000qa0'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "forget.jsonl"
    write_jsonl(path, [fact_rows("forget", 0, 1)[0], row])
    with pytest.raises(GNMInputError, match=message) as error:
        load_unlearning_data(str(tmp_path), "forget")
    assert str(path) in str(error.value)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(GNMInputError, match="no forget file found"):
        load_unlearning_data(str(tmp_path), "forget")
    with pytest.raises(GNMInputError, match="file or folder not found"):
        load_unlearning_data(str(tmp_path / "nowhere" / "forget.jsonl"), "forget")
    (tmp_path / "forget.jsonl").write_text("")
    with pytest.raises(GNMInputError, match="the forget set is empty"):
        load_unlearning_data(str(tmp_path), "forget")
    (tmp_path / "forget.jsonl").write_text('{"id": "a", "input": "q", "output": "x"}\n{broken\n')
    with pytest.raises(GNMInputError, match="line 2: invalid JSON"):
        load_unlearning_data(str(tmp_path), "forget")


def test_hub_dataset_id_goes_through_load_dataset(monkeypatch):
    """A Hub id is read with `datasets.load_dataset` and its `forget_train`/`retain_train` splits (as the SemEval
    dataset names them); faked here because no machine of this project reaches the Hub."""
    requested = []

    def fake_load_dataset(name):
        requested.append(name)
        return datasets.DatasetDict(
            {
                "forget_train": datasets.Dataset.from_list(fact_rows("forget", 0, 3)),
                "retain_train": datasets.Dataset.from_list(fact_rows("retain", 4, 6)),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    forget, retain = load_unlearning_splits("someorg/unlearning-data")
    assert requested == ["someorg/unlearning-data"] * 2
    assert len(forget) == 3 and len(retain) == 2
    monkeypatch.setattr(datasets, "load_dataset", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(GNMInputError, match="someorg/unlearning-data: could not load it from the Hub"):
        load_unlearning_data("someorg/unlearning-data", "forget")
