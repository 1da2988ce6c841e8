"""Every recipe parses strictly (an unknown or removed argument fails), and the tiny one runs as documented."""

import glob
import json
import os

import pytest

from gnm_trainer.cli import _build_argparse_parser, apply_recipe, main
from gnm_trainer.cli.unlearn import parse_arguments

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
UNLEARN_RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*", "config_*.yaml")))
COMMAND_RECIPES = sorted(
    glob.glob(os.path.join(ROOT, "recipes", "*", "*", "negatives.yaml"))
    + glob.glob(os.path.join(ROOT, "recipes", "*", "*", "evaluate.yaml"))
)


def test_the_expected_recipes_exist():
    names = {os.path.relpath(path, os.path.join(ROOT, "recipes")) for path in UNLEARN_RECIPES}
    for model in ("olmo-7b", "olmo-1b"):
        for variant in ("gnm_adalora", "gnm_lora", "ga", "ga_gd", "ga_klr", "npo_gd"):
            assert f"{model}/semeval25/config_{variant}.yaml" in names
    assert "tiny/embedded/config_gnm_lora.yaml" in names
    assert len(COMMAND_RECIPES) == 6


@pytest.mark.parametrize("path", UNLEARN_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_unlearn_recipes_parse_strictly(path):
    # bf16 is overridden only because this CPU cannot train in bf16; every key of the file is still checked.
    script_args, training_args, model_args = parse_arguments(["--config", path, "--bf16", "false"])
    assert model_args.model_name_or_path and (script_args.data_dir or script_args.dataset_name)
    assert training_args.loss_terms
    if "gnm" in training_args.loss_terms:
        assert script_args.negatives_path


def test_the_paper_recipe_is_the_papers():
    path = os.path.join(ROOT, "recipes", "olmo-7b", "semeval25", "config_gnm_adalora.yaml")
    script_args, args, model_args = parse_arguments(["--config", path, "--bf16", "false"])
    assert script_args.peft_method == "adalora" and model_args.use_peft
    assert model_args.lora_target_modules == "all-linear"
    assert args.loss_weights == {"ga": 0.5, "klr": 5.0, "gnm": 0.04}
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (1e-4, "linear", 0)
    assert (args.per_device_train_batch_size, args.max_steps, args.save_steps) == (1, 800, 100)
    assert args.text_template == "{prompt} >> {completion} is the answer."


@pytest.mark.parametrize("path", COMMAND_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_negatives_and_evaluate_recipes_parse_strictly(path):
    command = os.path.basename(path)[: -len(".yaml")]
    parser, subparsers = _build_argparse_parser()
    argv = [command, "--config", path]
    apply_recipe(subparsers.choices[command], argv)
    args = parser.parse_args(argv)
    assert args.func is not None


def test_an_unknown_recipe_key_is_an_error(tmp_path, capsys):
    bad = tmp_path / "negatives.yaml"
    bad.write_text("forget: data\nbackend: perturb\nlevels: 2\noutput: n.jsonl\nlevel: 3\n")
    assert main(["negatives", "--config", str(bad)]) == 2
    assert "unknown key(s) ['level']" in capsys.readouterr().err


def test_the_tiny_recipe_runs_as_documented(tmp_path, monkeypatch):
    """The README's four commands, with a smaller target and fewer steps so that the suite stays fast."""
    from gnm_trainer.target import make_target

    monkeypatch.chdir(tmp_path)
    make_target(
        output_dir="runs/tiny/target", hidden_size=128, num_layers=2, num_heads=2, max_documents_per_split=4,
        epochs=80, learning_rate=3e-3, progress=False,
    )
    recipes = os.path.join(ROOT, "recipes", "tiny", "embedded")
    assert main(["negatives", "--config", os.path.join(recipes, "negatives.yaml"), "--no-progress"]) == 0
    assert main(["unlearn", "--config", os.path.join(recipes, "config_gnm_lora.yaml"), "--max_steps", "3"]) == 0
    assert main(["evaluate", "--config", os.path.join(recipes, "evaluate.yaml"), "--max-new-tokens", "16"]) == 0
    assert os.path.isfile("runs/tiny/gnm-lora/adapter_config.json")
    results = json.loads(open("runs/tiny/evaluation/evaluation_results.json").read())
    assert 0.0 <= results["harmonic-mean-task-aggregate"] <= 1.0 and "mia_loss_acc" in results
