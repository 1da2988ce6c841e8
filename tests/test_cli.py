"""What a user sees of the `gnm` command line: the command list, --version, help, one spelling of options."""

import os
import subprocess
import sys

import pytest
import yaml

from gnm_trainer import __version__
from gnm_trainer.cli import _build_argparse_parser, apply_recipe, main
from gnm_trainer.cli.unlearn import parse_arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unknown_command_lists_every_command_on_one_line(capsys):
    assert main(["foo"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown command 'foo'" in error
    for command in ("unlearn", "negatives", "evaluate", "merge", "make-target", "demo"):
        assert command in error


def test_version_names_ours_and_the_libraries(capsys):
    assert main(["--version"]) == 0
    first, libraries = capsys.readouterr().out.strip().splitlines()
    assert first == f"gnm_trainer {__version__}"
    for library in ("torch", "transformers", "peft", "trl"):
        assert f"{library} " in libraries


@pytest.mark.parametrize("argv", [["--help"], ["negatives", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(argv):
    """`gnm --help | head -1`: the reader is gone before we write; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.run(
        [sys.executable, "-m", "gnm_trainer.cli", *argv], stdout=write_end, stderr=subprocess.PIPE, env=env,
        timeout=300,
    )
    os.close(write_end)
    assert "Traceback" not in process.stderr.decode() and "BrokenPipeError" not in process.stderr.decode()
    assert process.returncode in (0, 141)  # 141 = 128 + SIGPIPE, as a shell reports a closed pipe


def write_recipe(tmp_path, values) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def parse_command(argv):
    parser, subparsers = _build_argparse_parser()
    apply_recipe(subparsers.choices[argv[0]], argv)
    return parser.parse_args(argv)


def test_argparse_commands_take_underscores_and_accept_hyphens_in_flags_and_recipes(tmp_path):
    recipe = write_recipe(tmp_path, {"forget": "d", "backend": "perturb", "levels": 2, "output": "n.jsonl",
                                     "max_new_tokens": 5, "batch-size": 3})
    args = parse_command(["negatives", "--config", recipe, "--max_retries", "4", "--no-progress"])
    assert (args.max_new_tokens, args.batch_size, args.max_retries, args.no_progress) == (5, 3, 4, True)
    args = parse_command(["evaluate", "--model", "m", "--data", "d", "--max_new_tokens", "7", "--output-dir", "o"])
    assert (args.max_new_tokens, args.output_dir) == (7, "o")
    parser, subparsers = _build_argparse_parser()
    usage = subparsers.choices["make-target"].format_usage()
    assert "--output_dir" in usage and "--output-dir" not in usage  # underscores are the names shown


def test_a_recipe_key_in_both_spellings_is_one_clear_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"forget": "d", "backend": "perturb", "levels": 2, "output": "n.jsonl",
                                     "max_new_tokens": 5, "max-new-tokens": 6})
    assert main(["negatives", "--config", recipe]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and recipe in error and "name the same option" in error
    assert "'max_new_tokens'" in error and "'max-new-tokens'" in error


def test_gnm_unlearn_reads_hyphenated_recipe_keys(tmp_path):
    recipe = write_recipe(tmp_path, {"model-name-or-path": "m", "data_dir": "d", "max-steps": 7,
                                     "per-device-train-batch-size": 2, "loss-terms": ["ga", "gd"],
                                     "output_dir": str(tmp_path / "run"), "report_to": "none"})
    script_args, training_args, model_args = parse_arguments(["--config", recipe, "--gd-weight", "2"])
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (7, 2)
    assert training_args.loss_terms == ["ga", "gd"] and training_args.gd_weight == 2.0
    assert model_args.model_name_or_path == "m" and script_args.data_dir == "d"


def help_of(argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_gnm_unlearn_help_shows_our_options_first_and_help_all_shows_everything(capsys):
    lines = help_of(["unlearn", "--help"], capsys)
    text = "\n".join(lines)
    first_option = next(number for number, line in enumerate(lines) if line.lstrip().startswith("--data_dir"))
    assert first_option < 40 and len(lines) < 345  # our options only: 323 lines with the membership options
    for option in ("--loss_terms", "--gnm_weight", "--klb_weight", "--base_model", "--model_name_or_path", "--use_peft",
                   "--lora_r", "--max_steps", "--output_dir", "--help_all"):
        assert option in text, option
    assert "--lr_scheduler_kwargs" not in text and "--load_in_4bit" not in text
    assert "(default 0.5)" not in text and "0.5. (default: None)" in text  # one default, said once
    no_guard = text[text.index("--no_collapse_guard"):].split("\n  --")[0]
    assert "Turn collapse_guard off" in no_guard and "Stop (and roll back)" not in no_guard

    everything = "\n".join(help_of(["unlearn", "--help_all"], capsys))
    assert "--lr_scheduler_kwargs" in everything and "--load_in_4bit" in everything and "--loss_terms" in everything


@pytest.mark.parametrize(
    ("accelerator", "flag", "expected"),
    [(False, [], False),
     (True, [], True),
     (True, ["--dataloader_pin_memory", "false"], False), (False, ["--dataloader_pin_memory", "true"], True)],
    ids=["cpu-default", "accelerator-default", "accelerator-flag-off", "cpu-flag-on"],
)  # fmt: skip
def test_gnm_unlearn_pins_memory_only_with_an_accelerator_unless_told(tmp_path, monkeypatch, accelerator, flag,
                                                                      expected):
    """Pinned host memory only speeds up copies to an accelerator (on a CPU-only machine torch warns at every
    DataLoader instead): `gnm unlearn` pins by default exactly when the machine has one, and the flag still decides."""
    import torch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    argv = ["--model_name_or_path", "m", "--data_dir", "d", "--output_dir", str(tmp_path / "run"),
            "--report_to", "none", *flag]  # fmt: skip
    _, training_args, _ = parse_arguments(argv)
    assert training_args.dataloader_pin_memory is expected


def test_a_gnm_unlearn_run_prints_no_pin_memory_or_deprecation_warning(tmp_path, tiny_model, tiny_tokenizer):
    import importlib
    import warnings

    from conftest import fact_rows, write_workspace

    write_workspace(tmp_path, tiny_model, tiny_tokenizer, fact_rows("forget", 0, 4), fact_rows("retain", 4, 8))
    argv = ["unlearn", "--model_name_or_path", str(tmp_path / "target"), "--data_dir", str(tmp_path / "data"),
            "--negatives_path", str(tmp_path / "negatives.jsonl"), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "all-linear", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    # PEFT imports bitsandbytes (when installed) while wrapping, which calls torch.compile at import time and so
    # warns about torch.jit once per process: a library's import, not what this run does; imported before recording.
    importlib.import_module("peft.tuners.lora.bnb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    messages = [f"{warning.category.__name__}: {warning.message}" for warning in caught]
    assert not [message for message in messages if "pin_memory" in message or "deprecated" in message], messages
