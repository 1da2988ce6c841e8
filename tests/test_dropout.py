"""`GNMConfig.disable_dropout` on a model whose config carries dropout (GPT-2: 0.1 everywhere by default)."""

import pytest
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel

from gnm_trainer import GNMConfig, GNMTrainer
from gnm_trainer.dropout import disable_dropout

from conftest import fact_negatives, fact_rows


def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1  # GPT-2's defaults
    return GPT2LMHeadModel(config)


def first_step_terms(tokenizer, tmp_path, **settings) -> dict:
    """The loss terms of the first training step (before any update), from the model in training mode."""
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    args = GNMConfig(output_dir=str(tmp_path), loss_terms=["ga", "klr", "gnm"], per_device_train_batch_size=4,
                     max_steps=1, report_to="none", save_strategy="no", seed=3, max_length=64, **settings)
    trainer = GNMTrainer(tiny_gpt2(tokenizer), args, train_dataset=forget, retain_dataset=retain,
                         negative_dataset=fact_negatives(forget), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"]))
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    torch.manual_seed(0)
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return {name: value.item() for name, value in outputs["terms"].items()}


def test_disable_dropout_zeroes_modules_and_rates():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout = 0.2  # a rate the attention code passes to its kernel
            self.resid_dropout = torch.nn.Dropout(0.3)
            self.scale = 0.5  # not a dropout: untouched

    model = torch.nn.Sequential(Attention(), torch.nn.Dropout(0.1))
    assert disable_dropout(model) == 0.3
    assert model[0].attention_dropout == 0.0 and model[0].resid_dropout.p == 0.0 and model[1].p == 0.0
    assert model[0].scale == 0.5
    assert disable_dropout(model) == 0.0  # nothing left


def test_klr_is_zero_at_the_first_step_with_dropout_disabled(tiny_tokenizer, tmp_path):
    """A zero-initialised LoRA leaves the policy equal to the reference: the KL is 0 without dropout, up to the
    rounding of matrix products of other shapes (the policy pass packs more sequences than the reference pass)."""
    assert abs(first_step_terms(tiny_tokenizer, tmp_path)["klr"]) < 1e-8
    # With the model's dropout kept, the policy's training-mode logits are noisy and the KL is not 0.
    assert first_step_terms(tiny_tokenizer, tmp_path, disable_dropout=False)["klr"] > 1e-5


def test_packed_equals_padded_on_a_model_with_dropout(tiny_tokenizer, tmp_path):
    packed = first_step_terms(tiny_tokenizer, tmp_path / "packed", padding_free=True, max_packed_length=24)
    padded = first_step_terms(tiny_tokenizer, tmp_path / "padded", padding_free=False)
    assert packed.keys() == padded.keys() == {"ga", "klr", "gnm"}
    for term in packed:
        assert packed[term] == pytest.approx(padded[term], abs=1e-6), term
    kept = first_step_terms(tiny_tokenizer, tmp_path / "packed-kept", padding_free=True, max_packed_length=24,
                            disable_dropout=False)
    assert abs(kept["ga"] - padded["ga"]) > 1e-4  # dropout on: the same rows give other losses


def test_reference_and_base_passes_never_use_dropout(tiny_tokenizer, tmp_path):
    """With the model's dropout kept (disable_dropout=False), the reference pass still runs without it: two
    reference passes over the same batch agree exactly, and agree with the model in eval mode."""
    forget = fact_rows("forget", 0, 4)
    for mode in ("adapter_disabled", "copy"):
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]) if mode == "adapter_disabled" else None
        args = GNMConfig(output_dir=str(tmp_path / mode), loss_terms=["ga", "npo"], per_device_train_batch_size=4,
                         max_steps=1, report_to="none", save_strategy="no", max_length=64, disable_dropout=False,
                         reference_model=mode, padding_free=False)
        trainer = GNMTrainer(tiny_gpt2(tiny_tokenizer), args, train_dataset=forget, processing_class=tiny_tokenizer,
                             peft_config=peft)
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        group = {key: batch[f"forget_{key}"] for key in ("input_ids", "attention_mask", "completion_mask")}
        first = trainer._reference_forward(trainer.model, {"forget": group})["forget"]
        second = trainer._reference_forward(trainer.model, {"forget": group})["forget"]
        assert torch.equal(first, second), mode
        assert trainer.model.training, mode  # the policy is back in training mode afterwards
        trainer.model.eval()
        with torch.no_grad():
            if mode == "copy":
                trainer.model.load_state_dict(trainer.ref_model.state_dict())
                evaluated = trainer._forward(trainer.model, {"forget": group})["forget"]
            else:
                with trainer.model.disable_adapter():
                    evaluated = trainer._forward(trainer.model, {"forget": group})["forget"]
        torch.testing.assert_close(first, evaluated, rtol=0, atol=1e-6)
