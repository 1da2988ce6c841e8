"""The run manifest (`gnm_manifest.json`): what is needed to tell whether two unlearning runs are the same run.

It records the software (library versions, Python, platform), the launch (world size, effective batch size,
distributed type, DeepSpeed ZeRO stage), the seed, a SHA-256 of the resolved configuration, fingerprints of the forget
and retain rows, where the gradual negatives came from, the reference mode, the PEFT type, the collapse guard's
summary and the step kept as best on validation. Secrets never enter it: configuration fields whose name contains
"token" are dropped unless their value is a plain number or boolean (`add_eos_token` stays, `hub_token` goes), at any
depth.
"""

import hashlib
import json
import os
import platform
import sys
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata, util
from typing import Any

from .io_utils import atomic_write_json
from .modeling import is_peft_model

MANIFEST_FILE = "gnm_manifest.json"
MANIFEST_VERSION = 1
PACKAGES = ("gnm_trainer", "torch", "transformers", "trl", "peft", "accelerate", "datasets")
OPTIONAL_PACKAGES = ("deepspeed",)
ROW_COLUMNS = ("id", "prompt", "completion", "task", "kind", "chat")
NEGATIVE_COLUMNS = ("id", "level", "completion")
PROVENANCE_FIELDS = ("backend", "generator", "prompt_template", "seed")


def sha256_of(obj: Any) -> str:
    """SHA-256 of `obj` as canonical JSON (sorted keys, no spaces): equal values hash equal on any machine."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_secret_field(name: str, value: Any) -> bool:
    return "token" in name.lower() and not (value is None or isinstance(value, (bool, int, float)))


def without_secrets(values: Any) -> Any:
    """`values` with every mapping key that names a token (and holds something other than a number/bool) removed."""
    if isinstance(values, dict):
        return {key: without_secrets(value) for key, value in values.items() if not _is_secret_field(str(key), value)}
    if isinstance(values, (list, tuple)):
        return [without_secrets(value) for value in values]
    return values


def resolved_config(args) -> dict[str, Any]:
    """The configuration as JSON-ready values, secrets removed. `TrainingArguments.to_dict()` masks every `*_token`
    field with a placeholder (even `add_eos_token`), so such fields are read back from `args` before filtering."""
    values = args.to_dict()
    for name in values:
        if "token" in name.lower():
            values[name] = getattr(args, name, values[name])
    return without_secrets(values)


def package_versions() -> dict[str, str | None]:
    """Installed version of each package the run depends on (`None` when absent); DeepSpeed only if importable."""
    versions = {}
    for name in PACKAGES + OPTIONAL_PACKAGES:
        if name in OPTIONAL_PACKAGES and util.find_spec(name) is None:
            continue
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def rows_fingerprint(rows) -> dict[str, Any] | None:
    """Row count and SHA-256 of normalised rows (a `datasets.Dataset` or a list of dicts), over `ROW_COLUMNS` in
    order; `None` when there are no rows."""
    if rows is None:
        return None
    records = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    digest = hashlib.sha256()
    for record in records:
        line = json.dumps([record.get(column) for column in ROW_COLUMNS], ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    return {"rows": len(records), "sha256": digest.hexdigest()}


def negatives_provenance(negative_rows) -> dict[str, Any]:
    """How the gradual negatives were made: the distinct backends, generators, prompt templates and seeds found in
    the rows, the number of LLM outputs that fell back to the model-free backend, K and a fingerprint."""
    rows = list(negative_rows)
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda row: (str(row.get("id")), int(row.get("level", 0)))):
        line = json.dumps([row.get(column) for column in NEGATIVE_COLUMNS], ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    provenance = {
        field: sorted({row[field] for row in rows if field in row}, key=str) for field in PROVENANCE_FIELDS
    }
    return {
        "available": True,
        "rows": len(rows),
        "levels": max((int(row["level"]) for row in rows), default=0),
        "sha256": digest.hexdigest(),
        **provenance,
        "fallbacks": sum(bool(row.get("fallback")) for row in rows),
    }


def distributed_setup(trainer) -> dict[str, Any]:
    """World size, effective batch size, distributed type and DeepSpeed ZeRO stage of the trainer's launch."""
    args, accelerator = trainer.args, trainer.accelerator
    world_size = max(1, args.world_size)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    distributed_type = accelerator.distributed_type
    return {
        "world_size": world_size,
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "distributed_type": getattr(distributed_type, "value", str(distributed_type)),
        "deepspeed_zero_stage": getattr(plugin, "zero_stage", None) if plugin is not None else None,
        "mixed_precision": str(accelerator.mixed_precision),
    }


def peft_summary(model) -> dict[str, Any] | None:
    """PEFT type, adapter name and rank of the active adapter; `None` for a model trained in full."""

    if not is_peft_model(model):
        return None
    config = model.peft_config[model.active_adapter]
    peft_type = getattr(config, "peft_type", None)
    modules = getattr(config, "target_modules", None)
    return {
        "type": getattr(peft_type, "value", str(peft_type)),
        "adapter": model.active_adapter,
        "r": getattr(config, "r", None),
        "target_modules": sorted(modules) if isinstance(modules, (set, list, tuple)) else modules,
    }


def build_manifest(trainer, guard=None, negative_rows=None) -> dict[str, Any]:
    """The manifest of a `GNMTrainer` run. `guard` is its `CollapseGuard` (or `None`); `negative_rows` are the
    gradual negatives (defaults to `trainer.negative_rows` when the trainer keeps them)."""
    args = trainer.args
    config = resolved_config(args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if negative_rows is None:
        negative_rows = getattr(trainer, "negative_rows", None)
    if negative_rows is not None:
        negatives = negatives_provenance(negative_rows)
    elif "gnm" in args.loss_terms:
        negatives = {
            "available": False,
            "note": "the trainer keeps no negative rows: pass negative_rows= or set trainer.negative_rows",
        }
    else:
        negatives = None
    return {
        "manifest_version": MANIFEST_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {"system": platform.platform(), "machine": platform.machine(), "processor": platform.processor()},
        "distributed": distributed_setup(trainer),
        "seed": args.seed,
        "data_seed": args.data_seed,
        "config_sha256": sha256_of(config),
        "config": config,
        "loss_terms": list(args.loss_terms),
        "loss_weights": args.loss_weights,
        "model": {"name_or_path": getattr(model.config, "_name_or_path", None) if hasattr(model, "config") else None},
        "data": {"forget": rows_fingerprint(trainer.forget_rows), "retain": rows_fingerprint(trainer.retain_rows)},
        "negatives": negatives,
        "reference_mode": trainer.reference_mode,
        "peft": peft_summary(model),
        "collapse_guard": guard.summary() if guard is not None else None,
        # Set by `gnm unlearn --eval_on_validation_steps`: the step kept as the final model and its objective.
        "best_on_validation": getattr(trainer, "best_on_validation", None),
        # Set by `gnm unlearn --keep_best_membership_steps`: the step whose forget documents looked most unseen.
        "best_on_membership": getattr(trainer, "best_on_membership", None),
    }


def write_manifest(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write `manifest` to `<output_dir>/gnm_manifest.json` atomically; returns the path. Call it on the main
    process only (`trainer.args.should_save`)."""
    path = os.path.join(os.fspath(output_dir), MANIFEST_FILE)
    atomic_write_json(path, manifest)
    return path
