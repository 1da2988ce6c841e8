"""`gnm unlearn`: a YAML recipe plus flag overrides, parsed strictly, trains and saves."""

import json
import os

import pytest
import yaml
from conftest import fact_rows, write_workspace
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gnm_trainer.cli import main
from gnm_trainer.cli.unlearn import parse_arguments


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_tokenizer):
    write_workspace(tmp_path, tiny_model, tiny_tokenizer, fact_rows("forget", 0, 4), fact_rows("retain", 4, 8))
    recipe = {
        "model_name_or_path": str(tmp_path / "target"),
        "data_dir": str(tmp_path / "data"),
        "negatives_path": str(tmp_path / "negatives.jsonl"),
        "loss_terms": ["ga", "klr", "gnm"],
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["all-linear"],
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
    }
    with open(tmp_path / "recipe.yaml", "w") as handle:
        yaml.safe_dump(recipe, handle)
    return tmp_path


def test_recipe_and_overrides_train_and_save_an_adapter(workspace):
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml"), "--max_steps", "2", "--klr_weight", "2.5"]) == 0
    run = workspace / "run"
    assert (run / "adapter_config.json").exists() and (run / "tokenizer.json").exists()
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # the flag overrode the recipe's 3
    assert all("loss_gnm" in entry for entry in state["log_history"] if "loss" in entry)
    base = AutoModelForCausalLM.from_pretrained(workspace / "target")
    assert isinstance(PeftModel.from_pretrained(base, run), PeftModel)


def test_adalora_and_merged_weights_from_the_cli(workspace):
    code = main(
        ["unlearn", "--config", str(workspace / "recipe.yaml"), "--peft_method", "adalora", "--adalora_target_r", "2", "--lora_target_modules", "q_proj", "v_proj",
         "--merge_adapters", "true", "--output_dir", str(workspace / "merged")]
    )
    assert code == 0
    assert not os.path.exists(workspace / "merged" / "adapter_config.json")
    assert AutoModelForCausalLM.from_pretrained(workspace / "merged") is not None


def test_unknown_recipe_key_is_an_error(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["warmup_ratio_typo"] = 0.1
    (workspace / "bad.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["unlearn", "--config", str(workspace / "bad.yaml")]) == 2
    error = capsys.readouterr().err
    assert "warmup_ratio_typo" in error and "Traceback" not in error


def test_missing_recipe_and_missing_data_are_clear_errors(workspace, capsys):
    assert main(["unlearn", "--config", str(workspace / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml"), "--data_dir", str(workspace / "void")]) == 2
    assert "void: file or folder not found" in capsys.readouterr().err


def test_flags_alone_parse_into_the_three_argument_groups(workspace):
    script_args, training_args, model_args = parse_arguments(
        ["--model_name_or_path", "m", "--data_dir", "d", "--loss_terms", "ga", "gd", "--output_dir", str(workspace / "o")]
    )
    assert script_args.data_dir == "d" and model_args.model_name_or_path == "m"
    assert training_args.loss_terms == ["ga", "gd"] and training_args.loss_weights == {"ga": 0.5, "gd": 5.0}
