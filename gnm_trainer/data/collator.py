"""Tokenisation of prompt/completion pairs and `GNMDataCollator`, which builds the batches of every loss term.

Prompt and completion are tokenised separately and concatenated, so the completion mask comes from token counts,
never from searching for pad ids or re-tokenising a padded prompt (the published code's bug). Because both sides are
token lists, any prompt can be paired with any completion: a forget prompt with its own completion (`ga`), with a
retain completion (`rm`) or with one of its gradual negatives (`gnm`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import GNMInputError


# ---------------------------------------------------------------------------------------------------------------
# Text and tokens
# ---------------------------------------------------------------------------------------------------------------


def split_template(template: str) -> tuple[str, str]:
    """Split a `{prompt} ... {completion} ...` template into its prompt side and its completion side.

    The whitespace just before `{completion}` moves to the completion side, so that the completion's first token
    carries its leading space exactly as it does when the whole text is tokenised at once.
    """
    completion_at = template.index("{completion}")
    prompt_side = template[:completion_at].rstrip()
    return prompt_side, template[len(prompt_side) :]


def render_prompt(prompt: str, template: str, chat: bool) -> str:
    """The prompt side of the training text (rendered chat prompts are used as they are)."""
    return prompt if chat else split_template(template)[0].format(prompt=prompt)


def render_completion(completion: str, template: str, chat: bool) -> str:
    """The completion side of the training text (rendered chat completions are used as they are)."""
    return completion if chat else split_template(template)[1].format(completion=completion)


def tokenize_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Prompt tokens, with the special tokens the tokenizer adds at the start (e.g. BOS) for plain text only.

    A prompt rendered by a chat template already holds the template's special tokens (TRL tokenises conversations
    without adding any), and a text that already starts with the BOS token must not get a second one.
    """
    bos_token = getattr(tokenizer, "bos_token", None)
    add_special_tokens = not chat and not (bos_token and text.startswith(bos_token))
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_completion(tokenizer, text: str, add_eos_token: bool) -> list[int]:
    """Completion tokens, without special tokens, followed by EOS when asked (and not already there, as in a
    completion rendered by a chat template)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos_token and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def truncate_prompt(prompt_ids: Sequence[int], max_prompt_length: int | None) -> list[int]:
    """Keep the last `max_prompt_length` prompt tokens (the end of a prompt is what the completion follows)."""
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return list(prompt_ids)
    return list(prompt_ids[-max_prompt_length:])


def join_prompt_completion(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int, max_prompt_length: int | None
) -> tuple[list[int], list[int]]:
    """Concatenate prompt and completion tokens within `max_length`; returns (input_ids, completion_mask).

    The prompt is cut on the left to `max_prompt_length`, then the completion on the right to what is left. The
    caller has checked (with `completion_room`) that at least one completion token survives.
    """
    prompt_ids = truncate_prompt(prompt_ids, max_prompt_length)
    completion_ids = list(completion_ids[: max(0, max_length - len(prompt_ids))])
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def completion_room(prompt_ids: Sequence[int], max_length: int, max_prompt_length: int | None) -> int:
    """How many completion tokens fit after this prompt."""
    return max_length - len(truncate_prompt(prompt_ids, max_prompt_length))


def tokenize_examples(
    rows, tokenizer, template: str, max_length: int, max_prompt_length: int | None, add_eos_token: bool, name: str
) -> list[dict[str, Any]]:
    """Tokenise normalised rows into `prompt_input_ids` / `completion_input_ids` (plus id, index and `length`, the
    joined length the Trainer's `train_sampling_strategy="group_by_length"` groups batches by).

    Rows whose prompt leaves no room for a single completion token are an error listing them, rather than silently
    contributing a zero loss.
    """
    examples, too_long, cut_tokens = [], [], []
    for index, row in enumerate(rows):
        prompt_ids = tokenize_prompt(tokenizer, render_prompt(row["prompt"], template, row["chat"]), row["chat"])
        completion_ids = tokenize_completion(
            tokenizer, render_completion(row["completion"], template, row["chat"]), add_eos_token
        )
        if not completion_ids:
            raise GNMInputError(f"{name}, row {index} (id {row['id']!r}), field 'completion': tokenises to no token")
        room = completion_room(prompt_ids, max_length, max_prompt_length)
        if room < 1:
            too_long.append((index, row["id"], len(prompt_ids)))
        elif len(completion_ids) > room:
            cut_tokens.append(len(completion_ids) - room)
        examples.append({
            "id": row["id"], "pair_index": index, "prompt_input_ids": prompt_ids, "completion_input_ids": completion_ids,
            "length": min(max_length, len(prompt_ids) + len(completion_ids)),
        })
    if too_long:
        listed = "; ".join(f"row {i} (id {rid!r}), field 'prompt': {n} tokens" for i, rid, n in too_long[:10])
        more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise GNMInputError(
            f"{name}: {len(too_long)} prompt(s) leave no room for the completion within max_length={max_length} "
            f"(their completions would be truncated to zero tokens): {listed}{more}. Raise max_length or set "
            "max_prompt_length to cut prompts from the left"
        )
    if cut_tokens:
        import logging

        logging.getLogger(__name__).warning(
            "%s: %d of %d completions are cut to fit max_length=%d (%d tokens dropped in all, at most %d in one row); "
            "raise max_length to train on them whole.", name, len(cut_tokens), len(examples), max_length,
            sum(cut_tokens), max(cut_tokens),
        )
    return examples


def tokenize_negatives(
    negatives_by_id: dict[str, list[str]], forget_rows, tokenizer, template: str, add_eos_token: bool
) -> dict[str, list[list[int]]]:
    """Token ids of every level of every forget row's negatives, rendered like that row's completion."""
    chat_by_id = {row["id"]: row["chat"] for row in forget_rows}
    return {
        forget_id: [
            tokenize_completion(tokenizer, render_completion(text, template, chat_by_id[forget_id]), add_eos_token)
            for text in levels
        ]
        for forget_id, levels in negatives_by_id.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def pad_group(prefix: str, sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, completion_mask) pairs to the longest: `{prefix}_input_ids`, `_attention_mask`, `_completion_mask`."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    return {
        f"{prefix}_input_ids": input_ids,
        f"{prefix}_attention_mask": attention_mask,
        f"{prefix}_completion_mask": completion_mask,
    }


@dataclass
class GNMDataCollator:
    """Builds, for a batch of forget examples, the sequences of every enabled loss term.

    Each forget feature (`id`, `pair_index`, `prompt_input_ids`, `completion_input_ids`) yields:
    - `forget_*`: the forget prompt with its true completion (`ga`, `klf`, `npo`, `simnpo`), scored on the
      completion, or on the whole text with `forget_whole_text`;
    - `retain_*`: a retain example paired with it (`gd`, `klr`);
    - `random_match_*`: the forget prompt with a random retain completion (`rm`);
    - `negative_*`: the forget prompt with each of its K gradual negatives, shaped (batch, K, length), looked up by the
      forget row's id; the trainer picks the level its schedule asks for at the step it trains.

    Retain pairing is a seeded permutation per epoch, a pure function of (seed, epoch, pair_index): a resumed run
    pairs exactly as an uninterrupted one. Every tensor is padded to the longest sequence of its group, and keys are
    namespaced (there is never a bare `labels`, which would make the Trainer rescale the loss).
    """

    pad_token_id: int
    max_length: int
    max_prompt_length: int | None = None
    retain_examples: list[dict[str, Any]] | None = None
    negative_completions: dict[str, list[list[int]]] | None = None
    use_retain: bool = False
    use_random_match: bool = False
    use_negatives: bool = False
    forget_whole_text: bool = False  # the forget terms score every token after the first, prompt included
    seed: int = 0
    epoch: int = 0
    _permutations: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if (self.use_retain or self.use_random_match) and not self.retain_examples:
            raise GNMInputError("the retain set is empty, but a loss term (gd, klr or rm) needs retain examples")
        if self.use_negatives and not self.negative_completions:
            raise GNMInputError("the gnm term needs negatives, but none were given")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def paired_retain_index(self, pair_index: int, stream: int) -> int:
        """Index of the retain example paired with a forget example in this epoch (stream 0: gd/klr, 1: rm)."""
        key = (self.epoch, stream)
        if key not in self._permutations:
            rng = np.random.default_rng([self.seed, self.epoch, stream])
            self._permutations = {k: v for k, v in self._permutations.items() if k[0] == self.epoch}
            self._permutations[key] = rng.permutation(len(self.retain_examples))
        permutation = self._permutations[key]
        return int(permutation[pair_index % len(permutation)])

    def _join(self, prompt_ids, completion_ids):
        return join_prompt_completion(prompt_ids, completion_ids, self.max_length, self.max_prompt_length)

    def _forget_sequence(self, feature) -> tuple[list[int], list[int]]:
        ids, mask = self._join(feature["prompt_input_ids"], feature["completion_input_ids"])
        return (ids, [0] + [1] * (len(ids) - 1)) if self.forget_whole_text else (ids, mask)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_group("forget", [self._forget_sequence(f) for f in features], self.pad_token_id)
        if self.use_retain:
            retained = [self.retain_examples[self.paired_retain_index(f["pair_index"], 0)] for f in features]
            batch.update(
                pad_group(
                    "retain",
                    [self._join(r["prompt_input_ids"], r["completion_input_ids"]) for r in retained],
                    self.pad_token_id,
                )
            )
        if self.use_random_match:
            matched = [self.retain_examples[self.paired_retain_index(f["pair_index"], 1)] for f in features]
            batch.update(
                pad_group(
                    "random_match",
                    [self._join(f["prompt_input_ids"], r["completion_input_ids"]) for f, r in zip(features, matched)],
                    self.pad_token_id,
                )
            )
        if self.use_negatives:
            batch.update(self._negatives(features))
        return batch

    def _negatives(self, features) -> dict[str, torch.Tensor]:
        sequences = []
        for feature in features:
            levels = self.negative_completions.get(feature["id"])
            if levels is None:
                raise GNMInputError(f"negatives: no negatives for forget id {feature['id']!r}")
            sequences.extend(self._join(feature["prompt_input_ids"], level) for level in levels)
        num_levels = len(sequences) // len(features)
        flat = pad_group("negative", sequences, self.pad_token_id)
        return {key: value.view(len(features), num_levels, -1) for key, value in flat.items()}


# ---------------------------------------------------------------------------------------------------------------
# Gradual schedule
# ---------------------------------------------------------------------------------------------------------------


def scheduled_negative_level(progress: float, num_levels: int) -> int:
    """The `gradual` schedule: level 1 during the first 1/K of training, ..., level K during the last 1/K."""
    return min(num_levels, 1 + int(max(0.0, progress) * num_levels))


def select_negatives(
    batch: dict[str, torch.Tensor], schedule: str, progress: float, generator: torch.Generator | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pick the negatives the `gnm` term trains on at this point of training.

    `batch["negative_*"]` is (batch, K, length). Returns 2-D `input_ids` / `attention_mask` / `completion_mask` of the
    chosen sequences (trailing all-padding columns removed) and the level (1..K) of each chosen sequence.
    """
    input_ids = batch["negative_input_ids"]
    batch_size, num_levels, _ = input_ids.shape
    keys = ("input_ids", "attention_mask", "completion_mask")
    if schedule == "all":
        chosen = {key: batch[f"negative_{key}"].reshape(batch_size * num_levels, -1) for key in keys}
        levels = torch.arange(1, num_levels + 1, device=input_ids.device).repeat(batch_size)
    else:
        if schedule == "gradual":
            levels = torch.full((batch_size,), scheduled_negative_level(progress, num_levels), dtype=torch.long)
        elif schedule == "random":
            levels = torch.randint(1, num_levels + 1, (batch_size,), generator=generator)
        else:
            raise ValueError(f"unknown negative schedule {schedule!r}")
        levels = levels.to(input_ids.device)
        rows = torch.arange(batch_size, device=input_ids.device)
        chosen = {key: batch[f"negative_{key}"][rows, levels - 1] for key in keys}
    length = int(chosen["attention_mask"].sum(-1).max())
    return {key: value[:, :length] for key, value in chosen.items()}, levels
