"""`make_target`: a tiny model that memorises a LUME-format dataset, as the task's organisers fine-tuned OLMo.

It ties the parts together (data, tokenizer and model, training loop, memorisation check), caches the result by a
fingerprint of data and settings, and writes the target folder atomically.
"""

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict

from ..data.synthetic import write_lume_folder
from ..errors import GNMInputError
from ..io_utils import atomic_directory, atomic_write_json, check_output_folder
from .config import (
    DATA_SUBDIR, DEFAULT_ROUNDS, LUME_SPLITS, PRETRAINED_SUBDIR, PRETRAINING_SPLIT, TARGET_FORMAT_VERSION,
    TARGET_INFO_FILE, TargetConfig,
    default_target_dir,
)
from .data import load_target_data, select_documents
from .tiny_model import build_tiny_llama, train_tokenizer
from .training import pretrain, pretraining_blocks, train_until_memorised

logger = logging.getLogger(__name__)


def data_fingerprint(dataset: dict[str, list[dict]], config: TargetConfig) -> str:
    """A hash of the rows and the training configuration: equal fingerprints mean an identical target."""
    # Not the budget: rounds are deterministic, so a memorised target does not depend on how many more were allowed.
    # Nor the pretraining epochs when there is nothing to pretrain on, so that earlier targets stay cached.
    ignored = {"max_epochs"}
    if not dataset.get(PRETRAINING_SPLIT):
        ignored |= {"pretraining_epochs", "pretraining_replay"}
    settings = {name: value for name, value in asdict(config).items() if name not in ignored}
    payload = {"format": TARGET_FORMAT_VERSION, "data": dataset, "config": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class TargetNotMemorisedError(GNMInputError):
    """`make_target` spent its budget (`max_epochs`) without reaching the memorisation bar; nothing was written.

    `figures` holds one line per split: the greedy scores reached against the bar."""

    def __init__(self, history: dict, config: TargetConfig, output_dir: str):
        self.history, self.config = history, config
        self.figures = [
            f"{split}: sc ROUGE-L recall {scores['sc_rougeL_recall']:.3f} (bar {config.sc_rouge_threshold}), "
            f"QA exact match {scores['qa_exact_match']:.3f} (bar {config.qa_exact_match_threshold})"
            for split, scores in history["memorisation"].items()
        ]
        super().__init__(
            f"{output_dir}: not memorised after {history['epochs']} epochs (max_epochs {config.max_epochs}, rounds "
            f"of {config.epochs} at peak learning rate {config.learning_rate}); nothing written. Raise max_epochs, "
            f"the learning rate or the model size. {'; '.join(self.figures)}"
        )


def _describe_source(data) -> str:
    if data is None:
        return "synthetic"
    return os.path.abspath(os.fspath(data)) if isinstance(data, (str, os.PathLike)) else "rows"


def read_target_info(output_dir: str) -> dict | None:
    """The `target_info.json` of a finished target, or None."""
    path = os.path.join(output_dir, TARGET_INFO_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def make_target(
    data=None,
    output_dir: str | None = None,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 2048,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 512,
    pretraining_epochs: int = 3,
    pretraining_replay: float = 1.0,
    include_validation: bool = False,
    max_documents_per_split: int | None = None,
    tasks=None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    max_epochs: int | None = None,
    require_memorised: bool = True,
) -> str:
    """Train a tiny Llama that memorises a LUME-format dataset: the target model to unlearn. Returns its folder.

    The tokenizer is trained on the rows and the pretraining documents, never on the MIA non-members. When the data has a `pretraining` split (documents that
    are not benchmark rows), the model first reads it for `pretraining_epochs` epochs (causal LM on blocks of
    `max_length` tokens, one cosine cycle), to gain the general language ability a real pretrained model brings
    to its fine-tuning, and `pretraining_replay` blocks of it per memorised example are mixed into every epoch of
    the fine-tuning, so that it keeps that ability; the split is not written into `data/`. The model is fine-tuned with AdamW on the causal LM loss of
    `input + " " + output` + eos for every train row of both splits, and on the MIA member documents when there
    are any, until greedy reproduction reaches the thresholds (ROUGE-L recall >= 0.95 on sc rows, exact match
    >= 0.9 on QA rows, forget and retain train): in rounds of `epochs` epochs (each a cosine cycle from
    `learning_rate`), within a budget of `max_epochs` epochs (default: 4 rounds). A target that does not reach the
    bar raises `TargetNotMemorisedError` (with the figures) and writes nothing, unless `require_memorised=False`
    (then it is written with `"memorised": false` in its `target_info.json`).

    `output_dir` then holds the model and tokenizer (`from_pretrained`-loadable), `data/` (the rows it was trained
    on, a LUME folder), `pretrained/` when it pretrained (the model before it read any benchmark row, with the
    tokenizer: the base model of the `klb` term, as OLMo's public checkpoint is for the organisers' fine-tuned
    model) and `target_info.json` (fingerprint, configuration, epochs, memorisation, wall time). When
    `output_dir` already holds a target with the same fingerprint (data + configuration), nothing is trained
    unless `force`. The folder is built under a temporary name and renamed at the end.

    Args:
        data: None for the synthetic default (drawn with `seed`), a LUME-format folder or a dict of splits.
        output_dir: where to put the target (default: `default_target_dir()`).
        max_documents_per_split, tasks: keep a deterministic subset of the data (sc and QA rows of a document
            stay together).
        include_validation: also train on the validation rows.
        device: "cpu", "cuda", ... (default: cuda when available).
    """
    import torch

    started = time.perf_counter()
    config = TargetConfig(
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        vocab_size=vocab_size,
        epochs=epochs,
        max_epochs=max_epochs if max_epochs is not None else DEFAULT_ROUNDS * epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        pretraining_epochs=pretraining_epochs,
        pretraining_replay=pretraining_replay,
        include_validation=include_validation,
        max_documents_per_split=max_documents_per_split,
        tasks=tuple(sorted(tasks)) if tasks else None,
    )
    output_dir = os.path.abspath(output_dir or default_target_dir())
    check_output_folder(output_dir, "output_dir")  # a file there would be replaced
    dataset = select_documents(load_target_data(data, seed), max_documents_per_split, config.tasks, seed)
    fingerprint = data_fingerprint(dataset, config)
    info = read_target_info(output_dir)
    reusable = info is not None and (info.get("memorised") or not require_memorised)
    if reusable and info.get("fingerprint") == fingerprint and not force:
        logger.info("make-target: %s already holds this target (fingerprint %s)", output_dir, fingerprint[:12])
        return output_dir
    if info is None and os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        raise GNMInputError(
            f"{output_dir}: the folder exists and is not a target made by make_target (no {TARGET_INFO_FILE}); "
            "choose another output folder or pass force=True (--force) to replace it"
        )

    # Never the MIA non-members: a tokenizer fitted to them would make them familiar text (shorter in tokens than
    # unseen documents of their kind), and the membership attack compares them with the members. (The members are
    # the forget documents: their rows are read anyway.)
    texts = [row["input"] + " " + row["output"] for key in LUME_SPLITS for row in dataset.get(key, [])]
    texts += [row["document"] for row in dataset.get(PRETRAINING_SPLIT, [])]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(
        tokenizer, hidden_size, num_layers, num_heads, max_position_embeddings=max(1024, max_length + 256), seed=seed
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = pretraining_blocks(tokenizer, dataset.get(PRETRAINING_SPLIT, []), config.max_length)
    pretraining = pretrain(model, tokenizer, blocks, len(dataset.get(PRETRAINING_SPLIT, [])), config, progress)
    pretrained = copy.deepcopy(model).to("cpu") if pretraining is not None else None
    history = train_until_memorised(model, tokenizer, dataset, config, progress, replay=blocks)
    model.to("cpu")
    if not history["memorised"]:
        error = TargetNotMemorisedError(history, config, output_dir)
        if require_memorised:
            raise error
        logger.warning(
            "make-target: not memorised after %d epochs (%s); written anyway (require_memorised=False), marked "
            "memorised: false",
            history["epochs"],
            "; ".join(error.figures),
        )
    with atomic_directory(output_dir) as building:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        # The rows it memorised and the MIA documents; not the pretraining text (the base model's, not the benchmark's).
        benchmark = {key: rows for key, rows in dataset.items() if key != PRETRAINING_SPLIT}
        write_lume_folder(benchmark, os.path.join(building, DATA_SUBDIR))
        if pretrained is not None:
            pretrained.save_pretrained(os.path.join(building, PRETRAINED_SUBDIR))
            tokenizer.save_pretrained(os.path.join(building, PRETRAINED_SUBDIR))
        atomic_write_json(
            os.path.join(building, TARGET_INFO_FILE),
            {
                "fingerprint": fingerprint,
                "format_version": TARGET_FORMAT_VERSION,
                "source": _describe_source(data),
                "config": asdict(config),
                "rows": {key: len(rows) for key, rows in dataset.items()},
                "parameters": sum(p.numel() for p in model.parameters()),
                "pretraining": pretraining,
                "epochs": history["epochs"],
                "memorised": history["memorised"],
                "memorisation": history["memorisation"],
                "epoch_loss": history["epoch_loss"],
                "greedy_checks": history["greedy_checks"],
                "wall_time_s": round(time.perf_counter() - started, 2),
            },
        )
    logger.info("make-target: wrote %s in %.1f s", output_dir, time.perf_counter() - started)
    return output_dir
