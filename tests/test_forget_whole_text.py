"""`forget_completion_only_loss=False`: the forget terms score the whole forget text, prompt included."""

import copy

import pytest
import torch
from conftest import fact_rows

from gnm_trainer import losses
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer


def ga_trainer(model, tokenizer, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), loss_terms=["ga", "gd"], max_steps=1, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to="none", seed=3, max_length=64, collapse_guard=False,
    )  # fmt: skip
    values.update(overrides)
    return GNMTrainer(
        model, GNMConfig(**values), train_dataset=fact_rows("forget", 0, 4), retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tokenizer,
    )  # fmt: skip


def whole_text_nll(model, tokenizer, rows) -> torch.Tensor:
    """Mean next-token NLL of each `prompt + " " + completion` + eos, every token after the first, by hand."""
    values = []
    for row in rows:
        ids = tokenizer(row["input"] + " " + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        logits = model(torch.tensor([ids])).logits[0, :-1]
        values.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))
    return torch.stack(values)


@pytest.mark.parametrize("padding_free", [False, True])
def test_forget_terms_score_every_token_of_the_forget_text(tiny_model, tiny_tokenizer, tmp_path, padding_free):
    trainer = ga_trainer(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, forget_completion_only_loss=False,
                         padding_free=padding_free)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    mask, attention = batch["forget_completion_mask"], batch["forget_attention_mask"]
    assert (mask[:, 0] == 0).all() and torch.equal(mask[:, 1:], attention[:, 1:])  # every real token but the first
    retain_mask = batch["retain_completion_mask"]
    assert (retain_mask.sum(1) < batch["retain_attention_mask"].sum(1)).all()  # retain: completions only
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        expected = whole_text_nll(trainer.model, tiny_tokenizer, fact_rows("forget", 0, 4))
    assert outputs["terms"]["ga"].item() == pytest.approx(-expected.mean().item(), rel=1e-4)


def test_the_default_scores_the_completion_only(tiny_model, tiny_tokenizer, tmp_path):
    trainer = ga_trainer(tiny_model, tiny_tokenizer, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["forget_completion_mask"].sum(1) < batch["forget_attention_mask"].sum(1) - 1).all()
