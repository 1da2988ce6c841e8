"""The TRL workflow of docs/trl_workflow.md, executed as written: SFTTrainer makes a target, GNMTrainer unlearns part
of it with a PEFT config from TRL's get_peft_config and a GNMConfig parsed by TrlParser, evaluate_model scores it; or
SFTTrainer trains a LoRA adapter and GNMTrainer unlearns by training that adapter further, the SFT model as reference."""

import os
import re
import sys

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "trl_workflow.md")


def doc_snippet() -> str:
    """The doc's one python block (the test fails if there is not exactly one)."""
    with open(DOC, encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in {DOC}, found {len(blocks)}"
    return blocks[0]


@pytest.mark.parametrize(
    "conversational, sft_with_peft", [(False, False), (True, False), (False, True)],
    ids=["standard", "conversational", "sft_with_lora"],
)
def test_doc_pipeline_runs_and_unlearns(conversational, sft_with_peft, tmp_path, monkeypatch, capsys):
    argv = ["trl_workflow.py", "--output_dir", str(tmp_path / "run"), "--max_steps", "12", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--max_length", "64", "--logging_steps", "4", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--text_template", "{prompt}{completion}",
            "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "all-linear",
            "--sft_epochs", "80", "--conversational", str(conversational).lower(),
            "--sft_with_peft", str(sft_with_peft).lower()]
    if sft_with_peft:
        argv += ["--lora_modules_to_save", "lm_head"]  # LoRA alone cannot make the tiny random model sure of a fact
    monkeypatch.setattr(sys, "argv", argv)
    namespace = {"__name__": "__main__"}
    exec(compile(doc_snippet(), DOC, "exec"), namespace)

    from peft import LoraConfig, PeftModel

    from gnm_trainer.gnm_config import GNMConfig

    trainer = namespace["trainer"]
    assert isinstance(namespace["gnm_args"], GNMConfig) and namespace["gnm_args"].max_steps == 12
    assert isinstance(trainer.model, PeftModel)
    assert isinstance(trainer.model.peft_config["default"], LoraConfig) and trainer.model.peft_config["default"].r == 8
    if sft_with_peft:
        # The SFT adapter is the one unlearned, and the reference is the SFT model: its frozen copy gives exactly the
        # forget NLL measured before unlearning.
        assert trainer.model is namespace["sft"].model and trainer.reference_mode == "reference_adapter"
        assert list(trainer.model.peft_config) == ["default", "reference"]
        from gnm_trainer.reference import reference_adapter_active

        with reference_adapter_active(trainer.model, trainer.model):
            reference_nll = namespace["completion_nll"](trainer.model, namespace["forget"])
        assert reference_nll == pytest.approx(namespace["forget_nll_before"], abs=1e-5)
    else:
        assert trainer.reference_mode == "adapter_disabled"
    assert all(row["chat"] == conversational for row in namespace["forget"])
    # SFT memorised the facts; unlearning made the forget completions much less likely.
    assert namespace["forget_nll_before"] < 0.3
    assert namespace["forget_nll_after"] > 3 * namespace["forget_nll_before"] + 0.5
    before, after = namespace["before"], namespace["after"]
    if not conversational:
        assert before["forget-set"]["Task2"]["knowledge-score"] == 1.0
        assert after["forget-set"]["Task2"]["knowledge-score"] < before["forget-set"]["Task2"]["knowledge-score"]
    assert "forget NLL:" in capsys.readouterr().out
