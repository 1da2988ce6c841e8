"""SimNPO (`simnpo`): its value, its direction, the same value packed and padded, and no reference model."""

import copy
import math

import pytest
import torch
from conftest import fact_rows
from peft import LoraConfig

from gnm_trainer import losses
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def simnpo_trainer(model, tokenizer, tmp_path, peft=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), loss_terms=["simnpo", "gd"], max_steps=2, per_device_train_batch_size=2,
        logging_steps=1, save_strategy="no", report_to="none", seed=7, max_length=64,
    )  # fmt: skip
    values.update(overrides)
    return GNMTrainer(
        model, GNMConfig(**values), train_dataset=fact_rows("forget", 0, 4), retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tokenizer, peft_config=peft,
    )  # fmt: skip


def test_simnpo_equals_a_hand_computation_from_logits():
    """Two sequences of 2 and 1 completion tokens over a 3-token vocabulary: mean NLL per sequence by hand, then
    −(2/β)·log σ(β·(NLL_mean − δ))."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0]])
    targets, sequence_index = torch.tensor([2, 0, 1]), torch.tensor([0, 0, 1])
    beta, delta = 2.0, 0.3

    def nll(row, token):
        return math.log(sum(math.exp(x) for x in row)) - row[token]

    rows = logits.tolist()
    nll_means = [(nll(rows[0], 2) + nll(rows[1], 0)) / 2, nll(rows[2], 1)]
    expected = [-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (value - delta)))) for value in nll_means]
    forget_nll = losses.sequence_nll(logits, targets, sequence_index, 2)
    assert losses.simnpo_loss(forget_nll, beta, delta).tolist() == pytest.approx(expected, rel=1e-6)


def test_simnpo_gradient_raises_the_forget_nll():
    forget_nll = torch.tensor([0.1, 1.0, 5.0], requires_grad=True)
    losses.simnpo_loss(forget_nll, beta=2.5).sum().backward()
    assert (forget_nll.grad < 0).all()  # descending the loss ascends the NLL
    assert forget_nll.grad[0] < forget_nll.grad[2]  # and pushes hardest where the sequence is still well known


def test_training_on_simnpo_alone_raises_the_forget_nll(tiny_model, tiny_tokenizer, tmp_path):
    # A random model's forget NLL is ~6 nats: the margin δ = 8 keeps the loss away from its flat tail.
    trainer = simnpo_trainer(
        tiny_model, tiny_tokenizer, tmp_path, loss_terms=["simnpo"], simnpo_beta=1.0, simnpo_delta=8.0, optim="sgd",
        learning_rate=1.0, max_steps=3, per_device_train_batch_size=4, collapse_guard=False,
    )  # fmt: skip
    trainer.train()
    logged = [entry["nll_forget"] for entry in trainer.state.log_history if "nll_forget" in entry]
    assert len(logged) == 3 and logged[-1] > logged[0]


def test_simnpo_is_the_same_packed_and_padded(tiny_model, tiny_tokenizer, tmp_path):
    runs = []
    for padding_free in (True, False):
        trainer = simnpo_trainer(
            copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, padding_free=padding_free, optim="sgd",
            learning_rate=0.5, simnpo_beta=1.0, simnpo_delta=8.0,
        )  # fmt: skip
        assert trainer.padding_free is padding_free
        trainer.train()
        logged = [(e["loss_simnpo"], e["nll_forget"]) for e in trainer.state.log_history if "loss_simnpo" in e]
        runs.append((logged, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    (packed, packed_weights), (padded, padded_weights) = runs
    assert len(packed) == 2
    for packed_step, padded_step in zip(packed, padded):
        assert packed_step == pytest.approx(padded_step, abs=1e-5)
    assert (packed_weights - padded_weights).abs().max() <= 1e-5


@pytest.mark.parametrize("peft", [None, LoraConfig(**LORA)], ids=["full", "lora"])
def test_no_reference_model_is_built_for_simnpo_and_gd(tiny_model, tiny_tokenizer, tmp_path, peft):
    assert "simnpo" not in losses.TERMS_NEEDING_REFERENCE
    trainer = simnpo_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=peft)
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    assert "reference" not in getattr(trainer.model, "peft_config", {})
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"loss_simnpo", "loss_gd"} <= logged[0].keys()
