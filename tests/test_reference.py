"""The reference model is the model as it was handed to `GNMTrainer`. A `PeftModel` whose adapter was trained before
(SFT with LoRA, then unlearning) keeps training that adapter, and its reference is a frozen copy of it (the adapter
named `reference`), not the base without it: `klr` and NPO's log-ratio are 0 before the first update."""

import os

import pytest
import torch
from conftest import FACTS, fact_rows
from peft import LoraConfig, PeftModel, get_peft_model

from gnm_trainer import losses
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.target import build_tiny_llama

REFERENCE_ADAPTER = "reference"  # the name of the frozen copy, as TRL's `ref_adapter_name` examples call it


def lora_trained_a_few_steps(model, tokenizer):
    """`model` with a LoRA adapter trained for 5 steps on the facts (its B matrices are no longer zero)."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    batch = tokenizer([f"{q} {a}" for q, a in FACTS], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        peft_model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    return peft_model


def unlearning_trainer(model, tokenizer, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), loss_terms=["ga", "klr", "npo"], max_steps=2, per_device_train_batch_size=2,
        logging_steps=1, save_strategy="no", report_to="none", seed=7, max_length=64, learning_rate=1e-3,
    )
    values.update(overrides)
    return GNMTrainer(
        model, GNMConfig(**values), train_dataset=fact_rows("forget", 0, 4), retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tokenizer,
    )


def adapter_weights(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}


def test_reference_of_a_trained_adapter_is_that_adapter(tiny_model, tiny_tokenizer, tmp_path):
    handed_in = lora_trained_a_few_steps(tiny_model, tiny_tokenizer)
    trainer = unlearning_trainer(handed_in, tiny_tokenizer, tmp_path, save_strategy="steps", save_steps=1)

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    keys = ("input_ids", "attention_mask", "completion_mask")
    groups = {name: {key: batch[f"{name}_{key}"] for key in keys} for name in ("forget", "retain")}
    with torch.no_grad():
        handed_in_logits = trainer._forward(trainer.model, groups)
    reference_logits = trainer._reference_forward(trainer.model, groups)
    for name in groups:
        torch.testing.assert_close(reference_logits[name], handed_in_logits[name], rtol=0, atol=1e-6)
    assert trainer.reference_mode == "reference_adapter"
    assert trainer.model.active_adapter == "default"  # the reference forward pass switched back

    before = {"default": adapter_weights(trainer.model, "default"), REFERENCE_ADAPTER: adapter_weights(trainer.model, REFERENCE_ADAPTER)}
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss_klr" in entry)  # on the weights handed in
    assert first["step"] == 1 and abs(first["loss_klr"]) <= 1e-6
    zero_log_ratio = losses.npo_loss(torch.zeros(1), torch.zeros(1), trainer.args.npo_beta).item()
    assert first["loss_npo"] == pytest.approx(zero_log_ratio, abs=1e-5)
    # The user's adapter is the one trained; its frozen copy stays as it was handed in.
    trained = adapter_weights(trainer.model, "default")
    assert any(not torch.equal(trained[n], before["default"][n]) for n in trained)
    reference = adapter_weights(trainer.model, REFERENCE_ADAPTER)
    assert reference.keys() and all(torch.equal(reference[n], before[REFERENCE_ADAPTER][n]) for n in reference)
    assert all(p.requires_grad == (".default" in n) for n, p in trainer.model.named_parameters())

    # Checkpoints and the final save hold the user's adapter alone, which loads back as the trained model.
    trainer.save_model()
    output_dir = trainer.args.output_dir
    for folder in (output_dir, os.path.join(output_dir, "checkpoint-2")):
        assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
        assert not os.path.exists(os.path.join(folder, REFERENCE_ADAPTER))
    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    loaded = PeftModel.from_pretrained(base, output_dir).eval()
    assert list(loaded.peft_config) == ["default"]
    input_ids = torch.tensor([tiny_tokenizer(FACTS[0][0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, trainer.model.eval()(input_ids=input_ids).logits)


def test_a_frozen_adapter_handed_in_is_trained(tiny_model, tiny_tokenizer, tmp_path):
    """`PeftModel.from_pretrained` loads an adapter frozen unless `is_trainable=True`; unlearning trains it anyway."""
    lora_trained_a_few_steps(tiny_model, tiny_tokenizer).save_pretrained(tmp_path / "sft")
    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    frozen = PeftModel.from_pretrained(base, tmp_path / "sft")
    assert not any(p.requires_grad for p in frozen.parameters())
    before = adapter_weights(frozen, "default")
    trainer = unlearning_trainer(frozen, tiny_tokenizer, tmp_path)
    trainer.train()
    after = adapter_weights(trainer.model, "default")
    assert all(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)
