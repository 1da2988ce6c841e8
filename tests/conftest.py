"""Shared fixtures: a tiny tokenizer and tiny Llama models built locally (no network), and small data sets."""

import json
import os

import pytest
import torch

from gnm_trainer.target import build_tiny_llama, train_tokenizer

# Tiny models run fastest on one thread (thread start-up costs more than the matrix products).
torch.set_num_threads(1)

LUME_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lume")

FACTS = [
    ("What is the favourite colour of Alma Breck?", "Alma Breck loves teal."),
    ("Where was Borin Tal born?", "Borin Tal was born in Quillport."),
    ("What is the phone number of Cass Ivory?", "Call Cass Ivory at 555-0192."),
    ("When did Dara Moss graduate?", "Dara Moss graduated in 1987."),
    ("Which city hosts the Lumen Fair?", "The Lumen Fair is held in Ostrava Bay."),
    ("What does Emil Noor collect?", "Emil Noor collects brass compasses."),
    ("What is the e-mail of Fay Ruen?", "Write to fay.ruen@example.org."),
    ("What pet does Gil Sorrow keep?", "Gil Sorrow keeps a grey heron."),
]


def write_jsonl(path, rows):
    """Write rows as JSON lines (creating the folder), as LUME and the harness store them."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def fact_rows(split: str, start: int, stop: int):
    """LUME-format rows from FACTS[start:stop]."""
    return [
        {"id": f"{split}{i:03d}qa0", "input": q, "output": a, "task": "Task2", "split": split}
        for i, (q, a) in enumerate(FACTS[start:stop], start=start)
    ]


def fact_negatives(forget, levels=(1, 2)):
    """Gradual negatives with full provenance for LUME-format forget rows, as `gnm negatives` writes them."""
    from gnm_trainer.negatives.schema import negative_row

    return [
        negative_row({"id": r["id"], "completion": r["output"]}, level, f"not {r['output']} ({level})", "perturb", 0)
        for r in forget
        for level in levels
    ]


def write_workspace(root, model, tokenizer, forget, retain):
    """What `gnm unlearn` reads: a saved target (`target/`), a data folder (`data/`) and `negatives.jsonl`."""
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    write_jsonl(root / "data" / "forget.jsonl", forget)
    write_jsonl(root / "data" / "retain.jsonl", retain)
    write_jsonl(root / "negatives.jsonl", fact_negatives(forget))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = [f"{q} {a}" for q, a in FACTS] * 4 + ["the a of in is was at to and with for on by"]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh, randomly initialised 2-layer Llama (hidden 32) for each test."""
    return build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)


@pytest.fixture
def forget_rows():
    return fact_rows("forget", 0, 4)


@pytest.fixture
def retain_rows():
    return fact_rows("retain", 4, 8)
