"""The synthetic LUME-format dataset: deterministic, in LUME's row format, disjoint splits, loadable."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gnm_trainer.data import classify_kind, load_unlearning_data, read_records
from gnm_trainer.data.synthetic import (
    SPLIT_FILES,
    make_synthetic_lume,
    split_at_word,
    task_counts,
    write_synthetic_lume,
)
from gnm_trainer.target.data import check_pretraining_is_apart, document_key

LUME_KEYS = ("forget_train", "retain_train", "forget_validation", "retain_validation")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
KEY_PATTERNS = {"Task1": re.compile(rf'^"{UUID}"$'), "Task2": re.compile(rf"^{UUID}$"), "Task3": re.compile(r"^\d{8}$")}


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_lume(seed=0)


def documents_of(rows):
    """document key -> (task, sc row, qa rows) for LUME rows."""
    documents = {}
    for row in rows:
        key = row["id"][:-3]
        task, sc, qa = documents.setdefault(key, (row["task"], [], []))
        (sc if classify_kind(row["id"]) == "sc" else qa).append(row)
    return documents


def test_same_seed_same_rows_other_seed_other_rows(dataset):
    assert make_synthetic_lume(seed=0) == dataset
    other = make_synthetic_lume(seed=1)
    assert other["forget_train"] != dataset["forget_train"]
    assert {r["id"] for r in other["forget_train"]}.isdisjoint({r["id"] for r in dataset["forget_train"]})


def test_default_size_mixes_the_three_tasks_task2_heavy(dataset):
    for key in ("forget_train", "retain_train"):
        rows = dataset[key]
        assert 60 <= len(rows) <= 90
        documents = documents_of(rows)
        assert len(documents) == 24
        tasks = [task for task, _, _ in documents.values()]
        assert tasks.count("Task2") > tasks.count("Task1") >= 1 and tasks.count("Task3") >= 1
    assert 0 < len(dataset["forget_validation"]) < len(dataset["forget_train"])
    assert len(dataset["mia_member"]) == len(dataset["mia_nonmember"]) == 24


def test_rows_follow_the_lume_format(dataset):
    for key in LUME_KEYS:
        split = key.split("_")[0]
        for key_id, (task, sc, qa) in documents_of(dataset[key]).items():
            assert KEY_PATTERNS[task].match(key_id), (task, key_id)
            assert len(sc) == 1 and sc[0]["id"] == f"{key_id}sc1"
            assert [row["id"] for row in qa] == [f"{key_id}qa{i}" for i in range(len(qa))]
            assert 1 <= len(qa) <= (5 if task == "Task2" else 1)
            for row in sc + qa:
                assert set(row) == {"id", "input", "output", "task", "split"}
                assert row["split"] == split and row["task"] == task
                assert row["input"] == row["input"].strip() and row["output"] == row["output"].strip()
                assert classify_kind(row["id"]) in ("sc", "qa")


def test_task2_answers_are_the_bare_pii_facts(dataset):
    for _, (task, sc, qa) in documents_of(dataset["forget_train"]).items():
        if task != "Task2":
            continue
        document = sc[0]["input"] + " " + sc[0]["output"]
        for row in qa:
            question, answer = row["input"], row["output"]
            if "birth date" in question:
                assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
            elif "Social Security" in question:
                assert re.fullmatch(r"900\d{6}", answer) and f"{answer[:3]}-{answer[3:5]}-{answer[5:]}" in document
            elif "phone" in question:
                assert re.fullmatch(r"\d{10}", answer) and f"{answer[:3]}-{answer[3:6]}-{answer[6:]}" in document
            else:
                assert answer in document


def test_sc_rows_split_members_and_nonmembers(dataset):
    member_text = {row["id"]: row["document"] for row in dataset["mia_member"]}
    forget_documents = documents_of(dataset["forget_train"])
    assert set(member_text) == set(forget_documents)
    for key_id, (_, sc, _) in forget_documents.items():
        assert sc[0]["input"] + " " + sc[0]["output"] == member_text[key_id]
    all_keys = [key for name in LUME_KEYS for key in documents_of(dataset[name])]
    nonmember_keys = [row["id"] for row in dataset["mia_nonmember"]]
    assert len(set(all_keys + nonmember_keys)) == len(all_keys) + len(nonmember_keys)


def test_forget_and_retain_are_about_different_people(dataset):
    def people(rows):
        return {m.group(1) for row in rows for m in [re.match(r"What is the birth date of (.+)\?$", row["input"])] if m}

    def texts(rows):
        return {row["input"] + " " + row["output"] for row in rows if classify_kind(row["id"]) == "sc"}

    forget = dataset["forget_train"] + dataset["forget_validation"]
    retain = dataset["retain_train"] + dataset["retain_validation"]
    assert people(forget) and people(retain) and people(forget).isdisjoint(people(retain))
    assert texts(forget).isdisjoint(texts(retain))
    assert texts(dataset["forget_train"]).isdisjoint(texts(dataset["forget_validation"]))


def test_written_folder_loads_with_the_project_loader(tmp_path):
    sizes = dict(num_documents=6, num_validation_documents=3, num_pretraining_documents=4)
    data = make_synthetic_lume(seed=3, **sizes)
    written = write_synthetic_lume(str(tmp_path), seed=3, **sizes)
    assert set(written) == set(SPLIT_FILES)
    for key in LUME_KEYS:
        split, partition = key.split("_")
        loaded = load_unlearning_data(str(tmp_path), split, partition)
        assert loaded["id"] == [row["id"] for row in data[key]]
        assert loaded["prompt"] == [row["input"] for row in data[key]]
        assert loaded["completion"] == [row["output"] for row in data[key]]
        assert set(loaded["kind"]) <= {"sc", "qa"} and set(loaded["task"]) <= {"Task1", "Task2", "Task3"}
    assert read_records(str(tmp_path / "mia" / "member.jsonl")) == data["mia_member"]
    assert read_records(str(tmp_path / "mia" / "nonmember.jsonl")) == data["mia_nonmember"]
    assert not [p for p in tmp_path.rglob(".*")], "no temporary files left behind"


def test_task_shares_and_counts():
    assert task_counts(24, {"Task1": 0.3, "Task2": 0.4, "Task3": 0.3}) == {"Task1": 7, "Task2": 10, "Task3": 7}
    assert sum(task_counts(5, {"Task1": 1, "Task2": 1, "Task3": 1}).values()) == 5
    only_pii = make_synthetic_lume(seed=0, num_documents=4, num_validation_documents=0, task_shares={"Task2": 1})
    assert {row["task"] for row in only_pii["forget_train"]} == {"Task2"}
    assert only_pii["forget_validation"] == []
    with pytest.raises(ValueError):
        make_synthetic_lume(task_shares={"Task9": 1})


@given(st.lists(st.text(alphabet="abc\n.", min_size=1, max_size=6), min_size=2, max_size=30), st.integers(0, 99))
def test_split_at_word_rejoins_with_one_space(words, seed):
    import random

    text = " ".join(words)
    head, tail = split_at_word(text, random.Random(seed))
    assert head + " " + tail == text and head and tail


def test_pretraining_documents_are_other_documents_and_change_no_split():
    plain = make_synthetic_lume(seed=5, num_documents=6, num_validation_documents=3)
    with_pretraining = make_synthetic_lume(seed=5, num_documents=6, num_validation_documents=3,
                                           num_pretraining_documents=10)
    assert "pretraining" not in plain
    assert {key: rows for key, rows in with_pretraining.items() if key != "pretraining"} == plain
    pretraining = with_pretraining["pretraining"]
    assert len(pretraining) == 10 and {row["task"] for row in pretraining} == {"Task1", "Task2", "Task3"}
    used = {row["id"] for key, rows in plain.items() for row in rows}
    used |= {document_key(row["id"]) for key, rows in plain.items() if not key.startswith("mia") for row in rows}
    assert not {row["id"] for row in pretraining} & used
    check_pretraining_is_apart(with_pretraining)  # what make_target checks: no error
