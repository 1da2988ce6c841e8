"""The run manifest: complete, secret-free, stable for the same run and sensitive to a changed setting."""

import json
import os

from conftest import fact_rows
from peft import LoraConfig

from gnm_trainer.data import load_unlearning_data
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.guard import CollapseGuard
from gnm_trainer.manifest import MANIFEST_FILE, build_manifest, resolved_config, rows_fingerprint, write_manifest
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
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    guard = CollapseGuard()
    manifest = build_manifest(trainer, guard=guard)
    path = write_manifest(trainer.args.output_dir, manifest)

    assert path == os.path.join(trainer.args.output_dir, MANIFEST_FILE)
    text = open(path, encoding="utf-8").read()
    assert SECRET not in text and "hub_token" not in text
    assert json.loads(text) == json.loads(json.dumps(manifest))
    assert set(manifest["versions"]) >= {"gnm_trainer", "torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    assert manifest["distributed"]["world_size"] == 1
    assert manifest["distributed"]["effective_batch_size"] == 4
    assert manifest["distributed"]["distributed_type"] == "NO"
    assert manifest["seed"] == 3
    assert manifest["config"]["add_eos_token"] is True  # a setting named *_token that is no secret stays
    assert manifest["data"]["forget"]["rows"] == 4 and manifest["data"]["retain"]["rows"] == 4
    assert manifest["negatives"]["backend"] == ["perturb"] and manifest["negatives"]["seed"] == [11]
    assert manifest["negatives"]["levels"] == 2 and manifest["negatives"]["rows"] == 8
    assert manifest["reference_mode"] == "adapter_disabled"
    assert manifest["peft"]["type"] == "LORA" and manifest["peft"]["r"] == 4
    assert manifest["collapse_guard"]["action"] == "rollback"


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
