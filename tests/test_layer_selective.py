"""Layer-selective unlearning (`--lora_layers_to_transform`): only the chosen layers get adapters and change."""

import pytest
import torch
from conftest import fact_rows

from gnm_trainer.cli.unlearn import build_peft_config, parse_arguments
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.target import build_tiny_llama


def parsed(tmp_path, *flags, peft_method="lora", modules=("q_proj", "v_proj", "down_proj")):
    argv = [
        "--model_name_or_path", "unused", "--data_dir", "unused", "--output_dir", str(tmp_path / "out"),
        "--use_peft", "--peft_method", peft_method, "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--lora_target_modules", *modules, "--loss_terms", "ga", "gd", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--optim", "sgd", "--learning_rate", "0.5", "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", "1", "--max_length", "64", "--adalora_target_r", "2",
        *flags,
    ]  # fmt: skip
    return parse_arguments(argv)


def three_layer_model(tokenizer):
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=3, num_heads=2, max_position_embeddings=256)


def train(model, tokenizer, peft_config, args):
    trainer = GNMTrainer(
        model, args, train_dataset=fact_rows("forget", 0, 4), retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    return trainer, before, changed


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


@pytest.mark.parametrize("peft_method", ["lora", "adalora"])
def test_only_the_chosen_layers_get_adapters_and_change(tiny_tokenizer, tmp_path, peft_method):
    script_args, args, model_args = parsed(tmp_path, "--lora_layers_to_transform", "0", "2", peft_method=peft_method)
    peft_config = build_peft_config(script_args, model_args)
    assert peft_config.layers_to_transform == [0, 2]
    trainer, before, changed = train(three_layer_model(tiny_tokenizer), tiny_tokenizer, peft_config, args)
    adapted = {name for name in before if ".lora_" in name}
    assert adapted and {layer_of(name) for name in adapted} == {0, 2}
    assert changed and changed <= adapted  # the base weights and layer 1 stay as they were
    assert {layer_of(name) for name in changed} == {0, 2}


def test_one_index_from_a_recipe_is_a_list_of_one_layer(tiny_tokenizer, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_layers_to_transform: 1\n")
    script_args, _, model_args = parsed(tmp_path, "--config", str(recipe))
    assert build_peft_config(script_args, model_args).layers_to_transform == [1]


def test_a_layer_the_model_does_not_have_is_one_line_naming_the_option_and_range(tiny_tokenizer, tmp_path):
    script_args, args, model_args = parsed(tmp_path, "--lora_layers_to_transform", "1", "3")
    with pytest.raises(GNMInputError) as error:
        train(three_layer_model(tiny_tokenizer), tiny_tokenizer, build_peft_config(script_args, model_args), args)
    message = str(error.value)
    assert "\n" not in message and "lora_layers_to_transform" in message
    assert "[3]" in message and "from 0 to 2" in message


def test_gnm_unlearn_reports_a_missing_layer_on_one_line(tmp_path, tiny_model, tiny_tokenizer, capsys):
    import yaml
    from conftest import write_workspace

    from gnm_trainer.cli import main

    write_workspace(tmp_path, tiny_model, tiny_tokenizer, fact_rows("forget", 0, 4), fact_rows("retain", 4, 8))
    recipe = {
        "model_name_or_path": str(tmp_path / "target"), "data_dir": str(tmp_path / "data"), "loss_terms": ["ga", "gd"],
        "use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj"], "lora_layers_to_transform": [0, 9],
        "max_steps": 1, "save_strategy": "no", "report_to": "none", "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # what saving the workspace printed
    assert main(["unlearn", "--config", str(tmp_path / "recipe.yaml")]) == 2
    error = capsys.readouterr().err
    mentions = [line for line in error.splitlines() if "lora_layers_to_transform" in line]  # after loading's bars
    assert len(mentions) == 1 and "[9]" in mentions[0] and "from 0 to 1" in mentions[0]
    assert "Traceback" not in error


def test_all_linear_cannot_be_combined_with_chosen_layers(tmp_path):
    script_args, _, model_args = parsed(tmp_path, "--lora_layers_to_transform", "0", modules=("all-linear",))
    with pytest.raises(GNMInputError, match="lora_layers_to_transform: PEFT cannot combine it with"):
        build_peft_config(script_args, model_args)


@pytest.mark.parametrize("model, layers", [("olmo-7b", [0, 1, 2, 3, 4, 5]), ("olmo-1b", [0, 1, 2])])
def test_the_layer_selective_recipes_adapt_the_first_layers_only(model, layers):
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "recipes", model, "semeval25")
    recipe = os.path.join(root, "config_layer_selective.yaml")
    script_args, _, model_args = parse_arguments(["--config", recipe, "--bf16", "false"])
    assert build_peft_config(script_args, model_args).layers_to_transform == layers
