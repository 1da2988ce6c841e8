"""PEFT settings that do not fit the model or the run (`gnm_trainer.peft_checks`): one line naming the setting, as the
`gnm unlearn` flag and the `peft_config` field, or the setting adjusted and said in one log line; never an error from
inside PEFT, neither when the model is wrapped nor later, in the middle of training."""

import logging

import pytest
import yaml
from conftest import fact_rows, write_workspace
from peft import AdaLoraConfig, LoraConfig
from test_bad_input import one_line_error

from gnm_trainer.cli import main
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer


def tiny_moe(tokenizer):
    """A 2-layer Qwen3-MoE (4 experts): transformers 5 fuses its experts into 3-D parameters, which PEFT's LoRA
    adapts through `lora.ParamWrapper` (all-linear includes them)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def trainer_with(model, tokenizer, tmp_path, peft_config, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), loss_terms=["ga", "gd"], max_steps=3, per_device_train_batch_size=2,
                  report_to="none", save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return GNMTrainer(model, GNMConfig(**values), train_dataset=fact_rows("forget", 0, 4),
                      retain_dataset=fact_rows("retain", 4, 8), processing_class=tokenizer, peft_config=peft_config)


def refused(model, tokenizer, tmp_path, peft_config, **overrides) -> str:
    """The one-line GNMInputError that building the trainer raises (never PEFT's own error)."""
    with pytest.raises(GNMInputError) as raised:
        trainer_with(model, tokenizer, tmp_path, peft_config, **overrides)
    message = str(raised.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Through the API (GNMTrainer's peft_config)
# ---------------------------------------------------------------------------------------------------------------


def test_moe_experts_refuse_dropout_so_it_is_zeroed_with_disable_dropout_and_named_without(
        tiny_tokenizer, tmp_path, caplog):
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05)
    with caplog.at_level(logging.WARNING, logger="gnm_trainer.peft_checks"):
        trainer = trainer_with(tiny_moe(tiny_tokenizer), tiny_tokenizer, tmp_path, lora)
    said = [message for message in (record.getMessage() for record in caplog.records)
            if "lora_dropout (peft_config.lora_dropout)" in message]
    assert len(said) == 1 and "set to 0" in said[0] and "experts" in said[0]
    assert any(type(module).__name__ == "ParamWrapper" for module in trainer.model.modules())
    trainer.train()
    assert trainer.state.global_step == 3

    message = refused(tiny_moe(tiny_tokenizer), tiny_tokenizer, tmp_path, lora, disable_dropout=False)
    assert message.startswith("lora_dropout (peft_config.lora_dropout): 0.05") and "set lora_dropout to 0" in message


def test_moe_expert_names_of_transformers_4_must_come_in_fused_pairs(tiny_tokenizer, tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], lora_dropout=0.0)
    message = refused(tiny_moe(tiny_tokenizer), tiny_tokenizer, tmp_path, lora)
    assert message.startswith("lora_target_modules (peft_config.target_modules): ") and "up_proj" in message


def test_no_target_modules_on_a_model_type_peft_has_no_default_for(tiny_tokenizer, tmp_path):
    message = refused(tiny_moe(tiny_tokenizer), tiny_tokenizer, tmp_path, LoraConfig(r=4, lora_dropout=0.0))
    assert message.startswith("lora_target_modules (peft_config.target_modules): not set") and "qwen3_moe" in message


def test_lora_on_parameters_without_dora(tiny_tokenizer, tmp_path):
    lora = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], lora_dropout=0.0,
                      use_dora=True)
    message = refused(tiny_moe(tiny_tokenizer), tiny_tokenizer, tmp_path, lora)
    assert message.startswith("use_dora (peft_config.use_dora): ")


def test_adalora_schedule_that_leaves_no_budgeting_phase(tiny_model, tiny_tokenizer, tmp_path):
    adalora = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, target_modules=["q_proj"], total_step=100)
    message = refused(tiny_model, tiny_tokenizer, tmp_path, adalora, max_steps=4)
    assert message.startswith("adalora_tinit (peft_config.tinit) + adalora_tfinal (peft_config.tfinal): 2 + 2 = 4")
    assert "this run's 4 optimizer step(s)" in message
    trainer_with(tiny_model, tiny_tokenizer, tmp_path, adalora, max_steps=5)  # one step left to budget: fine


@pytest.mark.parametrize(
    ("peft_config", "named"),
    [
        (AdaLoraConfig(init_r=4, target_r=2, deltaT=0, target_modules=["q_proj"], total_step=10), "adalora_delta_t"),
        (AdaLoraConfig(init_r=4, target_r=6, target_modules=["q_proj"], total_step=10), "adalora_target_r"),
        (AdaLoraConfig(init_r=0, target_r=0, target_modules=["q_proj"], total_step=10), "lora_r (peft_config.init_r)"),
        (AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10, use_rslora=True), "use_rslora"),
        (AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], target_parameters=["k_proj.weight"],
                       total_step=10), "lora_target_parameters"),
        (AdaLoraConfig(init_r=4, target_r=2, target_modules=["embed_tokens"], total_step=10), "lora_target_modules"),
        (LoraConfig(r=0, target_modules=["q_proj"]), "lora_r (peft_config.r)"),
        (LoraConfig(r=4, lora_alpha=0, target_modules=["q_proj"]), "lora_alpha"),
        (LoraConfig(r=4, lora_dropout=1.0, target_modules=["q_proj"]), "lora_dropout"),
        (LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"), "lora_task_type"),
        (LoraConfig(r=4, target_modules=["self_attn"]), "lora_target_modules"),
        (LoraConfig(r=4, target_modules=["q_proj", "v_prj"]), "lora_target_modules"),
        (LoraConfig(r=4, target_modules="nothing.*"), "lora_target_modules"),
        (LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["nothing.weight"]), "lora_target_parameters"),
        (LoraConfig(r=4, target_modules="all-linear", target_parameters=["k_proj.weight"]), "lora_target_parameters"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["nothing"]), "lora_modules_to_save"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["q_proj"]), "lora_modules_to_save"),
        (LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 7]), "lora_layers_to_transform"),
    ],
    ids=["adalora-delta-t-0", "adalora-target-above-init", "adalora-rank-0", "adalora-rslora",
         "adalora-parameters", "adalora-embedding", "lora-rank-0", "alpha-0", "dropout-1", "task-type",
         "container-module", "typo-in-a-list", "regex-matching-nothing", "parameter-matching-nothing",
         "parameter-of-an-adapted-layer", "save-matching-nothing", "save-and-adapt", "layer-outside"],
)
def test_a_setting_that_does_not_fit_names_its_flag_and_field(tiny_model, tiny_tokenizer, tmp_path, peft_config,
                                                              named):
    message = refused(tiny_model, tiny_tokenizer, tmp_path, peft_config)
    assert f"{named} (peft_config." in message or message.startswith(named)


def test_a_rank_above_a_layers_dimension_is_said_in_one_log_line(tiny_model, tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gnm_trainer.peft_checks"):
        trainer_with(tiny_model, tiny_tokenizer, tmp_path, LoraConfig(r=40, target_modules="all-linear"))
    said = [message for message in (record.getMessage() for record in caplog.records)
            if message.startswith("lora_r (peft_config.r)")]
    assert len(said) == 1 and "40 is above the smaller dimension of" in said[0]  # hidden size 32


# ---------------------------------------------------------------------------------------------------------------
# Through `gnm unlearn`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_tokenizer):
    """A saved tiny Llama and a saved tiny Qwen3-MoE, a data folder, negatives and a LoRA recipe of 3 steps."""
    write_workspace(tmp_path, tiny_model, tiny_tokenizer, fact_rows("forget", 0, 4), fact_rows("retain", 4, 8))
    moe = tiny_moe(tiny_tokenizer)
    moe.save_pretrained(tmp_path / "moe")
    tiny_tokenizer.save_pretrained(tmp_path / "moe")
    recipe = {
        "model_name_or_path": str(tmp_path / "target"), "data_dir": str(tmp_path / "data"),
        "negatives_path": str(tmp_path / "negatives.jsonl"), "loss_terms": ["ga", "gd"], "use_peft": True,
        "lora_r": 4, "lora_target_modules": ["all-linear"], "max_steps": 3, "per_device_train_batch_size": 2,
        "max_length": 64, "save_strategy": "no", "report_to": "none", "output_dir": str(tmp_path / "run"),
        "disable_tqdm": True,
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def unlearn_error(capsys, workspace, *flags) -> str:
    return one_line_error(capsys, ["unlearn", "--config", str(workspace / "recipe.yaml"), *flags], 2)


def test_cli_moe_with_the_default_dropout(workspace, capsys):
    moe = ["--model_name_or_path", str(workspace / "moe")]  # lora_dropout: TRL's default 0.05
    line = unlearn_error(capsys, workspace, *moe, "--disable_dropout", "false")
    assert "lora_dropout (peft_config.lora_dropout): 0.05" in line and "set lora_dropout to 0" in line
    assert main(["unlearn", "--config", str(workspace / "recipe.yaml"), *moe]) == 0  # disable_dropout: zeroed, said


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--peft_method", "adalora", "--adalora_target_r", "2", "--adalora_tinit", "2", "--adalora_tfinal", "1"],
         "adalora_tinit (peft_config.tinit) + adalora_tfinal (peft_config.tfinal): 2 + 1 = 3"),
        (["--peft_method", "adalora", "--adalora_target_r", "2", "--adalora_delta_t", "0"], "adalora_delta_t"),
        (["--peft_method", "adalora", "--lora_r", "1", "--adalora_target_r", "0"], "adalora_target_r"),
        (["--peft_method", "adalora", "--adalora_target_r", "2", "--use_dora"], "use_dora"),
        (["--lora_target_modules", "q_proj", "v_prj"], "lora_target_modules (peft_config.target_modules)"),
        (["--lora_target_modules", "q_proj", "--lora_modules_to_save", "nothing"], "lora_modules_to_save"),
        (["--lora_target_parameters", "k_proj.weight", "--lora_dropout", "0"], "lora_target_parameters"),
        (["--lora_r", "0"], "lora_r (peft_config.r)"),
    ],
    ids=["adalora-schedule", "adalora-delta-t", "adalora-target-r", "adalora-dora", "module-typo",
         "save-nothing", "parameter-twice", "rank-0"],
)
def test_cli_settings_that_do_not_fit_are_one_line_naming_the_flag(workspace, capsys, flags, named):
    assert named in unlearn_error(capsys, workspace, *flags)
