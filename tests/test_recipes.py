"""Every recipe parses strictly (an unknown or removed argument fails), and the tiny one runs as documented."""

import glob
import json
import os

import pytest

from gnm_trainer.cli import _build_argparse_parser, apply_recipe, main
from gnm_trainer.cli.unlearn import parse_arguments
from gnm_trainer.gnm_config import PAPER_TEXT_TEMPLATE

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
UNLEARN_RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*", "config_*.yaml")))
COMMAND_RECIPES = sorted(
    glob.glob(os.path.join(ROOT, "recipes", "*", "*", "negatives.yaml"))
    + glob.glob(os.path.join(ROOT, "recipes", "*", "*", "evaluate.yaml"))
)


def test_the_expected_recipes_exist():
    names = {os.path.relpath(path, os.path.join(ROOT, "recipes")) for path in UNLEARN_RECIPES}
    for model in ("olmo-7b", "olmo-1b"):
        for variant in ("gnm_adalora", "gnm_adalora_paper_template", "gnm_lora", "ga", "ga_gd", "ga_klr", "npo_gd"):
            assert f"{model}/semeval25/config_{variant}.yaml" in names
    assert "tiny/embedded/config_gnm_lora.yaml" in names
    for folder in ("olmo-7b/semeval25", "olmo-1b/semeval25", "tiny/embedded"):
        assert f"{folder}/config_recommended.yaml" in names
    assert len(COMMAND_RECIPES) == 6


@pytest.mark.parametrize("path", UNLEARN_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_unlearn_recipes_parse_strictly(path):
    # bf16 is overridden only because this CPU cannot train in bf16; every key of the file is still checked.
    script_args, training_args, model_args = parse_arguments(["--config", path, "--bf16", "false"])
    assert model_args.model_name_or_path and (script_args.data_dir or script_args.dataset_name)
    assert training_args.loss_terms
    if "gnm" in training_args.loss_terms:
        assert script_args.negatives_path


# What the authors' run sets apart from the recommended recipe: their text, no clipping, torch AdamW's decay.
PAPER_ONLY = {"text_template": PAPER_TEXT_TEMPLATE, "max_grad_norm": 0.0, "weight_decay": 0.01}


def _recipe(model: str, variant: str):
    path = os.path.join(ROOT, "recipes", model, "semeval25", f"config_{variant}.yaml")
    return parse_arguments(["--config", path, "--bf16", "false"])


@pytest.mark.parametrize("model", ["olmo-7b", "olmo-1b"])
def test_the_paper_template_recipe_is_the_authors_run(model):
    script_args, args, model_args = _recipe(model, "gnm_adalora_paper_template")
    assert script_args.peft_method == "adalora" and model_args.use_peft
    assert model_args.lora_target_modules == "all-linear"
    assert args.loss_weights == {"ga": 0.5, "klr": 5.0, "gnm": 0.04}
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (1e-4, "linear", 0)
    assert (args.per_device_train_batch_size, args.max_steps, args.save_steps) == (1, 800, 100)
    assert {key: getattr(args, key) for key in PAPER_ONLY} == PAPER_ONLY


@pytest.mark.parametrize("model", ["olmo-7b", "olmo-1b"])
def test_the_recommended_gnm_recipe_differs_from_the_authors_run_only_in_text_clipping_and_decay(model):
    recommended, paper = _recipe(model, "gnm_adalora"), _recipe(model, "gnm_adalora_paper_template")
    assert vars(recommended[0]) == vars(paper[0]) and recommended[2] == paper[2]
    ours, theirs = recommended[1].to_dict(), paper[1].to_dict()
    differing = {key for key in ours if ours[key] != theirs[key]}
    assert differing == set(PAPER_ONLY) | {"output_dir"}
    assert (ours["max_grad_norm"], ours["weight_decay"]) == (1.0, 0.0)


@pytest.mark.parametrize("path", [p for p in UNLEARN_RECIPES if "paper_template" not in p],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_recommended_recipes_train_in_the_format_the_evaluation_reads(path):
    """The official scorer (and `gnm evaluate` by default) prompts with the raw input: the training text's prompt
    side must be the raw prompt, or unlearning acts on a format nothing evaluates."""
    from gnm_trainer.evaluation.evaluator import OFFICIAL_PROMPT, prompt_format

    _, args, _ = parse_arguments(["--config", path, "--bf16", "false"])
    assert prompt_format(args.text_template) == OFFICIAL_PROMPT


@pytest.mark.parametrize("max_grad_norm, clipped_steps", [(0.0, 0), (1.0, 2)])
def test_the_trainer_clips_only_when_max_grad_norm_is_positive(tmp_path, tiny_model, tiny_tokenizer, monkeypatch,
                                                               max_grad_norm, clipped_steps):
    """`max_grad_norm: 0` in the paper-template recipe means no clipping, as in the authors' loop."""
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    calls = []
    clip = Trainer._clip_grad_norm
    monkeypatch.setattr(Trainer, "_clip_grad_norm", lambda self, model: calls.append(1) or clip(self, model))
    ids = [tiny_tokenizer("Alma Breck loves teal.")["input_ids"]] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", max_grad_norm=max_grad_norm, disable_tqdm=True)
    Trainer(model=tiny_model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}),
            data_collator=default_data_collator).train()
    assert len(calls) == clipped_steps


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


@pytest.mark.parametrize("folder", ["olmo-7b/semeval25", "olmo-1b/semeval25", "tiny/embedded"])
def test_every_recommended_recipe_is_the_recommended_loss(folder):
    """One recommended loss (gnm_trainer.recipes, chosen on validation by the quality benchmark): each model's
    config_recommended.yaml trains it, with its base model; the tiny target has none (trained from scratch), so its
    recipe is the one without `klb`, as `gnm demo --recipe recommended` runs it on that target."""
    from gnm_trainer.demo import DemoSettings
    from gnm_trainer.recipes import RECIPES, RECOMMENDED, RECOMMENDED_WITHOUT_BASE

    _, args, _ = parse_arguments(["--config", os.path.join(ROOT, "recipes", folder, "config_recommended.yaml"),
                                  "--bf16", "false"])
    expected = RECOMMENDED_WITHOUT_BASE if folder.startswith("tiny") else RECOMMENDED
    assert {key: getattr(args, key) for key in expected} == expected
    assert bool(args.base_model) is ("klb" in expected["loss_terms"])
    assert RECIPES[DemoSettings(recipe="recommended").recipe] is RECOMMENDED


def test_the_recommended_recipe_of_a_target_with_and_without_a_base_model():
    from gnm_trainer.recipes import RECOMMENDED, RECOMMENDED_WITHOUT_BASE, recommended_recipe

    with_base = recommended_recipe(5.47, "runs/target/pretrained")
    assert with_base == {**RECOMMENDED, "base_model": "runs/target/pretrained", "simnpo_delta": 5.5}
    assert recommended_recipe(4.946) == {**RECOMMENDED_WITHOUT_BASE, "simnpo_delta": 4.5}


@pytest.mark.parametrize("model", ["olmo-7b", "olmo-1b"])
def test_the_recommended_olmo_recipes_keep_their_step_on_membership_as_the_benchmark_does(model):
    from gnm_trainer.recipes import membership_schedule

    script_args, args, _ = parse_arguments(["--config", os.path.join(ROOT, "recipes", model, "semeval25",
                                                                     "config_recommended.yaml"), "--bf16", "false"])
    first, last, every = membership_schedule(600)
    assert (script_args.membership_start_step, args.max_steps, script_args.keep_best_membership_steps) == (
        first, last, every) == (400, 800, 50)
    assert script_args.eval_on_validation_steps is None  # the two cannot be combined
    assert script_args.membership_members.endswith("mia/member.jsonl")
    assert "nonmember" not in script_args.membership_reference  # never the evaluation's non-members


def test_a_recipe_is_described_with_its_weights_and_its_other_settings():
    from gnm_trainer.recipes import PAPER, describe

    assert describe(PAPER) == "ga 0.5 + klr 5 + gnm 0.04"
    whole_text = {"loss_terms": ["simnpo", "gd"], "simnpo_weight": 1.0, "gd_weight": 1.0,
                  "forget_completion_only_loss": False}
    assert describe(whole_text) == "simnpo 1 + gd 1, forget_completion_only_loss=False"


def test_the_recommended_margin_is_the_reference_nll_or_nine_tenths_of_it_without_klb():
    import yaml

    from gnm_trainer.recipes import calibrated_margin

    assert calibrated_margin(5.47) == 5.5  # the quality benchmark's target: its grid chose δ 5.5 with klb
    assert calibrated_margin(5.52, with_base_model=False) == 5.0  # and δ 5 without klb (run of b17e659)
    # The default target (recipes/tiny/embedded): `gnm calibrate` on its reference.jsonl measured 4.946 nats.
    with open(os.path.join(ROOT, "recipes", "tiny", "embedded", "config_recommended.yaml"), encoding="utf-8") as handle:
        assert yaml.safe_load(handle)["simnpo_delta"] == calibrated_margin(4.946, with_base_model=False) == 4.5
