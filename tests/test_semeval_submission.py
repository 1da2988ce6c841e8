"""The SemEval-2025 Task 4 submission function on a tiny model and LUME-format task folders."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FACTS, fact_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnm_trainer.errors import GNMInputError
from gnm_trainer.semeval_submission import main, unlearn
from gnm_trainer.target import build_tiny_llama

FAST = dict(max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2, max_length=64, max_prompt_length=32,
            lora_r=4, lora_alpha=8, gradient_checkpointing=False)


def write_task_folder(folder, split, rows):
    """The harness layout: `<split>.jsonl` and `<split>.parquet` holding the same rows."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{split}.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama that memorised the 8 facts, saved with its tokenizer: the model the harness hands over."""
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    batch = tiny_tokenizer([f"{q} {a}{tiny_tokenizer.eos_token}" for q, a in FACTS], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = str(tmp_path_factory.mktemp("target"))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def task(tmp_path, target_dir):
    model_dir = target_dir
    forget_dir = write_task_folder(tmp_path / "forget", "forget", fact_rows("forget", 0, 4))
    retain_dir = write_task_folder(tmp_path / "retain", "retain", fact_rows("retain", 4, 8))
    return model_dir, str(tmp_path / "submission"), forget_dir, retain_dir


def forget_nll(model, tokenizer, rows) -> float:
    """Mean NLL of the forget completions given their prompts (prompt + " " + completion, completion tokens only)."""
    total = 0.0
    for row in rows:
        prompt_ids = tokenizer(row["input"])["input_ids"]
        ids = tokenizer(row["input"] + " " + row["output"], return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item()
    return total / len(rows)


def test_unlearn_writes_one_loadable_merged_checkpoint_that_forgot(task, tiny_tokenizer):
    model_dir, output_dir, forget_dir, retain_dir = task
    result = unlearn(model_dir, output_dir, forget_dir, retain_dir, **FAST)

    assert result["steps"] == 8 and result["stopped_by_time_budget"] is False
    names = os.listdir(output_dir)
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(name.startswith(".") or name.startswith("adapter") for name in names)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    question = "Where was Borin Tal born?"
    assert tokenizer(question)["input_ids"] == tiny_tokenizer(question)["input_ids"]
    target = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = fact_rows("forget", 0, 4)
    assert forget_nll(target, tokenizer, rows) < 0.5  # memorised
    before, after = forget_nll(target, tokenizer, rows), forget_nll(model, tokenizer, rows)
    assert after > 10 * before, (before, after)


def test_time_budget_stops_training_and_still_writes_the_checkpoint(task):
    model_dir, output_dir, forget_dir, retain_dir = task
    result = unlearn(model_dir, output_dir, forget_dir, retain_dir, **{**FAST, "max_steps": 50}, time_budget_minutes=0)
    assert result["steps"] == 1 and result["stopped_by_time_budget"] is True
    AutoModelForCausalLM.from_pretrained(output_dir)


def test_module_entry_point_parses_settings(task):
    model_dir, output_dir, forget_dir, retain_dir = task
    result = main([model_dir, output_dir, forget_dir, retain_dir, "--max_steps", "1", "--max_length", "64",
                   "--max_prompt_length", "32", "--lora_r", "2", "--gradient_checkpointing", "true"])
    assert result["steps"] == 1
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))


def test_bad_inputs_are_reported(task, tmp_path):
    model_dir, output_dir, forget_dir, retain_dir = task
    with pytest.raises(GNMInputError, match="unknown setting.*'max_stepz'"):
        unlearn(model_dir, output_dir, forget_dir, retain_dir, max_stepz=3)
    with pytest.raises(GNMInputError, match="no forget file"):
        unlearn(model_dir, output_dir, str(tmp_path), retain_dir, **FAST)
    with pytest.raises(GNMInputError, match="cannot load the model"):
        unlearn(str(tmp_path / "missing"), output_dir, forget_dir, retain_dir, **FAST)
