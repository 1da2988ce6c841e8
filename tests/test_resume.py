"""Reproducibility: an interrupted run resumed from its last checkpoint ends with the same weights as an
uninterrupted one (gradual-negative schedule and per-epoch retain pairing included), in full fine-tuning, with LoRA
and with AdaLoRA (whose rank allocation prunes before and after the checkpoint), and the same seed and configuration
give the same result."""

import pytest
import torch
from conftest import fact_rows
from transformers import TrainerCallback

from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.target import build_tiny_llama

FORGET, RETAIN = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
NEGATIVES = [{"id": r["id"], "level": level, "completion": f"wrong answer {level}"} for r in FORGET for level in (1, 2, 3)]


class StopAt(TrainerCallback):
    """Simulates an interruption right after a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def peft_config_for(method):
    """None (full fine-tuning), LoRA, or AdaLoRA pruning from rank 4 to 2 at every step from the second to the last
    (its importance scores from before the checkpoint decide the pruning after it)."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    if method == "lora":
        return LoraConfig(r=4, **common)
    if method == "adalora":
        return AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=6, **common)
    return None


def trainer_for(tokenizer, output_dir, callbacks=(), method="full"):
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256, seed=3)
    args = GNMConfig(
        output_dir=str(output_dir),
        loss_terms=["ga", "gd", "klr", "rm", "gnm"],
        negative_schedule="gradual",
        max_steps=6,  # 3 epochs of 2 steps: the retain pairing changes every epoch, the level every 2 steps
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to="none",
        seed=11,
        max_length=64,
        disable_tqdm=True,
    )
    return GNMTrainer(
        model, args, train_dataset=FORGET, retain_dataset=RETAIN, negative_dataset=NEGATIVES,
        processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config_for(method),
    )


def weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def rank_pattern(trainer):
    return trainer.model.peft_config["default"].rank_pattern


@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_resumed_run_ends_with_the_same_weights(tiny_tokenizer, tmp_path, method):
    straight = trainer_for(tiny_tokenizer, tmp_path / "straight", method=method)
    straight.train()

    interrupted = trainer_for(tiny_tokenizer, tmp_path / "resumed", callbacks=[StopAt(3)], method=method)
    interrupted.train()
    assert interrupted.state.global_step == 3
    if method == "adalora":
        pruned_at_checkpoint = rank_pattern(interrupted)
        assert pruned_at_checkpoint and not all(all(kept) for kept in pruned_at_checkpoint.values())
    resumed = trainer_for(tiny_tokenizer, tmp_path / "resumed", method=method)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.state.global_step == 6

    expected, actual = weights(straight), weights(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    if method == "adalora":  # the allocation after the resume used the importance scores saved in the checkpoint
        assert rank_pattern(resumed) == rank_pattern(straight) != pruned_at_checkpoint
    # The losses after the resume are the ones the uninterrupted run logged (same retain pairs, same levels).
    assert logged(resumed, "loss_rm")[-3:] == logged(straight, "loss_rm")[-3:]
    assert logged(resumed, "negative_level")[-3:] == logged(straight, "negative_level")[-3:] == [2.0, 3.0, 3.0]


def test_same_seed_and_config_give_the_same_result(tiny_tokenizer, tmp_path):
    first, second = trainer_for(tiny_tokenizer, tmp_path / "a"), trainer_for(tiny_tokenizer, tmp_path / "b")
    first.train()
    second.train()
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert logged(first, "loss") == logged(second, "loss")
