"""The run manifest: complete, secret-free, stable for the same run and sensitive to a changed setting."""

import json
import os

import pytest
from conftest import fact_rows
from peft import LoraConfig

from gnm_trainer.data import load_unlearning_data
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.manifest import MANIFEST_FILE, build_manifest, resolved_config, rows_fingerprint
from gnm_trainer.negatives.schema import negative_row

SECRET = "hf_PLANTEDsecret"


def negatives(forget):
    """Provenance-complete negatives for normalised forget rows (2 levels, the perturb backend)."""
    return [negative_row(row, level, f"wrong answer {level}", "perturb", seed=11) for row in forget for level in (1, 2)]


def make_trainer(model, tokenizer, tmp_path, peft=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        report_to="none", save_strategy="no", seed=3, max_length=64, hub_token=SECRET, loss_terms=["ga", "klr", "gnm"],
    )
    values.update(overrides)
    forget = fact_rows("forget", 0, 4)
    negative_rows = negatives(load_unlearning_data(forget, "forget").to_list()) if "gnm" in values["loss_terms"] else None
    trainer = GNMTrainer(
        model, GNMConfig(**values), train_dataset=forget, retain_dataset=fact_rows("retain", 4, 8),
        negative_dataset=negative_rows, processing_class=tokenizer, peft_config=peft,
    )
    return trainer


def test_manifest_records_the_run_without_secrets(tiny_model, tiny_tokenizer, tmp_path):
    """The manifest a real run writes with its final save, checked against what the test set up and saw: the
    settings given, the launch, the rows and negatives handed in, the adapter's modules and the guard's reference."""
    import hashlib
    import importlib
    from datetime import datetime, timezone

    started = datetime.now(timezone.utc).replace(microsecond=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=lora, ga_weight=0.7, learning_rate=3e-4,
                           logging_steps=1)  # fmt: skip
    trainer.train()
    trainer.save_model()
    text = open(os.path.join(trainer.args.output_dir, MANIFEST_FILE), encoding="utf-8").read()
    manifest = json.loads(text)

    assert SECRET not in text and "hub_token" not in text
    assert started <= datetime.fromisoformat(manifest["created_utc"]) <= datetime.now(timezone.utc)
    names = ("gnm_trainer", "torch", "transformers", "trl", "peft", "accelerate", "datasets")
    installed = {name: importlib.import_module(name).__version__ for name in names}  # what the modules say
    assert {name: manifest["versions"][name] for name in names} == installed
    # One process, 2 examples per micro-batch, 2 micro-batches per step: 4 examples per optimizer step.
    assert manifest["distributed"] == {
        "world_size": 1, "num_processes": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "effective_batch_size": 4, "distributed_type": "NO", "deepspeed_zero_stage": None, "mixed_precision": "no",
    }  # fmt: skip
    assert (manifest["seed"], manifest["data_seed"]) == (3, None)
    assert manifest["loss_terms"] == ["ga", "klr", "gnm"]
    assert manifest["loss_weights"] == {"ga": 0.7, "klr": 5.0, "gnm": 0.04}  # the one set, and the defaults
    config = manifest["config"]
    assert (config["learning_rate"], config["ga_weight"], config["max_steps"]) == (3e-4, 0.7, 1)
    assert config["add_eos_token"] is True  # a setting named *_token that is no secret stays
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert manifest["config_sha256"] == hashlib.sha256(canonical.encode("utf-8")).hexdigest()  # of what it shows

    # The data fingerprints: one JSON line [id, prompt, completion, task, kind, chat] per row, in order, from the
    # LUME rows the run was given (input is the prompt, output the completion; ids ending qa0 are qa rows).
    def fingerprint(rows):
        lines = [json.dumps([r["id"], r["input"], r["output"], r["task"], "qa", False], separators=(",", ":")) + "\n"
                 for r in rows]  # fmt: skip
        return {"rows": len(rows), "sha256": hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()}

    assert manifest["data"] == {"forget": fingerprint(fact_rows("forget", 0, 4)),
                                "retain": fingerprint(fact_rows("retain", 4, 8))}  # fmt: skip
    negatives_recorded = {key: manifest["negatives"][key] for key in ("rows", "levels", "backend", "seed", "fallbacks")}
    # 4 forget rows x 2 levels, made by the perturb backend with seed 11 (the `negatives` helper above)
    assert negatives_recorded == {"rows": 8, "levels": 2, "backend": ["perturb"], "seed": [11], "fallbacks": 0}
    assert manifest["reference_mode"] == "adapter_disabled"  # LoRA with klr: the base under the adapter
    linear = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"]  # "all-linear": every linear layer of the 2 blocks, no LM head
    assert manifest["peft"] == {"type": "LORA", "adapter": "default", "r": 4,
                                "target_modules": [f"model.layers.{i}.{name}" for i in (0, 1) for name in linear]}
    # The guard, on by default, warms up over 1 optimizer step: its reference is that step's retain NLL over both
    # micro-batches, as logged; one step, one observation.
    guard = manifest["collapse_guard"]
    (logged,) = [entry for entry in trainer.state.log_history if "nll_retain" in entry]
    assert guard["reference_retain_nll"] == pytest.approx(logged["nll_retain"])
    assert guard["threshold"] == pytest.approx(3 * logged["nll_retain"])  # 3x the reference beats +2 nats at ~6
    assert (guard["observations"], guard["collapsed"], guard["action"]) == (1, False, "rollback")


def test_secret_in_nested_settings_is_dropped_too():
    nested = {"token": SECRET, "revision": "main"}
    args = GNMConfig(output_dir="unused", report_to="none", hub_token=SECRET, model_init_kwargs=nested)
    config = resolved_config(args)
    assert SECRET not in json.dumps(config)
    assert config["model_init_kwargs"] == {"revision": "main"}


def test_same_run_same_hashes_and_changed_weight_changes_config_hash(tiny_model, tiny_tokenizer, tmp_path):
    first = build_manifest(make_trainer(tiny_model, tiny_tokenizer, tmp_path))
    second = build_manifest(make_trainer(tiny_model, tiny_tokenizer, tmp_path))
    assert first["config_sha256"] == second["config_sha256"]
    assert first["data"] == second["data"] and first["negatives"] == second["negatives"]

    reweighted = build_manifest(make_trainer(tiny_model, tiny_tokenizer, tmp_path, ga_weight=0.7))
    assert reweighted["config_sha256"] != first["config_sha256"]
    assert reweighted["data"] == first["data"]


def test_no_negatives_kept_is_said_and_other_terms_need_none(tiny_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path)
    trainer.negative_rows = None  # e.g. negatives consumed without being kept
    assert build_manifest(trainer)["negatives"]["available"] is False
    assert build_manifest(make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga", "klr"]))["negatives"] is None


def test_fingerprint_changes_with_any_row_field():
    rows = [{"id": "a", "prompt": "p", "completion": "c", "task": "Task1", "kind": "qa", "chat": False}]
    changed = [dict(rows[0], completion="c2")]
    assert rows_fingerprint(rows) == rows_fingerprint([dict(rows[0])])
    assert rows_fingerprint(rows)["sha256"] != rows_fingerprint(changed)["sha256"]
    assert rows_fingerprint(None) is None


def test_full_model_manifest_has_no_peft_and_a_copy_reference(tiny_model, tiny_tokenizer, tmp_path):
    manifest = build_manifest(make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga", "klr"]))
    assert manifest["peft"] is None and manifest["reference_mode"] == "copy" and manifest["collapse_guard"] is None
