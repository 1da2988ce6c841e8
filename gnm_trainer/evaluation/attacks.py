"""Attacks on an unlearned model: does what it forgot come back?

Two published attacks undo much unlearning, and neither the SemEval-2025 scorer nor open-unlearning measures them:

- **Quantisation** (Zhang et al., ICLR 2025, arXiv 2410.16454): `quant8` and `quant4` save the evaluated model with
  full float32 weights (a PEFT adapter merged into its base) into a temporary folder, reload it with bitsandbytes in
  8-bit (`Linear8bitLt`) or 4-bit NF4 (`Linear4bit`, float32 compute), and score the forget and retain sets again with
  the official metric (`evaluate_model`). Needs the `attacks` extra (`pip install 'gnm_trainer[attacks]'`).
- **Relearning** (RTT, Deeb & Roger, arXiv 2410.08827): `relearn` splits the forget set's documents (a document's
  sentence-completion and QA rows stay together, `document_key`) into two halves with a seed, fine-tunes a copy of the
  model on half T (causal-LM loss on the completion tokens, LoRA by default) and scores the held-out half V.

Each attack reports the forget set's scores and the **recovery** of what unlearning removed, per task and overall,
for regurgitation (R), knowledge (K) and their mean:

    recovery = (score after attack - score unlearned) / (score of the target - score unlearned)

0 means nothing came back, 1 that everything the unlearning removed came back (it can leave [0, 1]: an attack may
remove more, or restore more than the target knew). For `relearn` all three scores are on V only. When the target
and the unlearned model score the same (|difference| < `MIN_REMOVED`: nothing was removed) the recovery is None and a
note says so. The target's scores come from `target`: a target model folder (evaluated here on the same rows), an
`evaluation_results.json` of it on the same data (its `per_example.jsonl` beside it gives the per-row scores that V
needs), or those per-example rows themselves. Without a target only the scores are reported.

Everything is deterministic under `seed` (the split, the LoRA initialisation, the batch order; generation is
greedy), and nothing is written into the evaluated model's folder or the target's: the temporary folder lives in
the system's temporary directory and is removed after.
"""

import contextlib
import copy
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..data import load_unlearning_data
from ..errors import GNMInputError
from ..io_utils import read_json_file
from .semeval import KNOWLEDGE, REGURGITATION, score_rows

ATTACKS = ("quant8", "quant4", "relearn")
QUANTISATION_BITS = {"quant8": 8, "quant4": 4}
RESULTS_KEY = "attacks"
MEAN = "mean"
METRICS = (REGURGITATION, KNOWLEDGE, MEAN)
OVERALL = "overall"
MIN_REMOVED = 1e-6
INSTALL_HINT = "pip install 'gnm_trainer[attacks]'"
# Relearning budget. The paper's RTT fine-tunes for a few epochs on T; 20 steps of 8 rows at 1e-3 with a rank-8
# LoRA on every linear layer covers the demo's T several times over, which brings a memorised-then-unlearned tiny
# model's knowledge back when it is only suppressed (a meaningful attack), in a few seconds on a CPU.
DEFAULT_RELEARN_STEPS = 20
DEFAULT_RELEARN_LEARNING_RATE = 1e-3
DEFAULT_RELEARN_LORA_R = 8  # 0: fine-tune every weight
RELEARN_BATCH_SIZE = 8
RELEARN_MAX_LENGTH = 512


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def parse_attacks(names: str | Sequence[str]) -> tuple[str, ...]:
    """The attack names from a comma-separated string or a sequence, checked against `ATTACKS`, duplicates dropped."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise GNMInputError(f"attacks: unknown attack {', '.join(map(repr, unknown)) or 'list (empty)'}; "
                            f"expected a comma-separated list of {', '.join(ATTACKS)}")
    return tuple(dict.fromkeys(names))


def require_bitsandbytes() -> None:
    """One line naming the extra to install when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise GNMInputError(
            f"attacks quant8/quant4 need bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from error


def check_attack_inputs(attacks: Sequence[str], forget, relearn_steps: int, relearn_learning_rate: float,
                        relearn_lora_r: int, target=None) -> tuple[str, ...]:
    """Everything that can be checked before a model is loaded; returns the parsed attack names."""
    attacks = parse_attacks(attacks)
    if any(name in QUANTISATION_BITS for name in attacks):
        require_bitsandbytes()
    if "relearn" in attacks:
        if relearn_steps < 1:
            raise GNMInputError(f"relearn_steps: expected an integer >= 1 (the relearning budget), got {relearn_steps}")
        if not relearn_learning_rate > 0:
            raise GNMInputError(f"relearn_learning_rate: expected a number > 0, got {relearn_learning_rate}")
        if relearn_lora_r < 0:
            raise GNMInputError(
                f"relearn_lora_r: expected a LoRA rank >= 1, or 0 for full fine-tuning, got {relearn_lora_r}"
            )
        split_documents(load_unlearning_data(forget, split="forget"), seed=0)
    if isinstance(target, str):
        if not os.path.exists(target):
            raise GNMInputError(f"target: {target!r} is neither a target model folder nor an evaluation_results.json")
        if os.path.isfile(target):
            target_rows_from_results(target)
    return attacks


# ---------------------------------------------------------------------------------------------------------------
# Scores and recovery (pure)
# ---------------------------------------------------------------------------------------------------------------


def _with_mean(regurgitation: float | None, knowledge: float | None) -> dict[str, float | None]:
    present = [value for value in (regurgitation, knowledge) if value is not None]
    return {REGURGITATION: regurgitation, KNOWLEDGE: knowledge, MEAN: sum(present) / len(present) if present else None}


def forget_scores(rows: Sequence[Mapping[str, Any]], ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """R, K and their mean per task and `overall` (over all rows, as the official overall keys) on the forget rows
    of `rows` (per-example rows as `evaluate_model` returns them), only those whose id is in `ids` when given."""
    chosen = [row for row in rows if row["split"] == "forget" and (ids is None or row["id"] in ids)]
    split = score_rows(chosen).get("forget-set", {})
    scores = {task: _with_mean(values[REGURGITATION], values[KNOWLEDGE])
              for task, values in split.items() if isinstance(values, Mapping)}
    scores[OVERALL] = _with_mean(split.get(f"overall-{REGURGITATION}"), split.get(f"overall-{KNOWLEDGE}"))
    return scores


def recovery(target: Mapping[str, Mapping[str, Any]], unlearned: Mapping[str, Mapping[str, Any]],
             attacked: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """`(recovery per group and metric, notes)`: (attacked - unlearned) / (target - unlearned) for every group
    (task or `overall`) and metric of `forget_scores`; None, with a note, where nothing was removed."""
    figures, notes = {}, []
    for group, attacked_scores in attacked.items():
        figures[group] = {}
        for metric in METRICS:
            values = (target.get(group, {}).get(metric), unlearned.get(group, {}).get(metric),
                      attacked_scores.get(metric))
            if None in values:
                figures[group][metric] = None
                continue
            target_value, unlearned_value, attacked_value = values
            removed = target_value - unlearned_value
            if abs(removed) < MIN_REMOVED:
                figures[group][metric] = None
                notes.append(f"{group} {metric}: the target and the unlearned model both score {target_value:.3f} "
                             "(nothing was removed), so there is no recovery to measure")
            else:
                figures[group][metric] = (attacked_value - unlearned_value) / removed
    return figures, notes


def split_documents(rows: Sequence[Mapping[str, Any]], seed: int) -> tuple[list, list]:
    """`(train_rows, held_out_rows)`: the forget rows split by document (`document_key`) into two halves, T (the
    smaller half when the count is odd) and V, the documents shuffled with `seed`. Needs two documents at least."""
    from ..target.data import document_key

    keys = sorted({document_key(row["id"]) for row in rows})
    if len(keys) < 2:
        raise GNMInputError(f"relearn: the forget set holds {len(keys)} document(s) ({', '.join(keys) or 'none'}); "
                            "relearning trains on half of the documents and scores the other half, so it needs at "
                            "least two (rows of one document share the id without its sc1/qaN suffix)")
    random.Random(seed).shuffle(keys)
    train_keys = set(keys[: len(keys) // 2])
    train = [row for row in rows if document_key(row["id"]) in train_keys]
    held_out = [row for row in rows if document_key(row["id"]) not in train_keys]
    return train, held_out


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_model_folder(model, tokenizer) -> Iterator[str]:
    """A temporary folder (in the system's temporary directory, removed after) holding `model` with full float32
    weights, a PEFT adapter merged into its base, and the tokenizer."""
    from ..modeling import is_peft_model

    with tempfile.TemporaryDirectory(prefix="gnm-attack-") as folder:
        full = copy.deepcopy(model).float()
        if is_peft_model(full):
            full = full.merge_and_unload()
        full.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del full
        yield folder


def _device():
    from .evaluator import _partial_state

    return _partial_state().device


def load_quantised(folder: str, bits: int, name: str = "model"):
    """The model saved in `folder` loaded with bitsandbytes in `bits` (8, or 4 for NF4); checks that linear layers
    were really replaced (`name` is the evaluated model, for the message)."""
    require_bitsandbytes()
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..model_loading import from_pretrained

    if bits == 8:
        config, layer = BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        layer = bnb.nn.Linear4bit
    model = from_pretrained(AutoModelForCausalLM, folder, "model", quantization_config=config,
                            device_map={"": _device()})
    if not any(isinstance(module, layer) for module in model.modules()):
        raise GNMInputError(f"{name}: cannot be quantised to {bits}-bit: it has no linear layer bitsandbytes can "
                            f"replace (no {layer.__name__} after loading; the output layer is always kept)")
    return model


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """Silence bitsandbytes' warning that 8-bit matmuls cast float32 inputs to float16, logged once per matmul."""
    import logging

    bitsandbytes_logger = logging.getLogger("bitsandbytes")
    level = bitsandbytes_logger.level
    bitsandbytes_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bitsandbytes_logger.setLevel(level)


def relearned_model(folder: str, tokenizer, rows: Sequence[Mapping[str, Any]], steps: int, learning_rate: float,
                    lora_r: int, seed: int, text_template: str | None = None):
    """A fresh copy of the model saved in `folder`, fine-tuned for `steps` AdamW steps on `rows` (causal-LM loss on
    the completion tokens, rows rendered with `text_template` or GNMConfig's default), with a rank-`lora_r` LoRA on
    every linear layer (merged after) or, for `lora_r=0`, every weight. A plain loop: no output folder, no
    checkpoint, exactly `steps` updates; batches of `RELEARN_BATCH_SIZE` rows cycle through a seeded order."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..data.collator import join_prompt_completion, pad_group, tokenize_examples
    from ..gnm_config import DEFAULT_TEXT_TEMPLATE

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(_device())
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    examples = tokenize_examples(rows, tokenizer, text_template or DEFAULT_TEXT_TEMPLATE, RELEARN_MAX_LENGTH, None,
                                 add_eos_token=True, name="relearn (forget half T)")
    sequences = [join_prompt_completion(e["prompt_input_ids"], e["completion_input_ids"], RELEARN_MAX_LENGTH, None)
                 for e in examples]
    random.Random(seed).shuffle(sequences)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_size = min(RELEARN_BATCH_SIZE, len(sequences))
    model.train()
    for step in range(steps):
        batch = [sequences[(step * batch_size + i) % len(sequences)] for i in range(batch_size)]
        padded = {key: value.to(model.device) for key, value in pad_group("relearn", batch, pad_id).items()}
        labels = padded["relearn_input_ids"].masked_fill(padded["relearn_completion_mask"] == 0, -100)
        loss = model(input_ids=padded["relearn_input_ids"], attention_mask=padded["relearn_attention_mask"],
                     labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model.merge_and_unload() if lora_r else model


# ---------------------------------------------------------------------------------------------------------------
# Target scores
# ---------------------------------------------------------------------------------------------------------------


def target_rows_from_results(path: str) -> list[dict[str, Any]]:
    """The per-example rows beside a target's `evaluation_results.json` (`per_example.jsonl`, as `gnm evaluate`
    writes them): recovery per task, and on the held-out half for `relearn`, needs the scores per row."""
    from ..data import read_records
    from .evaluator import PER_EXAMPLE_FILE

    data = read_json_file(path, "target results file (expected an evaluation_results.json)")
    if not isinstance(data, dict) or "forget-set" not in data:
        raise GNMInputError(f"{path}: not an evaluation_results.json (no 'forget-set'); pass the target's results "
                            "written by gnm evaluate, or the target model folder")
    rows_path = os.path.join(os.path.dirname(os.path.abspath(path)), PER_EXAMPLE_FILE)
    if not os.path.isfile(rows_path):
        raise GNMInputError(f"{path}: no {PER_EXAMPLE_FILE} beside it; the attacks need the target's per-example "
                            "scores (gnm evaluate writes both), or pass the target model folder instead")
    return list(read_records(rows_path))


def _check_target_covers(rows: Sequence[Mapping[str, Any]], forget_ids: set[str], source: str) -> None:
    missing = forget_ids - {row["id"] for row in rows if row["split"] == "forget"}
    if missing:
        raise GNMInputError(f"target {source}: scored on other data; {len(missing)} forget id(s) are missing, e.g. "
                            f"{sorted(missing)[0]!r} (evaluate the target on the same data and partition)")


# ---------------------------------------------------------------------------------------------------------------
# The attacks
# ---------------------------------------------------------------------------------------------------------------


def run_attacks(
    model,
    tokenizer,
    forget,
    retain,
    attacks: str | Sequence[str] = ATTACKS,
    target=None,
    unlearned_rows: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    relearn_steps: int = DEFAULT_RELEARN_STEPS,
    relearn_learning_rate: float = DEFAULT_RELEARN_LEARNING_RATE,
    relearn_lora_r: int = DEFAULT_RELEARN_LORA_R,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    text_template: str | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run `attacks` on the unlearned `model` and return their figures (the `attacks` key of the results).

    Args:
        model: the unlearned model: a folder (full model or PEFT adapter), or a model in memory (left unchanged).
        tokenizer: its tokenizer, or a tokenizer folder; None loads the one saved with `model` (a folder).
        forget, retain: the rows scored (normalised datasets or lists of rows in any accepted format); `retain`
            None scores the forget set alone (faster; the quantisation attacks then report no retain scores).
        attacks: names from `ATTACKS` (a list or a comma-separated string).
        target: the model before unlearning, for the recovery: a model folder (evaluated here), the path of its
            `evaluation_results.json` on the same data (with `per_example.jsonl` beside it), or its per-example
            rows. None: scores only, no recovery.
        unlearned_rows: the unlearned model's per-example rows on the same data when already computed (else it is
            evaluated here).
        seed: the document split, LoRA initialisation and batch order of `relearn`.
        relearn_steps, relearn_learning_rate, relearn_lora_r: the relearning budget (rank 0: full fine-tuning).
        max_new_tokens, batch_size, text_template, show_progress: as in `evaluate_model`.

    Returns `{"settings": ..., "target-forget-set": ..., "unlearned-forget-set": ..., "<attack>": {...}}`, each
    attack with its `forget-set` scores (`forget_scores` layout), `recovery` and `notes` (`quant8`/`quant4` also
    the retain set; `relearn` the held-out documents and the target's and unlearned model's scores on them).
    """
    from .evaluator import evaluate_model, load_model_and_tokenizer

    forget = load_unlearning_data(forget, split="forget")
    retain = None if retain is None else load_unlearning_data(retain, split="retain")
    attacks = check_attack_inputs(attacks, forget, relearn_steps, relearn_learning_rate, relearn_lora_r, target)
    name = model if isinstance(model, str) else "model"
    if isinstance(model, str):
        model, loaded_tokenizer = load_model_and_tokenizer(model, "float32")
        tokenizer = tokenizer or loaded_tokenizer
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        from ..model_loading import from_pretrained

        tokenizer = from_pretrained(AutoTokenizer, tokenizer, "tokenizer")
    scoring = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, text_template=text_template,
                   show_progress=show_progress)

    def scored_rows(evaluated, forget_rows, retain_rows) -> list[dict[str, Any]]:
        return evaluate_model(evaluated, tokenizer, forget_rows, retain_rows, dtype="auto", **scoring)[1]

    forget_ids = {row["id"] for row in forget}
    if unlearned_rows is None:
        unlearned_rows = scored_rows(model, forget, retain)
    rows_of_target = _target_rows(target, forget, retain, scored_rows, forget_ids)
    figures: dict[str, Any] = {
        "settings": {"attacks": list(attacks), "seed": seed, "relearn_steps": relearn_steps,
                     "relearn_learning_rate": relearn_learning_rate, "relearn_lora_r": relearn_lora_r,
                     "relearn_batch_size": RELEARN_BATCH_SIZE, "max_new_tokens": max_new_tokens,
                     "target": target if isinstance(target, str) else ("rows" if target is not None else None)},
        # On the rows the attacks score, as `relearn` does on its half: a results file or rows given for the target
        # or the unlearned model may hold others, which would move their means and so the recovery's denominator.
        "target-forget-set": forget_scores(rows_of_target, forget_ids) if rows_of_target else None,
        "unlearned-forget-set": forget_scores(unlearned_rows, forget_ids),
    }
    with full_model_folder(model, tokenizer) as folder:
        for attack in attacks:
            if attack in QUANTISATION_BITS:
                quantised = load_quantised(folder, QUANTISATION_BITS[attack], name)
                with _quiet_bitsandbytes():
                    rows = scored_rows(quantised, forget, retain)
                del quantised
                retain_rows = [row for row in rows if row["split"] == "retain"]
                figures[attack] = {"forget-set": forget_scores(rows),
                                   "retain-set": score_rows(retain_rows).get("retain-set")}
                _add_recovery(figures[attack], figures["target-forget-set"], figures["unlearned-forget-set"])
            else:
                train, held_out = split_documents(forget, seed)
                relearned = relearned_model(folder, tokenizer, train, relearn_steps, relearn_learning_rate,
                                            relearn_lora_r, seed, text_template)
                held_out_ids = {row["id"] for row in held_out}
                rows = scored_rows(relearned, held_out, None)
                del relearned
                figures[attack] = {
                    "train_rows": len(train), "held_out_rows": len(held_out), "held_out_ids": sorted(held_out_ids),
                    "forget-set": forget_scores(rows),
                    "target-forget-set": forget_scores(rows_of_target, held_out_ids) if rows_of_target else None,
                    "unlearned-forget-set": forget_scores(unlearned_rows, held_out_ids),
                }
                _add_recovery(figures[attack], figures[attack]["target-forget-set"],
                              figures[attack]["unlearned-forget-set"])
    return figures


def _target_rows(target, forget, retain, scored_rows, forget_ids: set[str]) -> list[dict[str, Any]] | None:
    """The target's per-example rows from a folder (evaluated), a results file, or rows; None without a target."""
    if target is None:
        return None
    if isinstance(target, str) and os.path.isdir(target):
        from .evaluator import load_model_and_tokenizer

        target_model, _ = load_model_and_tokenizer(target, "float32")
        return scored_rows(target_model, forget, retain)
    rows = target_rows_from_results(target) if isinstance(target, str) else list(target)
    _check_target_covers(rows, forget_ids, target if isinstance(target, str) else "rows")
    return rows


def _add_recovery(attack_figures: dict[str, Any], target_scores, unlearned_scores) -> None:
    if target_scores is None:
        attack_figures["recovery"] = None
        attack_figures["notes"] = ["no target scores given (target model or its results): recovery not computed"]
        return
    attack_figures["recovery"], attack_figures["notes"] = recovery(target_scores, unlearned_scores,
                                                                   attack_figures["forget-set"])
