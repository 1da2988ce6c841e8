"""Bad input and environment faults give one clear error, through the Python API and through every `gnm` command.

Each case is checked twice: the API raises `GNMInputError` (an `OSError` for a file system or Hub fault) naming the
file, row and field and what was expected, and the CLI prints that one message on one stderr line, without a
traceback, and exits with status 2 (input), 1 (environment) or 3 (collapse guard stop). Nothing already on disk is
lost.
"""

import copy
import errno
import json
import logging
import os
import re
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM
from conftest import fact_negatives, fact_rows, write_jsonl, write_workspace

from gnm_trainer.cli import main
from gnm_trainer.cli.unlearn import finished_run_files
from gnm_trainer.data import load_unlearning_data
from gnm_trainer.errors import EXIT_COLLAPSED, GNMInputError
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


def one_line_error(capsys, argv, code) -> str:
    """Run `gnm argv`; assert exit status `code`, exactly one `gnm <command>: error:` line and no traceback."""
    status = main(list(argv))
    error = capsys.readouterr().err
    assert status == code, error
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if f"gnm {argv[0]}: error:" in line]
    assert len(lines) == 1, error
    return lines[0]


def cli_error(capsys, workspace, *flags) -> str:
    """Run `gnm unlearn` with the workspace recipe and `flags`; assert exit 2, one message, no traceback."""
    return one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), *flags], 2)


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
    """Ids and (prompt, completion) pairs are counted apart; the counts differ here so that neither stands in for
    the other: 2 shared ids (forget001 whole, forget002's id on other text) and 3 shared pairs (forget001's, and
    forget000's and forget003's texts under retain ids)."""
    forget = fact_rows("forget", 0, 4)
    retain = fact_rows("retain", 4, 8) + [
        dict(forget[1]),  # same id, same text
        dict(forget[2], input="What is the capital of Nowhere?", output="Nowhere has none."),  # same id only
        dict(forget[0], id="retain900qa0"),  # same text only
        dict(forget[3], id="retain901qa0"),  # same text only
    ]
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        GNMTrainer(
            tiny_model, small_config(tmp_path, loss_terms=["ga", "klr"]), train_dataset=forget, retain_dataset=retain,
            processing_class=tiny_tokenizer,
        )
    warnings = [r.getMessage() for r in caplog.records if r.name == TRAINER_LOGGER and r.levelno == logging.WARNING]
    overlap = [message for message in warnings if "in both the forget and the retain set" in message]
    assert overlap == [
        "2 ids and 3 (prompt, completion) pairs are in both the forget and the retain set "
        "(first ids: ['forget001qa0', 'forget002qa0']); they are unlearned and retained at the same time"
    ], warnings


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


# ---------------------------------------------------------------------------------------------------------------
# Faults through every command: one line, a documented exit status, nothing on disk lost
# ---------------------------------------------------------------------------------------------------------------


def evaluate_argv(workspace, *flags):
    return ["evaluate", "--model", str(workspace / "target"), "--data", str(workspace / "data"), "--max-new-tokens", "2",
            "--output-dir", str(workspace / "evaluation"), *flags]


def test_invalid_yaml_recipe_names_file_and_line(workspace, capsys):
    recipe = workspace / "broken.yaml"
    recipe.write_text("max_steps: 1\nloss_terms: [ga, klr\n")
    for command in ("unlearn", "evaluate", "negatives", "make-target", "demo"):
        line = one_line_error(capsys, [command, "--config", str(recipe)], 2)
        assert f"{recipe}, line 3, column 1: invalid YAML" in line


def test_data_file_that_is_not_utf8_names_file_and_line(workspace, capsys):
    folder = data_folder(workspace, "latin1")
    path = folder / "forget.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"?", "?".encode("latin-1") + "é".encode("latin-1"), 1)
    path.write_bytes(b"".join(lines))
    expected = f"{path}, line 3: not UTF-8 text (byte 0xe9)"
    with pytest.raises(GNMInputError, match=re.escape(expected)):
        load_unlearning_data(str(path))
    assert expected in one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--data_dir", str(folder)], 2)
    assert expected in one_line_error(capsys, evaluate_argv(workspace, "--data", str(folder)), 2)


def test_model_folder_without_a_tokenizer(workspace, capsys, tiny_model):
    folder = workspace / "no_tokenizer"
    tiny_model.save_pretrained(folder)
    expected = f"tokenizer: cannot load '{folder}' (no tokenizer_config.json or tokenizer.json there)"
    with pytest.raises(GNMInputError, match=re.escape(expected)):
        GNMTrainer(str(folder), small_config(workspace, loss_terms=["ga"]), train_dataset=fact_rows("forget", 0, 4))
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--model_name_or_path", str(folder)], 2)
    assert expected in line and "tokenizer.save_pretrained" in line
    assert expected in one_line_error(capsys, evaluate_argv(workspace, "--model", str(folder)), 2)


def _truncate(path, keep=200):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_evaluate_a_missing_or_corrupt_model_or_adapter(workspace, capsys, tiny_model):
    from peft import LoraConfig, get_peft_model

    from gnm_trainer.model_loading import load_model_and_tokenizer

    missing = workspace / "void-model"
    line = one_line_error(capsys, evaluate_argv(workspace, "--model", str(missing)), 2)
    assert f"model: cannot load '{missing}' (no such folder)" in line
    corrupt = workspace / "corrupt"
    shutil.copytree(workspace / "target", corrupt)
    _truncate(corrupt / "model.safetensors")
    expected = f"model: cannot load '{corrupt}' (SafetensorError"
    with pytest.raises(GNMInputError, match=re.escape(expected)):
        load_model_and_tokenizer(str(corrupt))
    assert expected in one_line_error(capsys, evaluate_argv(workspace, "--model", str(corrupt)), 2)
    adapter = workspace / "adapter"
    get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(workspace / "target")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _truncate(adapter / "adapter_model.safetensors")
    line = one_line_error(capsys, evaluate_argv(workspace, "--model", str(adapter)), 2)
    assert f"adapter: cannot load '{adapter}' (SafetensorError" in line
    assert not (workspace / "evaluation").exists()


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("learning_rate", "nan", "learning_rate: expected a finite number > 0, got nan"),
        ("learning_rate", "-1e-4", "learning_rate: expected a finite number > 0, got -0.0001"),
        ("ga_weight", "-0.5", "ga_weight: expected a finite number >= 0, got -0.5"),
        ("klr_weight", "inf", "klr_weight: expected a finite number >= 0, got inf"),
        ("npo_beta", "nan", "npo_beta: expected a finite number > 0, got nan"),
        ("gradient_accumulation_steps", "0", "gradient_accumulation_steps: expected a finite number >= 1, got 0"),
        ("max_steps", "0", "max_steps: 0 would train nothing"),
        ("max_steps", "-5", "max_steps: -5 would train nothing"),
    ],
)
def test_invalid_numbers_are_refused_before_anything_is_written(workspace, capsys, flag, value, expected):
    value_type = int if flag in ("gradient_accumulation_steps", "max_steps") else float
    terms = ["ga", "klr", "gnm", "npo"] if flag == "npo_beta" else ["ga", "klr", "gnm"]
    with pytest.raises(GNMInputError, match=re.escape(expected)):
        GNMConfig(output_dir=str(workspace / "out"), loss_terms=terms, **{flag: value_type(value)})
    flags = ["--loss_terms", *terms, f"--{flag}={value}"]
    assert expected in one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), *flags], 2)
    assert not (workspace / "run").exists()  # no untrained run that looks finished and blocks the folder


def _output_is_a_file_argv(workspace, command, blocker):
    tiny_target = ["--epochs", "1", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--vocab-size", "300",
                   "--max-documents-per-split", "1", "--quiet"]
    return {
        "unlearn": ["unlearn", "--config", str(workspace / "recipe.yaml"), "--output_dir", str(blocker)],
        "evaluate": evaluate_argv(workspace, "--output-dir", str(blocker)),
        "negatives": ["negatives", "--forget", str(workspace / "data"), "--backend", "perturb", "--levels", "2",
                      "--output", str(blocker / "negatives.jsonl")],
        "make-target": ["make-target", "--output-dir", str(blocker), *tiny_target],
        "demo": ["demo", "--quick", "--output-dir", str(blocker), "--target-dir", str(workspace / "target")],
    }[command]


@pytest.mark.parametrize("command", ["unlearn", "evaluate", "negatives", "make-target", "demo"])
def test_an_output_path_that_is_a_file_is_refused_and_kept(workspace, capsys, command):
    blocker = workspace / "notes.txt"
    blocker.write_text("my notes\n")
    line = one_line_error(capsys, _output_is_a_file_argv(workspace, command, blocker), 2)
    assert f"{blocker} is not a folder" in line
    assert blocker.read_text() == "my notes\n"


def test_make_target_api_never_replaces_a_file(workspace):
    from gnm_trainer.target import make_target

    blocker = workspace / "notes.txt"
    blocker.write_text("my notes\n")
    with pytest.raises(GNMInputError, match=re.escape(f"output_dir: {blocker} is not a folder")):
        make_target(output_dir=str(blocker), epochs=1, hidden_size=16, num_layers=1, num_heads=2, progress=False)
    assert blocker.read_text() == "my notes\n"


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """A folder whose file system refuses writes (EROFS), simulated: root ignores permission bits."""
    import builtins

    folder = tmp_path / "read_only"
    folder.mkdir()
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(str(folder)) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    return folder


@pytest.mark.parametrize("command", ["unlearn", "evaluate", "negatives", "make-target", "demo"])
def test_an_unwritable_output_folder_is_found_before_any_work(workspace, capsys, read_only, monkeypatch, command):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(GNMTrainer, "train", no_work)
    monkeypatch.setattr("gnm_trainer.evaluation.evaluator.load_model_and_tokenizer", no_work)
    monkeypatch.setattr("gnm_trainer.negatives.build.as_rows", no_work)
    monkeypatch.setattr("gnm_trainer.target.load_target_data", no_work)
    line = one_line_error(capsys, _output_is_a_file_argv(workspace, command, read_only / "out"), 1)
    assert f"{read_only}: " in line and "cannot be written here (Read-only file system)" in line


@pytest.mark.parametrize("failing", ["save_metrics", "write_manifest", "create_model_card"])
def test_a_failed_write_after_training_never_loses_the_model(workspace, capsys, monkeypatch, failing):
    run = workspace / "run"

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "all_results.json"))

    monkeypatch.setattr(GNMTrainer, failing, disk_full)
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml")], 1)
    assert f"{run / 'all_results.json'}: No space left on device" in line
    assert AutoModelForCausalLM.from_pretrained(run) is not None  # the trained weights are on disk, whole


def _checkpointed_run(workspace, steps):
    return ["unlearn", "--config", str(workspace / "recipe.yaml"), "--max_steps", str(steps), "--save_strategy", "steps",
            "--save_steps", "1"]


@pytest.mark.parametrize("spoil", ["truncated weights", "no trainer state"])
def test_resume_skips_a_half_written_last_checkpoint(workspace, capsys, caplog, spoil):
    run = workspace / "run"
    assert main(_checkpointed_run(workspace, 2)) == 0
    for name in finished_run_files(str(run)):
        (run / name).unlink()  # as if the run had been stopped while writing checkpoint-2
    if spoil == "truncated weights":
        _truncate(run / "checkpoint-2" / "model.safetensors")
        reason = "truncated model.safetensors"
    else:
        (run / "checkpoint-2" / "trainer_state.json").unlink()
        reason = "no trainer_state.json"
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="gnm_trainer.cli.unlearn"):
        assert main(_checkpointed_run(workspace, 3)) == 0, capsys.readouterr().err
    skipped = [r.getMessage() for r in caplog.records if r.name == "gnm_trainer.cli.unlearn"]
    assert skipped == [f"Skipping incomplete checkpoint-2 ({reason}); resuming from checkpoint-1."]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 3


def test_push_to_hub_without_the_hub_stops_before_training(workspace, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.\nTo disable it, unset HF_HUB_OFFLINE."
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    monkeypatch.setattr(GNMTrainer, "train", lambda *a, **k: pytest.fail("trained without a reachable Hub"))
    token = "hf_" + "x" * 30
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--push_to_hub", "true",
                                   "--hub_model_id", "me/unlearned", "--hub_token", token], 1)
    assert "push_to_hub: cannot reach the Hugging Face Hub repository me/unlearned (OfflineModeIsEnabled" in line
    assert token not in line and not (workspace / "run").exists()


def test_data_dir_that_is_a_file_is_refused(workspace, capsys):
    from gnm_trainer.data import load_unlearning_splits

    path = workspace / "data" / "forget.jsonl"
    with pytest.raises(GNMInputError, match=re.escape(f"{path} is a single file, which cannot hold both sets")):
        load_unlearning_splits(str(path))
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--data_dir", str(path)], 2)
    assert f"data_dir: {path} is a single file" in line and not (workspace / "run").exists()
    assert f"{path} is a single file" in one_line_error(capsys, evaluate_argv(workspace, "--data", str(path)), 2)


def test_completions_cut_by_max_length_are_counted_in_a_warning(tmp_path, tiny_model, tiny_tokenizer, caplog):
    rows = fact_rows("forget", 0, 4)
    rows[1]["output"] = "a very long answer " * 20
    with caplog.at_level(logging.WARNING, logger="gnm_trainer.data.collator"):
        GNMTrainer(
            tiny_model, small_config(tmp_path, loss_terms=["ga"], max_length=32), train_dataset=rows,
            processing_class=tiny_tokenizer,
        )
    cut = [r.getMessage() for r in caplog.records if "cut to fit max_length=32" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("forget set: 1 of 4 completions are cut"), cut


@pytest.mark.parametrize("completion", ["", "   "])
def test_an_empty_negative_completion_is_refused(workspace, capsys, completion):
    forget = fact_rows("forget", 0, 4)
    negatives = fact_negatives(forget)
    negatives[3]["completion"] = completion
    path = str(workspace / "empty_negative.jsonl")
    write_jsonl(path, negatives)
    expected = f"{path}, row 3, field 'completion': is empty; expected a non-empty negative completion"
    with pytest.raises(GNMInputError, match=re.escape(expected)):
        read_negatives(path)
    assert expected in one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--negatives_path", path], 2)


def test_a_collapse_guard_stop_exits_3_with_a_line_of_its_own(workspace, capsys):
    # Gradient ascent with a huge constant SGD step: the retain NLL soon rises past a low threshold.
    status = main([
        "unlearn", "--config", str(workspace / "recipe.yaml"), "--loss_terms", "ga", "gd", "--gd_weight", "0.01",
        "--optim", "sgd", "--learning_rate", "5", "--lr_scheduler_type", "constant", "--max_steps", "30",
        "--logging_steps", "1", "--collapse_window", "1", "--collapse_retain_nll_ratio", "1.5",
        "--collapse_min_retain_nll_increase", "0.5",
    ])
    captured = capsys.readouterr()
    assert status == EXIT_COLLAPSED == 3, captured.err
    last_line = captured.err.rstrip("\n").split("\n")[-1]
    assert last_line.startswith("gnm unlearn: collapse guard: nll_retain = ")
    assert "training stopped (no checkpoint saved before step" in last_line and "gnm_manifest.json" in last_line
    assert (workspace / "run" / "gnm_manifest.json").exists()


def test_unlearn_ends_by_saying_where_model_manifest_and_card_are(workspace, capsys):
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml")]) == 0
    run = workspace / "run"
    out = capsys.readouterr().out
    assert f"saved model    {run}\n" in out
    for path in (run / "gnm_manifest.json", run / "README.md"):
        assert str(path) in out and path.is_file()


def test_an_adapter_trained_from_a_relative_path_evaluates_from_anywhere(workspace, capsys, monkeypatch):
    from gnm_trainer.model_loading import load_model_and_tokenizer

    monkeypatch.chdir(workspace)
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml"), "--model_name_or_path", "target",
                 "--use_peft", "true", "--lora_r", "2", "--lora_target_modules", "q_proj"]) == 0
    config = json.loads((workspace / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "target")
    elsewhere = workspace / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, tokenizer = load_model_and_tokenizer(str(workspace / "run"))
    assert model.peft_config["default"].base_model_name_or_path == str(workspace / "target")
    config["base_model_name_or_path"] = "runs/tiny/target"  # an adapter saved by an older version
    (workspace / "run" / "adapter_config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, evaluate_argv(workspace, "--model", str(workspace / "run")), 2)
    assert f"{workspace / 'run' / 'adapter_config.json'}: base_model_name_or_path 'runs/tiny/target' is not a folder" in line


def test_lora_target_modules_one_name_works_and_a_wrong_name_is_one_line(workspace, capsys):
    recipe = ["unlearn", "--config", str(workspace / "recipe.yaml"), "--use_peft", "true", "--lora_r", "2"]
    line = one_line_error(capsys, [*recipe, "--lora_target_modules", "qproj"], 2)
    assert "peft_config: Target modules {'qproj'} not found in the base model" in line
    assert main([*recipe, "--lora_target_modules", "q_proj"]) == 0  # one name is a module name, not a regex
    assert (workspace / "run" / "adapter_model.safetensors").is_file()


def test_negatives_resume_when_the_crash_cut_a_character_in_half(tmp_path, monkeypatch):
    from gnm_trainer.negatives import build as build_module
    from gnm_trainer.negatives.build import build_negatives, partial_path

    rows = fact_rows("forget", 0, 4)
    settings = dict(retain_rows=fact_rows("retain", 4, 8), seed=2, chunk_size=2, progress=False)
    expected = build_negatives(rows, "perturb", 2, tmp_path / "full" / "neg.jsonl", **settings)
    original = build_module._generate_chunk

    def stop_after_one_chunk(chunk, *args):
        monkeypatch.setattr(build_module, "_generate_chunk", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        return original(chunk, *args)

    monkeypatch.setattr(build_module, "_generate_chunk", stop_after_one_chunk)
    output = tmp_path / "resumed" / "neg.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_negatives(rows, "perturb", 2, output, **settings)
    with open(partial_path(output), "ab") as handle:  # the crash cut 'é' (0xc3 0xa9) after its first byte
        handle.write('{"id": "forget003qa0", "completion": "caf'.encode() + b"\xc3")
    monkeypatch.setattr(build_module, "_generate_chunk", original)
    assert build_negatives(rows, "perturb", 2, output, **settings) == expected


def test_text_files_given_to_options_that_are_not_utf8(workspace, capsys):
    template = workspace / "template.txt"
    template.write_bytes(b"Rewrite \xff{prompt}\n")
    line = one_line_error(capsys, ["negatives", "--forget", str(workspace / "data"), "--backend", "llm", "--generator",
                                   str(workspace / "target"), "--levels", "2", "--output", str(workspace / "neg.jsonl"),
                                   "--prompt-template", str(template)], 2)
    assert f"{template}, line 1: not UTF-8 text (byte 0xff)" in line
    baseline = workspace / "baseline.json"
    baseline.write_bytes(b'{"harmonic-mean-task-aggregate":\n "\xe9"}')
    line = one_line_error(capsys, evaluate_argv(workspace, "--baseline-results", str(baseline)), 2)
    assert f"{baseline}, line 2: not UTF-8 text (byte 0xe9)" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["make-target", "--learning-rate", "nan"], "learning_rate must be a finite positive number, got nan"),
        (["demo", "--quick", "--max-steps", "0"], "max_steps: expected an integer >= 1, got 0"),
        (["demo", "--quick", "--negative-levels", "0"], "levels must be an integer >= 1"),
        (["demo", "--quick", "--learning-rate", "inf"], "learning_rate: expected a finite number > 0, got inf"),
        (["demo", "--quick", "--pretraining-documents", "-3"], "pretraining_documents: expected an integer >= 0, got -3"),
        (["make-target", "--pretraining-documents", "-3"], "pretraining_documents: expected an integer >= 0, got -3"),
        (["demo", "--quick", "--reference-documents", "-1"], "reference_documents: expected an integer >= 0, got -1"),
    ],
)
def test_make_target_and_demo_settings_are_checked_before_any_work(workspace, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr("gnm_trainer.target.load_target_data", lambda *a, **k: pytest.fail("work started"))
    output = workspace / "out"
    assert expected in one_line_error(capsys, [*argv, "--output-dir", str(output)], 2)


def test_resume_from_checkpoint_is_honoured_or_refused(workspace, capsys):
    recipe = ["unlearn", "--config", str(workspace / "recipe.yaml")]
    void = workspace / "void-checkpoint"
    line = one_line_error(capsys, [*recipe, "--resume_from_checkpoint", str(void)], 2)
    assert f"resume_from_checkpoint: cannot resume from {void} (no such folder)" in line
    assert not (workspace / "run").exists()
    assert main(_checkpointed_run(workspace, 2) + ["--output_dir", str(workspace / "first")]) == 0
    checkpoint = workspace / "first" / "checkpoint-1"
    assert main([*recipe, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)]) == 0
    assert json.loads((workspace / "run" / "trainer_state.json").read_text())["global_step"] == 3


def test_overwriting_a_finished_run_trains_anew_instead_of_resuming_its_checkpoints(workspace):
    flags = ["--logging_steps", "1", "--lr_scheduler_type", "constant"]
    assert main(_checkpointed_run(workspace, 2) + flags) == 0
    assert main(_checkpointed_run(workspace, 3) + flags + ["--overwrite_output", "true", "--learning_rate", "5e-4"]) == 0
    history = json.loads((workspace / "run" / "trainer_state.json").read_text())["log_history"]
    first_step = next(entry for entry in history if entry.get("step") == 1 and "learning_rate" in entry)
    assert first_step["learning_rate"] == pytest.approx(5e-4)  # step 1 of the new run, not of the replaced one


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("loss_terms", 5, "loss_terms: expected a list of term names"),
        ("learning_rate", [0.001], "learning_rate: expected a number, got list [0.001]"),
        ("max_steps", 1.5, "max_steps: expected an integer, got float 1.5"),
        ("max_length", [64], "max_length: expected an integer, got list [64]"),
    ],
)
def test_recipe_values_of_the_wrong_type(workspace, capsys, key, value, expected):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe[key] = value
    (workspace / "typed.yaml").write_text(yaml.safe_dump(recipe))
    assert expected in one_line_error(capsys, ["unlearn", "--config", str(workspace / "typed.yaml")], 2)
    assert not (workspace / "run").exists()


def test_out_of_accelerator_memory_is_one_line_with_what_to_lower(workspace, capsys, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB")

    monkeypatch.setattr(GNMTrainer, "train", out_of_memory)
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml")], 1)
    assert "out of accelerator memory (CUDA out of memory); lower the batch size (per_device_train_batch_size" in line


def test_report_to_an_integration_that_is_not_installed(workspace, capsys, monkeypatch):
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard"])
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--report_to", "wandb"], 2)
    assert "report_to: 'wandb' is not installed; pip install 'gnm_trainer[wandb]'" in line
    assert not (workspace / "run").exists()


def test_a_failed_save_over_a_finished_run_leaves_that_run_whole(workspace, capsys, monkeypatch):
    from transformers import Trainer

    run = workspace / "run"
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml")]) == 0
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}

    def disk_full_halfway(self, output_dir=None, state_dict=None):
        (run / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "model.safetensors"))

    monkeypatch.setattr(Trainer, "_save", disk_full_halfway)
    capsys.readouterr()
    line = one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), "--overwrite_output", "true"], 1)
    assert f"{run / 'model.safetensors'}: No space left on device" in line
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
        (["--learning_rate"], "argument --learning_rate/--learning-rate: expected one argument"),
        (["--peft_method", "ia3"], "argument --peft_method/--peft-method: invalid choice: 'ia3'"),
    ],
)
def test_a_bad_flag_is_one_line_without_the_usage(workspace, capsys, flags, expected):
    status = main(["unlearn", "--config", str(workspace / "recipe.yaml"), *flags])
    error = capsys.readouterr().err
    assert status == 2 and "usage:" not in error and "Traceback" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gnm unlearn: error: {expected}"), error
    assert lines[0].endswith("`gnm unlearn --help` lists the options")
