"""The training loop of a target: AdamW on the causal LM loss of every train row, in rounds (warm restarts of a
cosine schedule) until the memorisation check passes or the epoch budget runs out."""

import logging
import math
from dataclasses import dataclass

from ..data.loading import classify_kind
from .config import LUME_SPLITS, TargetConfig
from .memorisation import flat_scores, is_memorised, memorisation_report

logger = logging.getLogger(__name__)


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


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over the first steps, then cosine decay to zero at `total_steps`.

    Exact memorisation needs the small late steps; a constant rate leaves the loss bouncing around 0.3.
    """
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def pretraining_blocks(tokenizer, documents: list[dict], max_length: int) -> list[TrainingExample]:
    """Every pretraining document (bos + text + eos) cut into blocks of at most `max_length` tokens."""
    blocks = []
    for row in documents:
        ids = tokenizer(row["document"])["input_ids"] + [tokenizer.eos_token_id]
        blocks.extend(
            TrainingExample(ids[start : start + max_length], 1, "other", "pretraining")
            for start in range(0, len(ids), max_length)
            if len(ids[start : start + max_length]) > 1
        )
    return blocks


def run_epoch(model, optimizer, scheduler, examples, batches, pad_token_id: int, on_batch=None) -> float:
    """One pass of AdamW (gradient norm clipped at 1) over `batches` of `examples`; returns the mean token loss.
    `on_batch(batch_indices, logits, input_ids)` sees every batch's outputs."""
    import torch

    model.train()
    total_loss, total_tokens = 0.0, 0
    for batch_indices in batches:
        batch = [examples[i] for i in batch_indices]
        input_ids, attention_mask, labels = (t.to(model.device) for t in pad_batch(batch, pad_token_id))
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if on_batch is not None:
            on_batch(batch_indices, outputs.logits.detach(), input_ids)
        tokens = int(attention_mask.sum()) - len(batch)
        total_loss += float(outputs.loss.detach()) * tokens
        total_tokens += tokens
    return total_loss / max(1, total_tokens)


def pretrain(model, tokenizer, blocks: list[TrainingExample], documents: int, config: TargetConfig,
             progress: bool = True) -> dict | None:
    """Causal LM training on the `blocks` of `documents` pretraining documents for `config.pretraining_epochs`
    epochs, one warm-up and cosine cycle from `config.learning_rate`: the general ability the target has before it
    memorises the benchmark. Returns the figures (documents, blocks, tokens, epoch losses), or None when there is
    nothing to do."""
    import torch
    from tqdm.auto import tqdm

    if not blocks or config.pretraining_epochs == 0:
        return None
    lengths = [len(block.input_ids) for block in blocks]
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    total_steps = config.pretraining_epochs * math.ceil(len(blocks) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps))
    epoch_loss = []
    for epoch in tqdm(range(1, config.pretraining_epochs + 1), desc="pretraining", unit="epoch", disable=not progress):
        batches = length_grouped_batches(lengths, config.batch_size, generator)
        epoch_loss.append(round(run_epoch(model, optimizer, scheduler, blocks, batches, tokenizer.pad_token_id), 5))
        logger.info("make-target pretraining epoch %d: loss %.4f", epoch, epoch_loss[-1])
    return {"documents": documents, "blocks": len(blocks), "tokens": sum(lengths),
            "epochs": config.pretraining_epochs, "replay_per_example": config.pretraining_replay,
            "epoch_loss": epoch_loss}


def train_until_memorised(model, tokenizer, dataset, config: TargetConfig, progress: bool = True,
                          replay: list[TrainingExample] = ()) -> dict:
    """Fine-tune `model` with AdamW on the full-sequence causal LM loss until greedy reproduction of the train rows
    of both splits passes the thresholds; returns the training history (`memorised` says whether it did).

    Training runs in rounds of `config.epochs` epochs, each a warm-up and cosine decay from the peak rate (a warm
    restart), with a greedy check whenever the teacher-forced proxy passes and at the end of every round, until
    the target is memorised or `config.max_epochs` epochs have run. Every epoch also trains on
    `config.pretraining_replay` blocks of `replay` per example, drawn anew each epoch (not checked for
    memorisation)."""
    import torch
    from tqdm.auto import tqdm

    examples = training_examples(dataset, tokenizer, config)
    replayed = min(len(replay), round(config.pretraining_replay * len(examples))) if replay else 0
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    round_steps = config.epochs * math.ceil((len(examples) + replayed) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step % round_steps, round_steps)
    )
    history: dict = {"epoch_loss": [], "greedy_checks": []}
    report: dict = {}
    bar = tqdm(range(1, config.max_epochs + 1), desc="make-target", unit="epoch", disable=not progress)
    for epoch in bar:
        fractions = [0.0] * len(examples)

        epoch_examples = list(examples)
        if replayed:
            epoch_examples += [replay[i] for i in torch.randperm(len(replay), generator=generator)[:replayed].tolist()]

        def record_fractions(batch_indices, logits, input_ids):
            batch = [epoch_examples[i] for i in batch_indices]
            for i, fraction in zip(batch_indices, reproduced_fraction(logits, input_ids, batch)):
                if i < len(examples):
                    fractions[i] = fraction

        lengths = [len(example.input_ids) for example in epoch_examples]
        batches = length_grouped_batches(lengths, config.batch_size, generator)
        loss = run_epoch(model, optimizer, scheduler, epoch_examples, batches, tokenizer.pad_token_id,
                         record_fractions)
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
        end_of_round = epoch % config.epochs == 0 or epoch == config.max_epochs
        if proxy_passes or end_of_round:
            report = memorisation_report(model, tokenizer, dataset)
            history["greedy_checks"].append({"epoch": epoch, **flat_scores(report)})
            if is_memorised(report, config):
                break
    bar.close()
    history["epochs"] = epoch
    history["memorised"] = is_memorised(report, config)
    history["memorisation"] = report
    return history
