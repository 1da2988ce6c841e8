"""CollapseGuard: the threshold rule on its own, then on tiny models: an aggressive gradient-ascent run is stopped
(and rolled back to the last checkpoint saved before the collapse), a NaN loss stops it, a normal run is left alone."""

import math
import os

import pytest
import torch
from conftest import fact_rows
from safetensors.torch import load_file
from transformers import TrainerCallback

from gnm_trainer import losses
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.guard import CollapseGuard, checkpoints_before, collapse_threshold
from gnm_trainer.target import build_tiny_llama


def use_guard(trainer: GNMTrainer, guard: CollapseGuard) -> GNMTrainer:
    """Swap the trainer's own guard (on by default) for `guard`, whose settings the test chooses."""
    trainer.remove_callback(trainer.collapse_guard)
    trainer.add_callback(guard)
    trainer.collapse_guard = guard
    return trainer


def guarded_trainer(model, tokenizer, tmp_path, guard, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=30,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        max_length=64,
        # Aggressive on purpose: gradient ascent with a huge constant SGD step and a token retain term.
        loss_terms=["ga", "gd"],
        gd_weight=0.01,
        optim="sgd",
        learning_rate=5.0,
        lr_scheduler_type="constant",
    )
    values.update(overrides)
    trainer = GNMTrainer(
        model,
        GNMConfig(**values),
        train_dataset=fact_rows("forget", 0, 4),
        retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tokenizer,
    )
    return use_guard(trainer, guard)


# ---- the rule ----------------------------------------------------------------------------------------------------


def test_threshold_is_ratio_or_absolute_floor_whichever_is_higher():
    assert collapse_threshold(6.0, 3.0, 0.5) == pytest.approx(18.0)
    assert collapse_threshold(0.01, 3.0, 0.5) == pytest.approx(0.51)


def test_reference_is_mean_of_warmup_and_near_zero_nll_does_not_trip_on_noise():
    guard = CollapseGuard(warmup=2)
    assert not guard.observe(0, {"nll_retain": 0.01, "loss_gd": 0.01})
    assert not guard.observe(0, {"nll_retain": 0.03, "loss_gd": 0.03})
    assert guard.reference == pytest.approx(0.02)
    assert not guard.observe(1, {"nll_retain": 0.4})  # 20x the reference, but within the 0.5-nat floor
    assert guard.observe(2, {"nll_retain": 0.6})
    assert guard._pending["reason"] == "retain_nll" and guard._pending["step"] == 2


def test_one_hard_batch_is_not_a_collapse_but_a_sustained_rise_is():
    guard = CollapseGuard(min_retain_nll_increase=2.0, window=3)
    assert not guard.observe(0, {"nll_retain": 0.05})  # the reference; threshold 2.05
    assert not guard.observe(1, {"nll_retain": 2.9})  # one spike: the window is not full yet
    assert not guard.observe(2, {"nll_retain": 0.1})
    assert not guard.observe(3, {"nll_retain": 0.2})  # mean of the last 3 is 1.07
    assert not guard.observe(4, {"nll_retain": 3.0})
    assert guard.observe(5, {"nll_retain": 3.5})  # mean (0.2 + 3.0 + 3.5) / 3 = 2.23
    assert guard._pending["value"] == pytest.approx(6.7 / 3)
    assert not CollapseGuard(window=3).observe(0, {"loss_ga": 1.0}) and CollapseGuard(window=3).observe(
        0, {"loss_ga": float("nan")}
    )


def test_non_finite_value_is_a_collapse_even_without_retain_nll():
    guard = CollapseGuard()
    assert not guard.observe(0, {"loss_ga": -3.0})
    assert guard.observe(1, {"loss_ga": float("-inf")})
    assert guard._pending["metric"] == "loss_ga"


@pytest.mark.parametrize(
    "options",
    [dict(max_retain_nll_ratio=1.0), dict(min_retain_nll_increase=-1), dict(warmup=0), dict(action="undo"), dict(window=0)],
)
def test_bad_settings_are_input_errors(options):
    with pytest.raises(GNMInputError):
        CollapseGuard(**options)


def test_checkpoints_before_keeps_only_earlier_steps(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-5", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    assert [step for step, _ in checkpoints_before(str(tmp_path), 10)] == [2, 5]


# ---- on a tiny model ---------------------------------------------------------------------------------------------


def test_aggressive_ascent_stops_early_and_rolls_back_to_last_good_checkpoint(tiny_model, tiny_tokenizer, tmp_path, caplog):
    guard = CollapseGuard()
    trainer = guarded_trainer(
        tiny_model, tiny_tokenizer, tmp_path, guard, save_strategy="steps", save_steps=1, save_only_model=True
    )
    trainer.train()

    assert trainer.state.global_step < 30
    (event,) = guard.events
    collapse_step = event["step"]
    assert event["reason"] == "retain_nll" and event["value"] > event["threshold"] == pytest.approx(3 * guard.reference)
    logged = [entry for entry in trainer.state.log_history if "collapse_guard/reason" in entry]
    assert logged and logged[0]["collapse_guard/step"] == collapse_step
    # The retain NLL logged before the collapse stayed under the threshold: the earlier weights were good.
    # (an entry logged at step k holds the values computed on the weights after k - 1 updates)
    before = [e["nll_retain"] for e in trainer.state.log_history if "nll_retain" in e and e["step"] <= collapse_step]
    assert len(before) == collapse_step and max(before) <= event["threshold"]
    assert f"nll_retain = {event['value']}" in caplog.text and "training stopped" in caplog.text

    good = os.path.join(trainer.args.output_dir, f"checkpoint-{collapse_step - 1}")
    assert event["action"] == f"rolled back to {good} (step {collapse_step - 1})"
    saved = load_file(os.path.join(good, "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(current[name], tensor) for name, tensor in saved.items())
    # The step at which training stopped wrote no checkpoint of the collapsed weights.
    assert not os.path.exists(os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}"))
    # The final save writes the last good weights.
    trainer.save_model()
    final = load_file(os.path.join(trainer.args.output_dir, "model.safetensors"))
    assert all(torch.equal(final[name], tensor) for name, tensor in saved.items())
    assert guard.summary()["collapsed"] is True


def nan_after(monkeypatch, calls_before_nan: int) -> None:
    """Make `losses.sequence_nll` return NaN after `calls_before_nan` calls (the trainer calls it once per group)."""
    real_nll, calls = losses.sequence_nll, []

    def nll_turning_nan(*args, **kwargs):
        calls.append(1)
        value = real_nll(*args, **kwargs)
        return value * float("nan") if len(calls) > calls_before_nan else value

    monkeypatch.setattr(losses, "sequence_nll", nll_turning_nan)


class TrainedWeightsAtSave(TrainerCallback):
    """Keeps a copy of the trained weights (and AdaLoRA's rank pattern) as they were at every checkpoint."""

    def __init__(self):
        self.saved = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = (trained_weights(model), rank_pattern(model))


def trained_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def rank_pattern(model):
    return model.peft_config["default"].rank_pattern if hasattr(model, "peft_config") else None


@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_rollback_restores_the_trained_weights(method, tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    from peft import AdaLoraConfig, LoraConfig, PeftModel

    nan_after(monkeypatch, 6)  # forget + retain per step: NaN on the weights after 3 updates
    common = dict(lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    peft_config = {
        "full": None,
        "lora": LoraConfig(r=4, **common),
        # AdaLoRA prunes from the second step on: the checkpoint before the collapse has a rank pattern.
        "adalora": AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=5, deltaT=1, total_step=30, **common),
    }[method]
    guard, saves = CollapseGuard(), TrainedWeightsAtSave()
    trainer = GNMTrainer(
        tiny_model,
        GNMConfig(
            output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=2, report_to="none",
            save_strategy="steps", save_steps=1, save_only_model=True, max_length=64, loss_terms=["ga", "gd"],
            learning_rate=1e-2,
        ),
        train_dataset=fact_rows("forget", 0, 4),
        retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tiny_tokenizer,
        peft_config=peft_config,
        callbacks=[saves],
    )
    use_guard(trainer, guard)
    trainer.train()
    (event,) = guard.events
    good = os.path.join(trainer.args.output_dir, "checkpoint-2")
    assert event["step"] == 3 and event["action"] == f"rolled back to {good} (step 2)"
    weights_at_checkpoint, pattern_at_checkpoint = saves.saved[2]
    current = trained_weights(trainer.model)
    assert current.keys() == weights_at_checkpoint.keys()
    assert all(torch.equal(current[name], tensor) for name, tensor in weights_at_checkpoint.items())
    # The rollback moved the weights: those of step 3 (finite, saved before the guard acted) differ from them.
    assert any(not torch.equal(current[name], tensor) for name, tensor in saves.saved[3][0].items())
    if method != "adalora":  # the rolled-back weights are those of checkpoint-2's file, read back independently
        if method == "full":
            on_disk, in_model = load_file(os.path.join(good, "model.safetensors")), trainer.model.state_dict()
        else:
            from peft import get_peft_model_state_dict

            on_disk = load_file(os.path.join(good, "adapter_model.safetensors"))
            in_model = get_peft_model_state_dict(trainer.model)  # PEFT's own names and selection of what it saves
        assert on_disk.keys() <= in_model.keys() and len(on_disk) == len(current)  # every trained tensor, once
        assert all(torch.equal(in_model[name], tensor) for name, tensor in on_disk.items())
    else:
        assert rank_pattern(trainer.model) == pattern_at_checkpoint
        assert not all(all(kept) for kept in pattern_at_checkpoint.values())  # pruned before the checkpoint
        assert pattern_at_checkpoint != saves.saved[3][1]  # and differently after it: the rollback restored it
    if method != "full":  # the final adapter (PEFT's format, AdaLoRA trimmed) loads into the rolled-back model
        trainer.save_model()
        base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
        loaded = PeftModel.from_pretrained(base, trainer.args.output_dir).eval()
        input_ids = torch.tensor([tiny_tokenizer("Where was Borin Tal born?")["input_ids"]])
        with torch.no_grad():
            expected = trainer.model.eval()(input_ids=input_ids).logits
            torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected)


def test_rollback_without_checkpoint_falls_back_to_stop(tiny_model, tiny_tokenizer, tmp_path):
    guard = CollapseGuard()
    trainer = guarded_trainer(tiny_model, tiny_tokenizer, tmp_path, guard)
    trainer.train()
    (event,) = guard.events
    assert trainer.state.global_step == event["step"] + 1 < 30
    assert event["action"].startswith("stopped; no checkpoint saved before step")


def test_nan_loss_triggers_the_guard(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    nan_after(monkeypatch, 4)  # forget + retain per step: NaN on the weights after 2 updates
    guard = CollapseGuard(action="stop")
    trainer = guarded_trainer(tiny_model, tiny_tokenizer, tmp_path, guard, optim="adamw_torch", learning_rate=1e-4)
    trainer.train()
    (event,) = guard.events
    assert event["reason"] == "non-finite" and math.isnan(event["value"]) and event["step"] == 2
    assert event["action"] == "stopped" and trainer.state.global_step == 3


def test_normal_run_does_not_trigger(tiny_model, tiny_tokenizer, tmp_path):
    guard = CollapseGuard()
    trainer = guarded_trainer(
        tiny_model, tiny_tokenizer, tmp_path, guard, max_steps=6, loss_terms=["ga", "klr"], gd_weight=None,
        optim="adamw_torch", learning_rate=1e-4,
    )
    trainer.train()
    assert trainer.state.global_step == 6
    summary = guard.summary()
    assert summary["collapsed"] is False and summary["observations"] == 6 and summary["reference_retain_nll"] > 0


def test_the_guard_is_on_by_default_with_the_configured_settings(tiny_model, tiny_tokenizer, tmp_path):
    trainer = GNMTrainer(
        tiny_model,
        GNMConfig(
            output_dir=str(tmp_path), loss_terms=["ga", "gd"], collapse_retain_nll_ratio=4.0, collapse_guard_action="stop",
            collapse_window=2,
        ),
        train_dataset=fact_rows("forget", 0, 2),
        retain_dataset=fact_rows("retain", 4, 6),
        processing_class=tiny_tokenizer,
    )
    guard = trainer.collapse_guard
    assert guard in trainer.callback_handler.callbacks
    assert guard.summary()["max_retain_nll_ratio"] == 4.0 and guard.summary()["action"] == "stop"
    assert guard.summary()["window"] == 2
    off = GNMTrainer(
        tiny_model,
        GNMConfig(output_dir=str(tmp_path), loss_terms=["ga", "gd"], collapse_guard=False),
        train_dataset=fact_rows("forget", 0, 2),
        retain_dataset=fact_rows("retain", 4, 6),
        processing_class=tiny_tokenizer,
    )
    assert off.collapse_guard is None


def test_a_trimmed_adalora_folder_loads_into_the_untrimmed_adapter(tiny_model, tmp_path):
    """PEFT's trimmed format (the final save; checkpoints written before the untrimmed ones) goes back in place:
    the same outputs, the model's own parameters (an optimizer holds them), the pruned triplets zero."""
    from peft import AdaLoraConfig, get_peft_model

    from gnm_trainer.guard import load_checkpoint_weights

    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    model = get_peft_model(tiny_model, config)
    torch.manual_seed(0)
    pattern = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data.normal_()
        if "lora_E" in name:
            kept = torch.tensor([True, False, True, False])
            parameter.data[~kept] = 0.0  # what AdaLoRA's masking leaves
            pattern[name.removeprefix("base_model.model.")] = kept.tolist()
    model.peft_config["default"].rank_pattern = pattern
    model.save_pretrained(tmp_path / "trimmed")
    input_ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        if "lora_" in name:
            parameter.data.normal_()

    load_checkpoint_weights(model, str(tmp_path / "trimmed"))
    after = dict(model.named_parameters())
    assert after.keys() == parameters.keys() and all(after[name] is parameters[name] for name in after)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected)
    assert all(torch.all(p[[1, 3]] == 0) for n, p in parameters.items() if "lora_E" in n)
    assert model.peft_config["default"].rank_pattern == {k.replace(".default", ""): v for k, v in pattern.items()}
