"""The embedded default target: a tiny tokenizer trained locally and a tiny Llama built from a config.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with `tokenizers` on the texts it must
cover, and the model is a `LlamaForCausalLM` built from a `LlamaConfig` sized for a few CPU seconds per epoch.
"""

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .data.loading import classify_kind
from .data.synthetic import write_lume_folder
from .errors import GNMInputError, where
from .io_utils import atomic_directory, atomic_write_json, check_output_folder

logger = logging.getLogger(__name__)

# A minimal chat template so that TRL's conversational format works with the tiny tokenizer too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on `texts`; returns a `PreTrainedTokenizerFast` with pad, bos and eos.

    Byte-level BPE covers any unicode text (no unknown token), and a prompt and a completion that starts with a
    space tokenise separately exactly as they do joined.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
):
    """A randomly initialised `LlamaForCausalLM` whose vocabulary and special ids match `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------------------------
# make_target: a tiny model that memorises a LUME-format dataset, as the task's organisers fine-tuned OLMo
# ---------------------------------------------------------------------------------------------------------------

TARGET_INFO_FILE = "target_info.json"
DATA_SUBDIR = "data"
# Bump when the training recipe changes, so that older cached targets are rebuilt.
TARGET_FORMAT_VERSION = 1
LUME_SPLITS = ("forget_train", "retain_train", "forget_validation", "retain_validation")
MIA_SPLITS = ("mia_member", "mia_nonmember")


def default_target_dir() -> str:
    """Where `make_target` caches the default target: $GNM_TRAINER_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    explicit = os.environ.get("GNM_TRAINER_CACHE")
    if explicit:
        return os.path.join(explicit, "target")
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gnm_trainer", "target")


@dataclass(frozen=True)
class TargetConfig:
    """Everything that decides what `make_target` trains (the cache fingerprint covers all of it)."""

    seed: int = 0
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 2048
    epochs: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    include_validation: bool = False
    max_documents_per_split: int | None = None
    tasks: tuple[str, ...] | None = None
    sc_rouge_threshold: float = 0.95
    qa_exact_match_threshold: float = 0.9

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "vocab_size", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise GNMInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise GNMInputError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):  # a NaN fails `> 0`
            raise GNMInputError(f"learning_rate must be a finite positive number, got {self.learning_rate}")
        if self.max_documents_per_split is not None and self.max_documents_per_split < 1:
            raise GNMInputError(f"max_documents_per_split must be >= 1, got {self.max_documents_per_split}")
        unknown = sorted(set(self.tasks or ()) - {"Task1", "Task2", "Task3"})
        if unknown:
            raise GNMInputError(f"tasks: unknown {unknown}; expected some of Task1, Task2, Task3")


# --- data ------------------------------------------------------------------------------------------------------


def document_key(row_id: str) -> str:
    """The id of the document a LUME row belongs to: the id without its `sc1` / `qaN` suffix."""
    return row_id[:-3] if classify_kind(row_id) in ("sc", "qa") else row_id


def _lume_rows(source, split: str, partition: str, name: str) -> list[dict[str, str]]:
    """One split of any accepted source, checked by the loader, as LUME rows (id, input, output, task, split)."""
    from .data import load_unlearning_data

    dataset = load_unlearning_data(source, split, partition)
    rows = []
    for index, row in enumerate(dataset):
        if row["chat"]:
            raise GNMInputError(f"{where(name, index, 'input')}: conversational rows cannot train a target model")
        rows.append(
            {"id": row["id"], "input": row["prompt"], "output": row["completion"], "task": row["task"], "split": split}
        )
    return rows


def _mia_rows(rows: list[dict], name: str) -> list[dict[str, str]]:
    """MIA rows reduced to (id, document), with errors naming the row."""
    checked = []
    for index, row in enumerate(rows):
        document = row.get("document") if isinstance(row, dict) else None
        if not isinstance(document, str) or not document.strip():
            raise GNMInputError(f"{where(name, index, 'document')}: expected a non-empty string")
        checked.append({"id": str(row.get("id", index)), "document": document})
    return checked


def _has_validation_files(folder: str, split: str) -> bool:
    """Whether `folder` holds a validation file for `split` (the harness's `forget.jsonl` names no partition)."""
    from .data.loading import find_split_files

    try:
        paths = find_split_files(folder, split, "validation")
    except GNMInputError:
        return False
    return all("validation" in os.path.basename(path) for path in paths)


def load_target_data(data=None, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The dataset a target is trained on, shaped like `make_synthetic_lume`'s output.

    `data` is None (the synthetic default for `seed`), a LUME-format folder (validation files and `mia/` are
    optional there), a Hub dataset id with LUME's splits (no MIA documents then) or a dict shaped like
    `make_synthetic_lume`'s output.
    """
    from .data.loading import looks_like_hub_id, read_records
    from .data.synthetic import make_synthetic_lume

    if data is None:
        data = make_synthetic_lume(seed=seed)
    if isinstance(data, dict):
        loaded = {}
        for key in LUME_SPLITS:
            if data.get(key):
                split, partition = key.split("_")
                loaded[key] = _lume_rows(list(data[key]), split, partition, key)
        for key in MIA_SPLITS:
            loaded[key] = _mia_rows(list(data.get(key) or []), key)
    elif isinstance(data, str) and not os.path.exists(data) and looks_like_hub_id(data):
        loaded = {key: _lume_rows(data, *key.split("_"), f"{data}[{key}]") for key in LUME_SPLITS}
        loaded.update({key: [] for key in MIA_SPLITS})
    elif isinstance(data, (str, os.PathLike)):
        folder = os.fspath(data)
        if not os.path.isdir(folder):
            raise GNMInputError(f"{folder}: data folder not found (expected a LUME-format folder)")
        loaded = {}
        for key in LUME_SPLITS:
            split, partition = key.split("_")
            if partition == "train" or _has_validation_files(folder, split):
                loaded[key] = _lume_rows(folder, split, partition, os.path.join(folder, key))
        for key, file_name in zip(MIA_SPLITS, ("member.jsonl", "nonmember.jsonl")):
            path = os.path.join(folder, "mia", file_name)
            loaded[key] = _mia_rows(read_records(path), path) if os.path.isfile(path) else []
    else:
        raise GNMInputError(f"data: expected None, a LUME-format folder or a dict of splits, got {type(data).__name__}")
    for key in ("forget_train", "retain_train"):
        if not loaded.get(key):
            raise GNMInputError(f"data: the {key} split is missing or empty")
    return loaded


def draw_documents(rows: list[dict], limit: int | None, rng: random.Random) -> set[str]:
    """At most `limit` document keys of `rows`, taken round-robin across tasks in a seeded order, so that every
    task keeps documents whenever `limit` allows."""
    by_task: dict[str, set[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], set()).add(document_key(row["id"]))
    queues = []
    for task in sorted(by_task):
        keys = sorted(by_task[task])
        rng.shuffle(keys)
        queues.append(keys)
    chosen: list[str] = []
    while queues and (limit is None or len(chosen) < limit):
        for queue in list(queues):
            if limit is not None and len(chosen) >= limit:
                break
            chosen.append(queue.pop())
            if not queue:
                queues.remove(queue)
    return set(chosen)


def select_documents(
    dataset: dict[str, list[dict]], max_documents_per_split: int | None, tasks, seed: int
) -> dict[str, list[dict]]:
    """Keep only `tasks` and at most `max_documents_per_split` documents per split, drawn with `seed` across tasks.

    An sc row stays with the QA rows of its document, and rows keep their order. MIA members stay only when their
    document is kept in forget train, and non-members are thinned to as many as the members left.
    """
    if max_documents_per_split is None and not tasks:
        return dataset
    rng = random.Random(seed)
    selected: dict[str, list[dict]] = {}
    kept_forget_documents: set[str] = set()
    for key in LUME_SPLITS:
        if key not in dataset:
            continue
        rows = [row for row in dataset[key] if not tasks or row["task"] in tasks]
        chosen = draw_documents(rows, max_documents_per_split, rng)
        selected[key] = [row for row in rows if document_key(row["id"]) in chosen]
        if key == "forget_train":
            kept_forget_documents = chosen
    members = [row for row in dataset.get("mia_member", []) if row["id"] in kept_forget_documents]
    nonmembers = list(dataset.get("mia_nonmember", []))
    if len(nonmembers) > len(members):
        chosen_indices = sorted(rng.sample(range(len(nonmembers)), len(members)))
        nonmembers = [nonmembers[i] for i in chosen_indices]
    selected["mia_member"], selected["mia_nonmember"] = members, nonmembers
    for key in ("forget_train", "retain_train"):
        if not selected.get(key):
            raise GNMInputError(f"data: no {key} rows left after keeping tasks {list(tasks or [])}")
    return selected


def data_fingerprint(dataset: dict[str, list[dict]], config: TargetConfig) -> str:
    """A hash of the rows and the training configuration: equal fingerprints mean an identical target."""
    payload = {"format": TARGET_FORMAT_VERSION, "data": dataset, "config": asdict(config)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# --- training examples -----------------------------------------------------------------------------------------


@dataclass
class TrainingExample:
    """One training sequence: bos + text + eos. `completion_start` is where the part to reproduce begins."""

    input_ids: list[int]
    completion_start: int
    kind: str  # "sc" or "qa" (checked for memorisation), "document" (an MIA member) or "other"
    split: str


def encode_row(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + completion` + eos (bos from the tokenizer), and where the completion starts."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + " " + completion)["input_ids"] + [tokenizer.eos_token_id]
    return full_ids[:max_length], min(len(prompt_ids), max_length)


def training_examples(dataset: dict[str, list[dict]], tokenizer, config: TargetConfig) -> list[TrainingExample]:
    """Every train row of both splits (validation rows too when asked) and every MIA member document."""
    examples = []
    keys = LUME_SPLITS if config.include_validation else ("forget_train", "retain_train")
    for key in keys:
        for row in dataset.get(key, []):
            ids, start = encode_row(tokenizer, row["input"], row["output"], config.max_length)
            kind = classify_kind(row["id"])
            examples.append(TrainingExample(ids, start, kind if kind in ("sc", "qa") else "other", key))
    for row in dataset.get("mia_member", []):
        ids = (tokenizer(row["document"])["input_ids"] + [tokenizer.eos_token_id])[: config.max_length]
        examples.append(TrainingExample(ids, 1, "document", "mia_member"))
    return examples


def length_grouped_batches(lengths: list[int], batch_size: int, generator) -> list[list[int]]:
    """Shuffled batches of indices whose sequences have similar lengths (less padding), in shuffled order."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    batches = []
    for begin in range(0, len(order), window):
        chunk = sorted(order[begin : begin + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def pad_batch(examples: list[TrainingExample], pad_token_id: int):
    """Right-padded input ids, attention mask and labels (-100 on padding) for a causal LM loss."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def reproduced_fraction(logits, input_ids, examples: list[TrainingExample]) -> list[float]:
    """For each example, the fraction of its completion (eos included) that greedy decoding reproduces, read from
    teacher-forced logits: greedy output equals the reference up to the first position whose argmax is wrong."""
    predictions = logits[:, :-1].argmax(-1)
    fractions = []
    for row, example in enumerate(examples):
        targets = input_ids[row, example.completion_start : len(example.input_ids)]
        guessed = predictions[row, example.completion_start - 1 : len(example.input_ids) - 1]
        wrong = (guessed != targets).nonzero()
        correct_prefix = int(wrong[0, 0]) if len(wrong) else len(targets)
        fractions.append(correct_prefix / max(1, len(targets)))
    return fractions


def proxy_memorisation(fractions: list[float], examples: list[TrainingExample]) -> dict[str, float]:
    """Cheap memorisation figures from `reproduced_fraction`: sc mean reproduced fraction, share of QA rows fully
    reproduced. They bound the greedy figures from below (up to word-level tokenisation)."""
    sc = [f for f, example in zip(fractions, examples) if example.kind == "sc"]
    qa = [f == 1.0 for f, example in zip(fractions, examples) if example.kind == "qa"]
    return {"sc": sum(sc) / len(sc) if sc else 1.0, "qa": sum(qa) / len(qa) if qa else 1.0}


# --- greedy memorisation check ---------------------------------------------------------------------------------


def memorisation_scores(model, tokenizer, rows: list[dict], extra_tokens: int = 8) -> dict[str, float | int]:
    """The official scores of greedy reproduction on LUME rows (`evaluation.semeval.score_example`): mean ROUGE-L
    recall of sc rows and exact match of QA rows, each row generating up to its reference's length + `extra_tokens`."""
    from .evaluation import generation
    from .evaluation.semeval import score_example

    budgets = [
        len(tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"]) + extra_tokens for row in rows
    ]
    generations = generation.generate_greedy(model, tokenizer, [row["input"] for row in rows], budgets, batch_size=32)
    sc, qa = [], []
    for row, text in zip(rows, generations):
        kind, score = score_example(row["id"], row["output"], text)
        {"sc": sc, "qa": qa}.get(kind, []).append(score)
    return {
        "sc_rougeL_recall": sum(sc) / len(sc) if sc else 1.0,
        "qa_exact_match": sum(qa) / len(qa) if qa else 1.0,
        "sc_rows": len(sc),
        "qa_rows": len(qa),
    }


def memorisation_report(model, tokenizer, dataset: dict[str, list[dict]]) -> dict[str, dict]:
    """Greedy memorisation scores of the forget and retain train rows, by split."""
    model.eval()
    return {split: memorisation_scores(model, tokenizer, dataset[split]) for split in ("forget_train", "retain_train")}


def is_memorised(report: dict[str, dict], config: TargetConfig) -> bool:
    return all(
        scores["sc_rougeL_recall"] >= config.sc_rouge_threshold
        and scores["qa_exact_match"] >= config.qa_exact_match_threshold
        for scores in report.values()
    )


# --- the training loop -----------------------------------------------------------------------------------------


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over the first steps, then cosine decay to zero at `total_steps`.

    Exact memorisation needs the small late steps; a constant rate leaves the loss bouncing around 0.3.
    """
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_until_memorised(model, tokenizer, dataset, config: TargetConfig, progress: bool = True) -> dict:
    """Fine-tune `model` with AdamW on the full-sequence causal LM loss until greedy reproduction of the train rows
    of both splits passes the thresholds, or `config.epochs` epochs; returns the training history."""
    import torch
    from tqdm.auto import tqdm

    examples = training_examples(dataset, tokenizer, config)
    lengths = [len(example.input_ids) for example in examples]
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    total_steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps))
    device = model.device
    history: dict = {"epoch_loss": [], "greedy_checks": []}
    report: dict = {}
    bar = tqdm(range(1, config.epochs + 1), desc="make-target", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        fractions = [0.0] * len(examples)
        total_loss, total_tokens = 0.0, 0
        for batch_indices in length_grouped_batches(lengths, config.batch_size, generator):
            batch = [examples[i] for i in batch_indices]
            input_ids, attention_mask, labels = (t.to(device) for t in pad_batch(batch, tokenizer.pad_token_id))
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            for i, fraction in zip(batch_indices, reproduced_fraction(outputs.logits.detach(), input_ids, batch)):
                fractions[i] = fraction
            tokens = int(attention_mask.sum()) - len(batch)
            total_loss += float(outputs.loss.detach()) * tokens
            total_tokens += tokens
        loss = total_loss / max(1, total_tokens)
        proxy = proxy_memorisation(fractions, examples)
        history["epoch_loss"].append(round(loss, 5))
        bar.set_postfix(loss=f"{loss:.4f}", sc=f"{proxy['sc']:.2f}", qa=f"{proxy['qa']:.2f}")
        logger.info(
            "make-target epoch %d: loss %.4f, sc reproduced %.3f, qa reproduced %.3f",
            epoch,
            loss,
            proxy["sc"],
            proxy["qa"],
        )
        proxy_passes = proxy["sc"] >= config.sc_rouge_threshold and proxy["qa"] >= config.qa_exact_match_threshold
        if proxy_passes or epoch == config.epochs:
            report = memorisation_report(model, tokenizer, dataset)
            history["greedy_checks"].append({"epoch": epoch, **_flat(report)})
            if is_memorised(report, config):
                break
    bar.close()
    history["epochs"] = epoch
    history["memorised"] = is_memorised(report, config)
    history["memorisation"] = report
    return history


def _flat(report: dict[str, dict]) -> dict[str, float]:
    return {f"{split}_{name}": round(value, 4) for split, scores in report.items() for name, value in scores.items()}


# --- make_target -----------------------------------------------------------------------------------------------


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
    include_validation: bool = False,
    max_documents_per_split: int | None = None,
    tasks=None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> str:
    """Train a tiny Llama that memorises a LUME-format dataset: the target model to unlearn. Returns its folder.

    The tokenizer is trained on every text of the data; the model is fine-tuned with AdamW on the causal LM loss of
    `input + " " + output` + eos for every train row of both splits, and on the MIA member documents when there
    are any, until greedy reproduction reaches the thresholds (ROUGE-L recall >= 0.95 on sc rows, exact match
    >= 0.9 on QA rows, forget and retain train) or `epochs` epochs pass.

    `output_dir` then holds the model and tokenizer (`from_pretrained`-loadable), `data/` (the rows it was trained
    on, a LUME folder) and `target_info.json` (fingerprint, configuration, epochs, memorisation, wall time). When
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
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        include_validation=include_validation,
        max_documents_per_split=max_documents_per_split,
        tasks=tuple(sorted(tasks)) if tasks else None,
    )
    output_dir = os.path.abspath(output_dir or default_target_dir())
    check_output_folder(output_dir, "output_dir")  # a file there would be replaced
    dataset = select_documents(load_target_data(data, seed), max_documents_per_split, config.tasks, seed)
    fingerprint = data_fingerprint(dataset, config)
    info = read_target_info(output_dir)
    if info is not None and info.get("fingerprint") == fingerprint and not force:
        logger.info("make-target: %s already holds this target (fingerprint %s)", output_dir, fingerprint[:12])
        return output_dir
    if info is None and os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        raise GNMInputError(
            f"{output_dir}: the folder exists and is not a target made by make_target (no {TARGET_INFO_FILE}); "
            "choose another output folder or pass force=True (--force) to replace it"
        )

    texts = [row["input"] + " " + row["output"] for key in LUME_SPLITS for row in dataset.get(key, [])]
    texts += [row["document"] for key in MIA_SPLITS for row in dataset.get(key, [])]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(
        tokenizer, hidden_size, num_layers, num_heads, max_position_embeddings=max(1024, max_length + 256), seed=seed
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    history = train_until_memorised(model, tokenizer, dataset, config, progress)
    model.to("cpu")
    if not history["memorised"]:
        logger.warning(
            "make-target: not memorised after %d epochs (%s); raise epochs or the model size",
            history["epochs"],
            _flat(history["memorisation"]),
        )
    with atomic_directory(output_dir) as building:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        write_lume_folder(dataset, os.path.join(building, DATA_SUBDIR))
        atomic_write_json(
            os.path.join(building, TARGET_INFO_FILE),
            {
                "fingerprint": fingerprint,
                "format_version": TARGET_FORMAT_VERSION,
                "source": _describe_source(data),
                "config": asdict(config),
                "rows": {key: len(rows) for key, rows in dataset.items()},
                "parameters": sum(p.numel() for p in model.parameters()),
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
