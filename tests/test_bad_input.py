"""Bad input gives one clear error, through the Python API and through `gnm unlearn`.

Each case is checked twice: the API raises `GNMInputError` naming the file, row and field and what was expected,
and the CLI exits with status 2 and prints that one message on stderr, without a traceback.
"""

import copy
import logging
import re

import pytest
import yaml
from conftest import fact_negatives, fact_rows, write_jsonl, write_workspace

from gnm_trainer.cli import main
from gnm_trainer.cli.unlearn import finished_run_files
from gnm_trainer.data import load_unlearning_data
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.negatives.store import check_negatives, read_negatives
from gnm_trainer.target import build_tiny_llama, train_tokenizer

TRAINER_LOGGER = "gnm_trainer.gnm_trainer"
LONG_PROMPT = "What is " + "the very long question of " * 30 + "Alma Breck?"


def small_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
        report_to="none", max_length=64, loss_terms=["ga", "klr", "gnm"],
    )
    values.update(overrides)
    return GNMConfig(**values)


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_tokenizer):
    """A saved tiny target, a data folder, negatives and a recipe that trains one step without PEFT."""
    write_workspace(tmp_path, tiny_model, tiny_tokenizer, fact_rows("forget", 0, 4), fact_rows("retain", 4, 8))
    recipe = {
        "model_name_or_path": str(tmp_path / "target"),
        "data_dir": str(tmp_path / "data"),
        "negatives_path": str(tmp_path / "negatives.jsonl"),
        "loss_terms": ["ga", "klr", "gnm"],
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "save_strategy": "no",
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def cli_error(capsys, workspace, *flags) -> str:
    """Run `gnm unlearn` with the workspace recipe and `flags`; assert exit 2, one message, no traceback."""
    code = main(["unlearn", "--config", str(workspace / "recipe.yaml"), *flags])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    assert error.count("gnm unlearn: error:") == 1, error
    return error


def data_folder(workspace, name, forget=None, retain=None):
    """A data folder beside the workspace's, with the given forget / retain rows (defaults: the valid ones)."""
    folder = workspace / name
    folder.mkdir()
    write_jsonl(folder / "forget.jsonl", fact_rows("forget", 0, 4) if forget is None else forget)
    write_jsonl(folder / "retain.jsonl", fact_rows("retain", 4, 8) if retain is None else retain)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Files, folders and rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["void", "void.jsonl", "void/forget.parquet"])
def test_missing_file_or_folder(workspace, capsys, tiny_model, tiny_tokenizer, missing):
    path = str(workspace / missing)
    with pytest.raises(GNMInputError, match=re.escape(f"{path}: file or folder not found")):
        load_unlearning_data(path)
    with pytest.raises(GNMInputError, match=re.escape(f"{path}: file or folder not found")):
        GNMTrainer(tiny_model, small_config(workspace, loss_terms=["ga"]), train_dataset=path, processing_class=tiny_tokenizer)
    assert f"{path}: file or folder not found" in cli_error(capsys, workspace, "--data_dir", path)


def test_missing_retain_file_negatives_file_and_model(workspace, capsys):
    only_forget = workspace / "only_forget"
    only_forget.mkdir()
    write_jsonl(only_forget / "forget.jsonl", fact_rows("forget", 0, 4))
    with pytest.raises(GNMInputError, match="no retain file found; looked for retain.jsonl"):
        load_unlearning_data(str(only_forget), "retain")
    assert "no retain file found" in cli_error(capsys, workspace, "--data_dir", str(only_forget))
    missing_negatives = str(workspace / "void.jsonl")
    with pytest.raises(GNMInputError, match="negatives file not found"):
        read_negatives(missing_negatives)
    assert f"{missing_negatives}: negatives file not found" in cli_error(capsys, workspace, "--negatives_path", missing_negatives)
    assert "model: cannot load" in cli_error(capsys, workspace, "--model_name_or_path", str(workspace / "void-model"))


@pytest.mark.parametrize(
    "renamed, expected",
    [({"input": "question"}, "missing field prompt (or input)"), ({"output": "answer"}, "missing field completion (or output)")],
)
def test_missing_or_misnamed_columns(workspace, capsys, renamed, expected):
    rows = fact_rows("forget", 0, 4)
    rows[1] = {renamed.get(key, key): value for key, value in rows[1].items()}
    folder = data_folder(workspace, "misnamed", forget=rows)
    path = str(folder / "forget.jsonl")
    with pytest.raises(GNMInputError, match=re.escape(f"{path}, row 1: {expected}")):
        load_unlearning_data(path)
    message = cli_error(capsys, workspace, "--data_dir", str(folder))
    assert f"{path}, row 1: {expected}" in message and "Expected LUME rows" in message


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_empty_forget_or_retain_set(workspace, capsys, split):
    folder = data_folder(workspace, "empty", **{split: []})
    with pytest.raises(GNMInputError, match=f"the {split} set is empty; expected at least one row"):
        load_unlearning_data(str(folder), split)
    with pytest.raises(GNMInputError, match=f"the {split} set is empty"):
        load_unlearning_data([], split)
    message = cli_error(capsys, workspace, "--data_dir", str(folder))
    assert f"{folder / f'{split}.jsonl'}: the {split} set is empty" in message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("input", None, "is empty (None); expected a non-empty string"),
        ("output", 7, "expected a string, got int"),
        ("output", "", "is empty; expected a non-empty string"),
        ("input", "   ", "is empty; expected a non-empty string"),
        ("input", ["not", "messages"], "expected a string, got list"),
    ],
)
def test_none_non_string_or_empty_text(workspace, capsys, tiny_model, tiny_tokenizer, field, value, expected):
    rows = fact_rows("forget", 0, 4)
    rows[2][field] = value
    folder = data_folder(workspace, "bad_text", forget=rows)
    path = str(folder / "forget.jsonl")
    location = f"row 2, field '{field}': {expected}"
    with pytest.raises(GNMInputError) as raised:
        load_unlearning_data(path)
    assert f"{path}, {location}" in str(raised.value)
    with pytest.raises(GNMInputError) as raised:
        GNMTrainer(tiny_model, small_config(workspace, loss_terms=["ga"]), train_dataset=rows, processing_class=tiny_tokenizer)
    assert location in str(raised.value)
    assert f"{path}, {location}" in cli_error(capsys, workspace, "--data_dir", str(folder))


def test_duplicate_ids(workspace, capsys):
    rows = fact_rows("forget", 0, 4)
    rows[3]["id"] = rows[0]["id"]
    folder = data_folder(workspace, "duplicates", forget=rows)
    path = str(folder / "forget.jsonl")
    expected = f"{path}, row 3, field 'id': duplicate id 'forget000qa0' (first seen at row 0)"
    with pytest.raises(GNMInputError) as raised:
        load_unlearning_data(path)
    assert expected in str(raised.value)
    assert expected in cli_error(capsys, workspace, "--data_dir", str(folder))


def test_rows_in_both_forget_and_retain_are_a_warning_with_counts(tmp_path, tiny_model, tiny_tokenizer, caplog):
    forget = fact_rows("forget", 0, 4)
    retain = fact_rows("retain", 4, 8) + [dict(forget[1])]
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        GNMTrainer(
            tiny_model, small_config(tmp_path, loss_terms=["ga", "klr"]), train_dataset=forget, retain_dataset=retain,
            processing_class=tiny_tokenizer,
        )
    warnings = [r.getMessage() for r in caplog.records if r.name == TRAINER_LOGGER and r.levelno == logging.WARNING]
    overlap = [message for message in warnings if "in both the forget and the retain set" in message]
    assert len(overlap) == 1, warnings
    assert "1" in overlap[0]  # the count of shared rows


# ---------------------------------------------------------------------------------------------------------------
# Negatives
# ---------------------------------------------------------------------------------------------------------------


def _unknown_id(negatives):
    negatives[0]["id"] = "stranger"
    return negatives


def _missing_level(negatives):
    return [n for n in negatives if not (n["id"] == "forget002qa0" and n["level"] == 2)]


def _no_level_field(negatives):
    del negatives[3]["level"]
    return negatives


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (_unknown_id, "1 ids in the negatives are not in the forget set (first: 'stranger')"),
        (_missing_level, "1 forget ids lack some of the levels 1..2 (first: 'forget002qa0 (missing levels [2])')"),
        (_no_level_field, "row 3, field 'level': missing"),
    ],
)
def test_negatives_that_do_not_match_the_forget_set(workspace, capsys, tiny_model, tiny_tokenizer, spoil, expected):
    forget = fact_rows("forget", 0, 4)
    negatives = spoil(fact_negatives(forget))
    path = str(workspace / "spoiled.jsonl")
    write_jsonl(path, negatives)
    with pytest.raises(GNMInputError) as raised:
        check_negatives(negatives, forget, source=path)
    assert path in str(raised.value) and expected in str(raised.value)
    with pytest.raises(GNMInputError) as raised:
        GNMTrainer(
            tiny_model, small_config(workspace), train_dataset=forget, retain_dataset=fact_rows("retain", 4, 8),
            negative_dataset=path, processing_class=tiny_tokenizer,
        )
    assert path in str(raised.value) and expected in str(raised.value)  # the trainer names the negatives file
    message = cli_error(capsys, workspace, "--negatives_path", path)
    assert path in message and expected in message


# ---------------------------------------------------------------------------------------------------------------
# Lengths and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_that_leaves_no_room_for_the_completion_is_listed(workspace, capsys, tiny_model, tiny_tokenizer):
    rows = fact_rows("forget", 0, 4)
    rows[1]["input"] = LONG_PROMPT
    expected = "row 1 (id 'forget001qa0'), field 'prompt'"
    with pytest.raises(GNMInputError) as raised:
        GNMTrainer(tiny_model, small_config(workspace, loss_terms=["ga"], max_length=32), train_dataset=rows, processing_class=tiny_tokenizer)
    message = str(raised.value)
    assert "forget set: 1 prompt(s) leave no room for the completion within max_length=32" in message
    assert expected in message and "truncated to zero tokens" in message and "max_prompt_length" in message
    # Cutting prompts from the left keeps room for the completion: no error.
    GNMTrainer(
        tiny_model, small_config(workspace, loss_terms=["ga"], max_length=32, max_prompt_length=16), train_dataset=rows,
        processing_class=tiny_tokenizer,
    )
    folder = data_folder(workspace, "long", forget=rows)
    assert expected in cli_error(capsys, workspace, "--data_dir", str(folder), "--max_length", "32")


def test_tokenizer_without_pad_token_pads_with_eos_and_warns(tmp_path, tiny_model, tiny_tokenizer, caplog):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        trainer = GNMTrainer(
            tiny_model, small_config(tmp_path, loss_terms=["ga"]), train_dataset=fact_rows("forget", 0, 4),
            processing_class=tokenizer,
        )
    assert trainer.processing_class.pad_token_id == tokenizer.eos_token_id
    assert any("no pad token" in r.getMessage() and r.name == TRAINER_LOGGER for r in caplog.records)


def test_tokenizer_without_pad_or_eos_is_an_error(workspace, capsys, tiny_model, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(GNMInputError, match="tokenizer: it has neither a pad token nor an eos token"):
        GNMTrainer(tiny_model, small_config(workspace, loss_terms=["ga"]), train_dataset=fact_rows("forget", 0, 4), processing_class=tokenizer)
    tokenizer.save_pretrained(workspace / "target")
    assert "neither a pad token nor an eos token" in cli_error(capsys, workspace)


def test_model_and_tokenizer_vocabularies_that_disagree(workspace, capsys, tiny_tokenizer):
    small_tokenizer = train_tokenizer(["a b c d e f g"] * 4, vocab_size=60)
    small_model = build_tiny_llama(small_tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    expected = f"tokenizer: it has {len(tiny_tokenizer)} tokens but the model's embedding has {len(small_tokenizer)} rows"
    with pytest.raises(GNMInputError) as raised:
        GNMTrainer(small_model, small_config(workspace, loss_terms=["ga"]), train_dataset=fact_rows("forget", 0, 4), processing_class=tiny_tokenizer)
    assert expected in str(raised.value)
    small_model.save_pretrained(workspace / "target")  # the target folder keeps the larger tokenizer
    assert expected in cli_error(capsys, workspace)


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, flags, expected",
    [
        ({"loss_terms": ["ga", "gx"]}, ["--loss_terms", "ga", "gx"], "loss_terms: unknown term(s) ['gx']"),
        ({"gd_weight": 2.0}, ["--gd_weight", "2.0"], "gd_weight: set to 2.0 but 'gd' is not in loss_terms"),
    ],
)
def test_unknown_terms_and_weights_of_disabled_terms(workspace, capsys, settings, flags, expected):
    with pytest.raises(GNMInputError) as raised:
        GNMConfig(output_dir=str(workspace / "out"), **settings)
    assert expected in str(raised.value)
    assert expected in cli_error(capsys, workspace, *flags)


def test_unknown_recipe_keys(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["lerning_rate"] = 1e-3
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert "lerning_rate" in cli_error(capsys, workspace)
    (workspace / "evaluate.yaml").write_text("model: m\ndata: d\nmax_new_token: 4\n")
    assert main(["evaluate", "--config", str(workspace / "evaluate.yaml")]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['max_new_token']" in error and "Traceback" not in error


# ---------------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [["adapter_config.json"], ["config.json", "model.safetensors"]])
def test_a_finished_run_is_not_overwritten_unless_asked(workspace, capsys, files):
    run = workspace / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text("{}")
    message = cli_error(capsys, workspace)
    assert f"{run}: output_dir already holds a finished run ({', '.join(files)})" in message
    assert "--overwrite_output true" in message
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml"), "--overwrite_output", "true"]) == 0
    assert (run / "model.safetensors").stat().st_size > 100  # replaced by the new run's weights


def test_a_folder_of_checkpoints_only_is_not_finished(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "config.json", "model.safetensors"):
        (checkpoint / name).write_text("{}")
    (tmp_path / "run" / "config.json").write_text("{}")  # a config without weights is not a model either
    assert finished_run_files(str(tmp_path / "run")) == []
    assert finished_run_files(str(tmp_path / "void")) == []
