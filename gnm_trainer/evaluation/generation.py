"""Greedy generation and per-document NLL, batched, with the organisers' one-at-a-time loop as the reference.

The organisers' script feeds each prompt raw (`tokenizer(prompt)`, special tokens as the tokenizer adds them, no
chat template), decodes greedily with `max_new_tokens=256` and pad = eos, keeps only the new tokens
(`skip_special_tokens=True`), and for MIA takes `model(ids, labels=ids).loss` per document. It does so one example
at a time. The batched versions here give the same tokens and the same losses:

- prompts are tokenized one by one exactly as the reference does, then LEFT-padded by hand (the tokenizer's
  `padding_side` is never touched) with an attention mask, so every prompt ends where generation starts and
  positions are counted from its first real token;
- a batch's key/value cache is allocated once with room for the new tokens (`preallocated_cache`), so a decoding
  step writes its states in place instead of copying the whole cache;
- documents are PACKED end to end without padding, positions restarting at 0 in each (`packed_nll.py`; one row per
  forward pass under FlashAttention, which finds packed documents only in a batch of one row), where the model
  supports it, else RIGHT-padded with a mask (padding after a token cannot change its causal logits); the loss of
  each document is the mean cross-entropy over its own tokens, as `labels=ids` computes it;
- examples are sorted by length (longest first, so an out-of-memory error shows at once) to keep padding small,
  and results come back in input order; packed rows are capped in tokens (`PACKED_ROW_TOKENS`) and
  so are padded NLL batches on a CPU (`CPU_NLL_BATCH_TOKENS`).

Under FlashAttention the padded batches (generation, padded NLL) are unpadded by their attention mask and run its
variable-length kernel, each sequence on its own (tested on an emulation of the kernels, `tests/test_flash_packing.py`).

Both batched functions can show a tqdm progress bar (`show_progress`, off by default), counted in prompts or
documents, like the bars of the rest of the Hugging Face stack.

Equality is exact in the tokens chosen as long as matrix products of different shapes round alike. In float32 on a
CPU they did in every test; in bf16 on a GPU a batch can change the reduction order of a product, and when two
candidate tokens are within that rounding of each other the greedy choice may differ (rare, and the same happens
between two GPUs running the official script).
"""

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..packed_forward import packing_unsupported_reason
from .packed_nll import mean_next_token_nll, packed_document_nll


def pad_token_id(tokenizer, name: str = "tokenizer") -> int:
    """The tokenizer's pad id, or its eos id when it has no pad (the organisers set pad = eos); `name` says which
    tokenizer in the error."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        from ..errors import GNMInputError

        raise GNMInputError(f"{name}: has neither a pad nor an eos token; set tokenizer.pad_token first")
    return tokenizer.eos_token_id


def encode_each(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text on its own, as `tokenizer(text)` gives them (special tokens included)."""
    return [list(tokenizer(text)["input_ids"]) for text in texts]


# On a CPU the forward pass of one document already runs its matrix products at full speed; a batch of many long
# documents only adds activations that no longer fit the caches (docs/performance.md: 16 MIA documents of ~250 tokens
# at once are slower than one at a time, ~1,000 token positions at once are 10% faster). So NLL batches on a CPU hold
# at most this many token positions, padding included.
CPU_NLL_BATCH_TOKENS = 1024


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first: at most `batch_size` rows and, with
    `max_tokens`, at most that many token positions once padded (a longer sequence still gets a batch of its own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else []
        width = lengths[current[0]] if current else 0  # longest first: the first row sets the width
        fits = 0 < len(current) < batch_size and (max_tokens is None or (len(current) + 1) * width <= max_tokens)
        if fits:
            current.append(index)
        else:
            batches.append([index])
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of `sequences` padded to the longest on the `side` ("left" or "right")."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if side == "left" else 0
        input_ids[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, start : start + len(sequence)] = 1
    return input_ids, attention_mask


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with room for `reserve` more tokens than the
    prompt: a decoding step writes its token's states in place instead of copying the whole cache (`torch.cat`), which
    is most of a step's time once a batch's prompts are a few hundred tokens long. The keys and values the attention
    reads are the same tensors' values, of the same length, as a `DynamicLayer`'s."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._key_buffer = self._value_buffer = None

    def _has_room(self, length: int, needed: int) -> bool:
        buffer = self._key_buffer
        return (
            buffer is not None and needed <= buffer.shape[-2] and self.keys.shape[:2] == buffer.shape[:2]
            and (length == 0 or self.keys.data_ptr() == buffer.data_ptr())  # still a view (not cropped, reordered)
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, needed = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        if not self._has_room(length, needed):
            shape = (*key_states.shape[:-2], needed + self.reserve, key_states.shape[-1])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty(shape)
            if length:
                self._key_buffer[..., :length, :] = self.keys
                self._value_buffer[..., :length, :] = self.values
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys, self.values = self._key_buffer[..., :needed, :], self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def place(self, row: int, rows: int, width: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one sequence's states (batch of 1) at the end of row `row` of a left-padded cache of `rows` rows and
        `width` positions; the positions before them stay zero (padding)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            shape = (rows, keys.shape[1], width + self.reserve + 1, keys.shape[-1])  # + 1: the prompts' last token
            self._key_buffer, self._value_buffer = keys.new_zeros(shape), values.new_zeros(shape)
            self.keys, self.values = self._key_buffer[..., :width, :], self._value_buffer[..., :width, :]
        self._key_buffer[row, :, width - keys.shape[-2] : width] = keys[0]
        self._value_buffer[row, :, width - values.shape[-2] : width] = values[0]


def preallocated_cache(model, max_new_tokens: int) -> DynamicCache | None:
    """A `DynamicCache` for `model` whose full-attention layers are `PreallocatedLayer`s with room for
    `max_new_tokens` tokens after the prompt (sliding-window and other layers are kept as transformers makes them).

    None, so that `generate` makes its own cache, for a model without a transformers config (a stand-in generator)
    and for an encoder-decoder model (whose cache is of another kind)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(max_new_tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many first tokens all `sequences` share, leaving each at least its last token."""
    shortest = min(len(sequence) for sequence in sequences)
    length = 0
    while length < shortest - 1 and all(sequence[length] == sequences[0][length] for sequence in sequences):
        length += 1
    return length


@torch.no_grad()
def prompt_cache(model, tokens: Sequence[int], prefix: DynamicCache | None = None) -> DynamicCache:
    """The cache of `tokens` run through `model` alone (batch of 1, no padding), after the tokens already in `prefix`
    (a shared beginning, computed once; it is copied, not changed)."""
    cache = DynamicCache(config=model.config)
    for layer, shared in zip(cache.layers, prefix.layers if prefix is not None else []):
        layer.update(shared.keys, shared.values)
    if tokens:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([list(tokens)], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def prefilled_cache(
    model,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    shared_prefix: tuple[int, DynamicCache] | None = None,
) -> DynamicCache | None:
    """The cache of a LEFT-padded batch of `sequences` holding all but the last token of each, each prompt computed
    alone (no padding, no mask: causal attention over its own tokens only), with room for `max_new_tokens` more.

    `generate` given this cache and the padded batch runs only the last column and then decodes. With long prompts of
    mixed lengths this saves the padded positions and the masked attention of a batched prefill, which costs more
    than the same prompts one at a time (a prefill is compute-bound either way). `shared_prefix` is `(length, cache)`
    of a beginning that every sequence shares (`shared_prefix_length`, `prompt_cache`), computed once for all. Pad
    positions hold zeros, masked by the batch's attention mask. None where `preallocated_cache` is None or a layer is
    not a `PreallocatedLayer`.
    """
    cache = preallocated_cache(model, max_new_tokens)
    if cache is None or not all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
        return None
    width = max(len(sequence) for sequence in sequences) - 1
    prefix_length, prefix = shared_prefix or (0, None)
    for row, sequence in enumerate(sequences):
        if len(sequence) < 2:
            continue
        alone = prompt_cache(model, sequence[prefix_length:-1], prefix)
        for layer, computed in zip(cache.layers, alone.layers):
            layer.place(row, len(sequences), width, computed.keys, computed.values)
    return cache


def progress_bar(total: int, description: str, unit: str, show: bool):
    """A tqdm bar over `total` items (on stderr); a silent one when `show` is False."""
    return tqdm(total=total, desc=description, unit=unit, disable=not show, dynamic_ncols=True)


def _decode_new_tokens(tokenizer, new_tokens: torch.Tensor) -> list[str]:
    # The organisers also passed clean_up_tokenization_spaces=True; transformers 5 ignores it for BPE tokenizers
    # (it would delete real spaces before punctuation), so it is left off rather than warned about on every call.
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 256,
    batch_size: int = 16,
    show_progress: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (raw text, no chat template), batched; only the new text, in input order.

    `max_new_tokens` is one budget for all, or one per prompt: a batch runs to its largest budget and each row keeps
    only its own first tokens, so a row's text does not depend on its batch. `show_progress` shows a bar.
    """
    pad_id = pad_token_id(tokenizer)
    encoded = encode_each(tokenizer, prompts)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    generations: list[str] = [""] * len(prompts)
    with progress_bar(len(prompts), "generation", "prompt", show_progress) as bar:
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            texts = _generate_batch(model, tokenizer, [encoded[i] for i in batch], [budgets[i] for i in batch], pad_id)
            for index, text in zip(batch, texts):
                generations[index] = text
            bar.update(len(batch))
    return generations


def _generate_batch(model, tokenizer, sequences, budgets: Sequence[int], pad_id: int) -> list[str]:
    """The new text of each sequence of one left-padded batch, each cut to its own budget of tokens."""
    input_ids, attention_mask = pad_batch(sequences, pad_id, side="left")
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max(budgets),
        do_sample=False,
        use_cache=True,
        cache=preallocated_cache(model, max(budgets)),
        pad_token_id=pad_id,
    )
    new_tokens = output[:, input_ids.shape[1] :]
    return [_decode_new_tokens(tokenizer, new_tokens[row : row + 1, :budget])[0] for row, budget in enumerate(budgets)]


@torch.no_grad()
def generate_one_by_one(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256) -> list[str]:
    """The organisers' loop: one prompt at a time, no attention mask, pad = eos, only the new tokens decoded."""
    generations = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        output = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.eos_token_id,
        )
        generations.append(_decode_new_tokens(tokenizer, output[:, input_ids.shape[1] :])[0])
    return generations


# Packed rows hold at most this many tokens, or the longest document's when it is longer. Within a row, attention is
# computed over the whole row and the scores between documents are masked and thrown away, so long rows waste work:
# on a CPU (4.7M-parameter Llama, MIA documents of 150-370 tokens, one thread) rows of 400 tokens cost the same as one
# document per row, rows of 512 tokens 8% more, rows of 1,024 tokens 30% more. Rows of the longest document's length
# cost at most what one padded row of it costs; short documents (questions, sentences) still share rows.
PACKED_ROW_TOKENS = 384


@torch.no_grad()
def document_nll(
    model, tokenizer, documents: Sequence[str], batch_size: int = 16, show_progress: bool = False
) -> list[float]:
    """Mean token NLL of each document (`model(ids, labels=ids).loss` of each alone), in input order.

    Packed without padding (`packed_nll.py`) when the model separates packed documents by their positions: rows of at
    most `PACKED_ROW_TOKENS` tokens (or the longest document's), one row per forward on a CPU (where one row already
    runs at full speed) and `batch_size` rows elsewhere (end to end in one row under FlashAttention). Otherwise padded
    batches of at most `batch_size` documents (and `CPU_NLL_BATCH_TOKENS` positions on a CPU). `show_progress` shows a
    bar.
    """
    encoded = encode_each(tokenizer, documents)
    on_cpu = model.device.type == "cpu"
    with progress_bar(len(documents), "MIA NLL", "document", show_progress) as bar:
        if packing_unsupported_reason(model) is None:
            max_row_tokens = max([PACKED_ROW_TOKENS] + [len(ids) for ids in encoded])
            rows_per_forward = 1 if on_cpu else batch_size
            return packed_document_nll(model, encoded, max_row_tokens, rows_per_forward, on_row=bar.update)
        return _padded_document_nll(model, encoded, pad_token_id(tokenizer), batch_size, on_cpu, bar.update)


def _padded_document_nll(model, encoded, pad_id: int, batch_size: int, on_cpu: bool, on_batch) -> list[float]:
    """`document_nll` in right-padded, length-sorted batches, for models that cannot take packed positions."""
    losses: list[float] = [float("nan")] * len(encoded)
    max_tokens = CPU_NLL_BATCH_TOKENS if on_cpu else None
    for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, max_tokens):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], pad_id, side="right")
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        for row, index in enumerate(batch):
            length = len(encoded[index])
            losses[index] = mean_next_token_nll(logits[row, :length], input_ids[row, :length], [length])[0]
        on_batch(len(batch))
    return losses


@torch.no_grad()
def document_nll_one_by_one(model, tokenizer, documents: Sequence[str]) -> list[float]:
    """The organisers' loop: `model(ids, labels=ids).loss` for one document at a time."""
    losses = []
    for document in documents:
        input_ids = tokenizer(document, return_tensors="pt").input_ids.to(model.device)
        losses.append(model(input_ids, labels=input_ids).loss.item())
    return losses
