"""`klb`: KL descent on the forget set towards the base model (the model before it read the forget set)."""

import copy

import pytest
import torch
from conftest import fact_rows
from peft import LoraConfig

from gnm_trainer import losses
from gnm_trainer.errors import GNMInputError
from gnm_trainer.evaluation.generation import document_nll
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.target import build_tiny_llama

FORGET, RETAIN = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)


def klb_trainer(model, tokenizer, tmp_path, base_dir, peft=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), loss_terms=["klb"], base_model=str(base_dir), max_steps=2,
        per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none", seed=7, max_length=64,
        collapse_guard=False,
    )  # fmt: skip
    values.update(overrides)
    return GNMTrainer(
        model, GNMConfig(**values), train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer,
        peft_config=peft,
    )  # fmt: skip


def memorised(model, tokenizer, tmp_path):
    """`model` after plain gradient descent on the forget rows: a target that read what the base never did."""
    trainer = GNMTrainer(model, GNMConfig(output_dir=str(tmp_path / "fit"), loss_terms=["gd"], max_steps=30,
                                          learning_rate=1e-2, per_device_train_batch_size=4, save_strategy="no",
                                          report_to="none", max_length=64, collapse_guard=False),
                         train_dataset=FORGET, retain_dataset=FORGET, processing_class=tokenizer)
    trainer.train()
    return trainer.model


def forget_texts():
    return [f"{row['input']} {row['output']}" for row in FORGET]


def test_klb_is_zero_when_the_model_is_its_base(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "base")
    trainer = klb_trainer(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, tmp_path / "base", max_steps=1)
    trainer.train()
    logged = [entry["loss_klb"] for entry in trainer.state.log_history if "loss_klb" in entry]
    assert logged == [pytest.approx(0.0, abs=1e-6)]


@pytest.mark.parametrize("peft", [None, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")],
                         ids=["full", "lora"])
def test_klb_brings_the_forget_documents_back_to_the_base_models_nll(tiny_model, tiny_tokenizer, tmp_path, peft):
    tiny_model.save_pretrained(tmp_path / "base")
    base_nll = document_nll(tiny_model.eval(), tiny_tokenizer, forget_texts())
    target = memorised(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path)
    before = document_nll(target.eval(), tiny_tokenizer, forget_texts())
    assert sum(before) < sum(base_nll) - 1.0  # the target knows the forget rows, the base does not

    trainer = klb_trainer(target, tiny_tokenizer, tmp_path, tmp_path / "base", peft=peft, learning_rate=1e-2,
                          max_steps=40, forget_completion_only_loss=False)
    assert trainer.base_model is not None and trainer.ref_model is None
    trainer.train()
    after = document_nll(trainer.model.eval(), tiny_tokenizer, forget_texts())
    logged = [entry["loss_klb"] for entry in trainer.state.log_history if "loss_klb" in entry]
    assert logged[-1] < 0.5 * logged[0]
    # the forget documents' NLL moved most of the way from the target's back to the base's, and not past it
    assert abs(sum(after) - sum(base_nll)) < 0.5 * abs(sum(before) - sum(base_nll))


def test_klb_equals_the_forget_kl_to_the_base_computed_by_hand(tiny_model, tiny_tokenizer, tmp_path):
    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256,
                            seed=3)
    base.save_pretrained(tmp_path / "base")
    trainer = klb_trainer(tiny_model, tiny_tokenizer, tmp_path, tmp_path / "base", max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    mask, ids = batch["forget_completion_mask"], batch["forget_input_ids"]
    with torch.no_grad():
        policy, reference = (m(input_ids=ids, attention_mask=batch["forget_attention_mask"]).logits
                             for m in (trainer.model, base))
    expected = losses.completion_kl(policy, reference, mask).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_klb_needs_a_base_model_with_the_models_vocabulary(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(GNMInputError, match="base_model: the term 'klb' needs"):
        GNMConfig(output_dir=str(tmp_path / "out"), loss_terms=["klb"])
    other = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    other.resize_token_embeddings(len(tiny_tokenizer) + 8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(GNMInputError, match=r"base_model: .*other predicts over"):
        klb_trainer(tiny_model, tiny_tokenizer, tmp_path, tmp_path / "other")
    with pytest.raises(GNMInputError, match="base_model"):
        klb_trainer(tiny_model, tiny_tokenizer, tmp_path, tmp_path / "missing")
