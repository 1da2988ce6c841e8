"""make_target: a loadable target folder, the cache, atomic output, subsets, the memorisation check and the CLI."""

import json
import os

import pytest
import torch

from gnm_trainer import target as target_module
from gnm_trainer.target import build as target_build  # make_target looks its helpers up here
from gnm_trainer.evaluation import generation as generation_module
from gnm_trainer.cli import main as gnm_main
from gnm_trainer.data import load_unlearning_data
from gnm_trainer.data.synthetic import make_synthetic_lume, write_synthetic_lume
from gnm_trainer.errors import GNMInputError
from gnm_trainer.target import (
    TARGET_INFO_FILE,
    TargetConfig,
    data_fingerprint,
    TrainingExample,
    document_key,
    make_target,
    memorisation_scores,
    read_target_info,
    reproduced_fraction,
    select_documents,
    warmup_cosine,
)

LUME_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lume")
# A target small enough to train in a couple of seconds; it is not expected to memorise, so it is written marked
# `memorised: false` (require_memorised=False) for the tests of the folder itself.
TINY = dict(
    max_documents_per_split=3, hidden_size=32, num_layers=1, num_heads=2, vocab_size=300, epochs=2, max_epochs=2,
    progress=False, require_memorised=False,
)


class Retrained(Exception):
    """Raised by the patched training loop: proof that make_target tried to train."""


def refuse_training(*args, **kwargs):
    raise Retrained


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return make_target(output_dir=str(tmp_path_factory.mktemp("target") / "tiny"), **TINY)


def test_target_folder_loads_and_describes_itself(tiny_target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 32
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    info = read_target_info(tiny_target)
    assert len(info["fingerprint"]) == 64 and info["config"]["hidden_size"] == 32 and info["epochs"] == 2
    assert set(info["memorisation"]) == {"forget_train", "retain_train"}
    assert info["wall_time_s"] > 0 and info["source"] == "synthetic"
    data_dir = os.path.join(tiny_target, "data")
    forget = load_unlearning_data(data_dir, "forget", "train")
    assert len(forget) == info["rows"]["forget_train"]
    assert len({document_key(i) for i in forget["id"]}) == 3
    members = [json.loads(line) for line in open(os.path.join(data_dir, "mia", "member.jsonl"))]
    assert {m["id"] for m in members} == {document_key(i) for i in forget["id"]}
    assert not [name for name in os.listdir(os.path.dirname(tiny_target)) if name.startswith(".")]
    assert not os.path.exists(os.path.join(tiny_target, "pretrained"))  # nothing to pretrain on: no base checkpoint


def test_same_data_and_settings_hit_the_cache(tiny_target, monkeypatch):
    monkeypatch.setattr(target_build, "train_until_memorised", refuse_training)
    before = os.stat(os.path.join(tiny_target, TARGET_INFO_FILE)).st_mtime_ns
    assert make_target(output_dir=tiny_target, **TINY) == tiny_target
    assert os.stat(os.path.join(tiny_target, TARGET_INFO_FILE)).st_mtime_ns == before
    with pytest.raises(Retrained):
        make_target(output_dir=tiny_target, **{**TINY, "epochs": 3})
    with pytest.raises(Retrained):
        make_target(output_dir=tiny_target, force=True, **TINY)
    with pytest.raises(Retrained):
        make_target(output_dir=tiny_target, seed=1, **TINY)
    with pytest.raises(Retrained):  # an unmemorised target is never handed over as the finished one
        make_target(output_dir=tiny_target, **{**TINY, "require_memorised": True})


def test_failed_rebuild_leaves_the_old_target_whole(tiny_target, monkeypatch):
    info = read_target_info(tiny_target)

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(target_build, "write_lume_folder", broken_write)
    with pytest.raises(RuntimeError):
        make_target(output_dir=tiny_target, force=True, **TINY)
    assert read_target_info(tiny_target) == info
    assert not [name for name in os.listdir(os.path.dirname(tiny_target)) if name.startswith(".")]


def test_the_budget_is_not_part_of_the_fingerprint():
    """Rounds are deterministic: a target memorised within one budget is the same target under a larger one."""
    data = select_documents(target_module.load_target_data(make_synthetic_lume(seed=0)), 2, None, seed=0)
    small, large = TargetConfig(epochs=10, max_epochs=10), TargetConfig(epochs=10, max_epochs=400)
    assert data_fingerprint(data, small) == data_fingerprint(data, large)
    assert data_fingerprint(data, small) != data_fingerprint(data, TargetConfig(epochs=11, max_epochs=10))


def test_refuses_to_replace_a_folder_that_is_not_a_target(tmp_path, monkeypatch):
    monkeypatch.setattr(target_build, "train_until_memorised", refuse_training)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GNMInputError, match="not a target"):
        make_target(output_dir=str(tmp_path), **TINY)
    with pytest.raises(GNMInputError, match="hidden_size"):
        make_target(output_dir=str(tmp_path / "new"), **{**TINY, "hidden_size": 33})


def test_subset_keeps_documents_whole_and_is_deterministic():
    data = target_module.load_target_data(make_synthetic_lume(seed=2))
    first = select_documents(data, 5, ("Task2", "Task3"), seed=7)
    assert first == select_documents(data, 5, ("Task2", "Task3"), seed=7)
    for key in ("forget_train", "retain_train", "forget_validation"):
        documents = {}
        for row in first[key]:
            documents.setdefault(document_key(row["id"]), []).append(row)
        assert len(documents) <= 5 and {row["task"] for row in first[key]} <= {"Task2", "Task3"}
        for key_id, rows in documents.items():
            everything = [row for row in data[key] if document_key(row["id"]) == key_id]
            assert rows == everything, "an sc row stays with all the QA rows of its document"
    assert {row["task"] for row in first["forget_train"]} == {"Task2", "Task3"}, "a subset keeps every task"
    assert {m["id"] for m in first["mia_member"]} == {document_key(r["id"]) for r in first["forget_train"]}
    assert len(first["mia_nonmember"]) == len(first["mia_member"])


def test_small_subsets_keep_all_three_tasks_in_each_split():
    data = select_documents(target_module.load_target_data(make_synthetic_lume(seed=0)), 4, None, seed=0)
    for key in ("forget_train", "retain_train"):
        assert {row["task"] for row in data[key]} == {"Task1", "Task2", "Task3"}
        assert len({document_key(row["id"]) for row in data[key]}) == 4


def test_reads_a_lume_folder_and_subsamples_it(tmp_path):
    folder = LUME_DIR if os.path.isdir(LUME_DIR) else str(tmp_path)
    if folder == str(tmp_path):
        write_synthetic_lume(folder, seed=0)
    data = select_documents(target_module.load_target_data(folder), 2, ("Task2",), seed=0)
    assert {row["task"] for row in data["forget_train"] + data["retain_train"]} == {"Task2"}
    assert len({document_key(row["id"]) for row in data["retain_train"]}) == 2
    assert all(set(row) == {"id", "input", "output", "task", "split"} for row in data["forget_train"])


def test_reproduced_fraction_counts_the_correct_prefix():
    vocab = 10
    input_ids = torch.tensor([[1, 4, 5, 6, 7, 2], [1, 3, 8, 2, 0, 0]])
    logits = torch.zeros(2, 6, vocab)
    for row, ids in enumerate(input_ids.tolist()):
        for position in range(5):
            logits[row, position, ids[position + 1]] = 1.0  # a perfect next-token guess everywhere
    logits[0, 4, 7] = 0.0
    logits[0, 4, 9] = 2.0  # first example: wrong on its 3rd completion token (7)
    examples = [TrainingExample([1, 4, 5, 6, 7, 2], 2, "sc", "x"), TrainingExample([1, 3, 8, 2], 2, "qa", "x")]
    assert reproduced_fraction(logits, input_ids, examples) == [0.75, 1.0]


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [warmup_cosine(step, 100) for step in range(101)]
    assert factors[0] < factors[4] == 1.0 and factors[50] < 1.0 and factors[100] == pytest.approx(0.0)


def test_greedy_with_per_prompt_budgets_equals_one_prompt_at_a_time(tiny_tokenizer, tiny_model):
    from gnm_trainer.evaluation.generation import generate_greedy

    prompts = ["Where was Borin Tal born?", "What pet does Gil Sorrow keep? It is", "Hi"]
    batched = generate_greedy(tiny_model.eval(), tiny_tokenizer, prompts, [6, 3, 6], batch_size=3)
    single = [generate_greedy(tiny_model, tiny_tokenizer, [p], [budget])[0] for p, budget in zip(prompts, [6, 3, 6])]
    assert batched == single  # each row keeps its own budget, whatever its batch ran to


def test_memorisation_scores_use_the_official_measures(monkeypatch):
    rows = [
        {"id": "asc1", "input": "Alma Breck was", "output": "born in Quillport in 1950."},
        {"id": "aqa0", "input": "Where?", "output": "Quillport"},
        {"id": "aqa1", "input": "When?", "output": "1950"},
    ]
    generations = [" born in Quillport", "  quillport ", "1951"]
    monkeypatch.setattr(generation_module, "generate_greedy", lambda *args, **kwargs: generations)
    scores = memorisation_scores(None, _WhitespaceTokenizer(), rows)
    assert scores["sc_rougeL_recall"] == pytest.approx(3 / 5)
    assert scores["qa_exact_match"] == 0.5 and scores["sc_rows"] == 1 and scores["qa_rows"] == 2


class _WhitespaceTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": text.split()}


def test_memorises_a_small_pii_set_in_later_rounds_and_stops_early(tmp_path):
    """A round of 10 epochs is not enough; the next rounds (warm restarts) reach the bar within the budget."""
    data = make_synthetic_lume(seed=0, num_documents=2, num_validation_documents=0, task_shares={"Task2": 1})
    output = make_target(
        data, str(tmp_path / "t"), hidden_size=64, num_layers=2, num_heads=2, vocab_size=400, epochs=10,
        max_epochs=200, learning_rate=3e-3, batch_size=4, progress=False,
    )  # fmt: skip
    info = read_target_info(output)
    assert info["memorised"] and 10 < info["epochs"] < 200
    first_round = info["greedy_checks"][0]
    assert first_round["epoch"] == 10 and first_round["forget_train_qa_exact_match"] < 0.9  # round 1 fell short
    for scores in info["memorisation"].values():
        assert scores["sc_rougeL_recall"] >= 0.95 and scores["qa_exact_match"] >= 0.9


def test_cli_help_and_a_budget_too_small_fails_with_the_figures(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gnm_main(["make-target", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for expected in ("usage: gnm make-target", "examples:", "--max_documents_per_split", "--max_epochs", "--force"):
        assert expected in help_text
    output = str(tmp_path / "cli-target")
    argv = ["make-target", "--output_dir", output, "--max_documents_per_split", "2", "--hidden_size", "32",
            "--num_layers", "1", "--num_heads", "2", "--vocab_size", "300", "--epochs", "1", "--max_epochs", "2",
            "--quiet"]  # fmt: skip
    assert gnm_main(argv) == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert "not memorised after 2 epochs (--max_epochs 2); nothing written" in error_lines[0]
    assert [line.split(":")[0].strip() for line in error_lines[1:]] == ["forget_train", "retain_train"]
    assert all("sc ROUGE-L recall" in line and "QA exact match" in line and "(bar " in line for line in error_lines[1:])
    assert not os.path.exists(output)  # nothing that looks like a finished target
    assert gnm_main(["make-target", "--data", str(tmp_path / "missing"), "--output_dir", output, "--quiet"]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_target_data_from_a_hub_id(monkeypatch):
    """A Hub dataset id with LUME's four splits gives the target's data (no MIA documents); `load_dataset` is faked
    because no machine of this project reaches the Hub."""
    import datasets

    synthetic = make_synthetic_lume(seed=0)
    splits = ("forget_train", "retain_train", "forget_validation", "retain_validation")
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict(
        {key: datasets.Dataset.from_list(synthetic[key]) for key in splits}))
    loaded = target_module.load_target_data("someorg/lume-like")
    for key in splits:
        assert [row["id"] for row in loaded[key]] == [row["id"] for row in synthetic[key]]
        assert loaded[key][0]["input"] == synthetic[key][0]["input"]
    assert loaded["mia_member"] == [] and loaded["mia_nonmember"] == []


def pretraining_rows(count: int = 6) -> list[dict]:
    """Documents that are no benchmark row: the synthetic set of another seed, whole."""
    other = make_synthetic_lume(seed=7, num_documents=count, num_validation_documents=0)
    return [{"id": f"pre{i}", "document": row["input"] + " " + row["output"]}
            for i, row in enumerate(other["forget_train"])]


def test_pretraining_reads_other_documents_first_and_keeps_them_out_of_the_data(tmp_path):
    data = make_synthetic_lume(seed=0, num_documents=2, num_validation_documents=0)
    documents = pretraining_rows()
    output = make_target({**data, "pretraining": documents}, str(tmp_path / "t"), **{**TINY, "pretraining_epochs": 2})
    info = read_target_info(output)
    assert info["pretraining"]["documents"] == len(documents) and info["pretraining"]["epochs"] == 2
    assert len(info["pretraining"]["epoch_loss"]) == 2
    assert info["pretraining"]["epoch_loss"][1] < info["pretraining"]["epoch_loss"][0]  # it learned from them
    written = {name for _, _, names in os.walk(os.path.join(output, "data")) for name in names}
    assert written and not any("pretraining" in name for name in written)
    # The model as it was after pretraining, before any benchmark row (the `klb` term's base model): it has not
    # memorised the forget rows the target knows.
    from gnm_trainer.evaluation.generation import document_nll
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [row["input"] + " " + row["output"] for row in data["forget_train"]]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output, "pretrained"))
    base, target = (AutoModelForCausalLM.from_pretrained(path) for path in (os.path.join(output, "pretrained"), output))
    assert sum(document_nll(base, tokenizer, texts)) > sum(document_nll(target, tokenizer, texts)) + 1.0
    with_documents = data_fingerprint({**data, "pretraining": documents}, TargetConfig())
    assert with_documents != data_fingerprint({**data, "pretraining": documents}, TargetConfig(pretraining_epochs=1))
    # Without pretraining documents the setting does not matter: targets cached before it existed stay valid.
    assert data_fingerprint(data, TargetConfig()) == data_fingerprint(data, TargetConfig(pretraining_epochs=1))


def test_pretraining_on_a_benchmark_document_is_refused(tmp_path):
    data = make_synthetic_lume(seed=0, num_documents=2, num_validation_documents=0)
    taken = document_key(data["retain_train"][0]["id"])
    with pytest.raises(GNMInputError, match=r"pretraining, row \d+, field 'id'.*also a benchmark"):
        make_target({**data, "pretraining": [*pretraining_rows(1), {"id": taken, "document": "text"}]},
                    str(tmp_path / "t"), **TINY)
    assert not os.path.exists(tmp_path / "t")


def test_replay_keeps_training_on_pretraining_text_while_memorising(tmp_path):
    """Fine-tuning mixes pretraining blocks into every epoch: the target ends closer to that text than without."""
    from gnm_trainer.evaluation.generation import document_nll
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = make_synthetic_lume(seed=0, num_documents=2, num_validation_documents=0)
    documents = pretraining_rows()
    settings = {**TINY, "pretraining_epochs": 1, "epochs": 3, "max_epochs": 3}
    nll = {}
    for replay in (0.0, 1.0):
        output = make_target({**data, "pretraining": documents}, str(tmp_path / f"r{replay}"),
                             **settings, pretraining_replay=replay)
        assert read_target_info(output)["pretraining"]["replay_per_example"] == replay
        model, tokenizer = AutoModelForCausalLM.from_pretrained(output), AutoTokenizer.from_pretrained(output)
        values = document_nll(model.eval(), tokenizer, [row["document"] for row in documents], batch_size=8)
        nll[replay] = sum(values) / len(values)
    assert nll[1.0] < nll[0.0]


def test_cli_pretrains_on_synthetic_documents_and_refuses_them_with_a_folder(tmp_path, capsys, monkeypatch):
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return kwargs["output_dir"]

    monkeypatch.setattr("gnm_trainer.target.make_target", record)
    argv = ["make-target", "--output_dir", str(tmp_path / "t"), "--seed", "3", "--pretraining_documents", "5",
            "--pretraining_epochs", "2", "--pretraining_replay", "0.5", "--quiet"]
    assert gnm_main(argv) == 0
    (call,) = calls
    assert call["data"] == make_synthetic_lume(seed=3, num_pretraining_documents=5)  # the seed's dataset, plus 5
    assert (call["pretraining_epochs"], call["pretraining_replay"]) == (2, 0.5)
    for extra, expected in ((["--pretraining_documents", "-1"], "pretraining_documents: expected an integer >= 0"),
                            (["--data", str(tmp_path)], f"pretraining_documents: only for the synthetic dataset; {tmp_path}")):
        assert gnm_main([*argv, *extra]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and expected in line
    assert len(calls) == 1  # refused before any work


def test_the_tokenizer_never_reads_the_mia_documents(tmp_path, monkeypatch):
    """A tokenizer fitted to the non-members would make them familiar text, not unseen text: it is trained on the
    rows and the pretraining documents only."""
    seen = []
    real = target_build.train_tokenizer

    def recording(texts, **kwargs):
        seen.extend(texts)
        return real(texts, **kwargs)

    monkeypatch.setattr(target_build, "train_tokenizer", recording)
    data = make_synthetic_lume(seed=0, num_pretraining_documents=4)
    make_target(data, output_dir=str(tmp_path / "target"), **{**TINY, "max_epochs": 1, "epochs": 1})
    # The members are the forget documents, whose sentence-completion rows (input + " " + output) it must read.
    nonmembers = {row["document"] for row in data["mia_nonmember"]}
    assert nonmembers and seen
    assert not nonmembers.intersection(seen)
    assert not any(document in text for document in nonmembers for text in seen)
    assert {row["document"] for row in data["pretraining"]} <= set(seen)
