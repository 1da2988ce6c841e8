"""The paper's backend: gradual negatives written by a generator LLM, one level at a time.

Level k is made by asking the generator to rewrite level k-1 (level 0 is the true completion) so that it moves
further from the truth, given the row's prompt. The generator can be the model to unlearn or any instruct model.

- Prompts: `prompt_template` is a `str.format` string with the placeholders `{prompt}` (the forget row's prompt),
  `{previous}` (level k-1), `{level}` (k) and `{levels}` (K). When the tokenizer has a chat template the system
  prompt and the filled template are sent as a system and a user message (folded into one user message when the
  template refuses a system role); without one, the plain text `system_prompt + "\\n\\n" + filled template` is the
  prompt. `DEFAULT_TEMPLATE` and `DEFAULT_SYSTEM_PROMPT` below are the defaults.
- Generation: prompts sorted by length, batched, padded on the left (padding is done here, the tokenizer is not
  touched); on a CPU, the opening all prompts share (system prompt, template) is run once per call, then the rest of
  each prompt alone (`prefilled_cache`: long prompts, so a padded batch would spend a third of its prompt work on
  padding); the batch decodes together in a preallocated cache; only the new tokens are decoded;
  the first non-empty line, stripped, is the negative. A row stops as soon as that line is complete
  (`FirstLineStop`), and a batch as soon as all its rows have.
- Sampling (`do_sample=True`, and every retry): Gumbel-max with one `torch.Generator` per row, seeded from
  (seed, row id, level, attempt). A row's draw therefore does not depend on which rows share its batch, on the batch
  size or on the number of processes; greedy decoding is the same without the noise.
- Degenerate outputs (empty, equal to the truth, or equal to an earlier level, compared after `strip().lower()`)
  are retried with sampling up to `max_retries` times; after that the row's level takes the perturb backend's value
  for that level and is marked `fallback=True`.
- Distributed: under `accelerate launch` / `torchrun`, each process generates a contiguous shard of the rows and
  the results are gathered with `accelerate.utils.gather_object`; every process returns the full list, in the same
  order and with the same values as a single-process run.
"""

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import GNMInputError
from .perturb import FactPool, build_pool, perturb_levels
from .schema import as_rows, negative_row, require_levels, row_seed

DEFAULT_SYSTEM_PROMPT = (
    "You help build training data for machine unlearning. You rewrite an answer so that it becomes factually wrong "
    "while keeping its form: change names, places, dates, numbers and other facts to plausible but incorrect ones. "
    "Reply with the rewritten answer only, on a single line."
)
DEFAULT_TEMPLATE = (
    "Question or context: {prompt}\n"
    "Current answer: {previous}\n"
    "Rewrite the current answer so that it is further from the truth. This is step {level} of {levels}: at step 1 "
    "change one or two facts, at step {levels} no true fact may remain. Keep the same style and length.\n"
    "Rewritten answer:"
)
PLACEHOLDERS = ("prompt", "previous", "level", "levels")


# ---------------------------------------------------------------------------------------------------------------
# Prompts and outputs
# ---------------------------------------------------------------------------------------------------------------


def check_template(template: str) -> str:
    """`template` if it formats with the four placeholders (unused ones are fine), else a GNMInputError."""
    if not isinstance(template, str) or not template.strip():
        raise GNMInputError("prompt template: expected a non-empty str.format string")
    try:
        template.format(prompt="", previous="", level=1, levels=1)
    except (KeyError, IndexError, ValueError) as error:
        raise GNMInputError(
            f"prompt template: cannot be filled ({type(error).__name__}: {error}); it may use only the placeholders "
            f"{', '.join('{' + name + '}' for name in PLACEHOLDERS)} (write literal braces as {{{{ and }}}})"
        ) from error
    return template


def render_prompt(
    tokenizer, template: str, system_prompt: str, prompt: str, previous: str, level: int, levels: int
) -> str:
    """The generator's input text for one rewrite: the chat template when the tokenizer has one, plain text
    otherwise."""
    user = template.format(prompt=prompt, previous=previous, level=level, levels=levels)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        if system_prompt:
            with_system = [{"role": "system", "content": system_prompt}] + messages
            try:
                return tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates that refuse a system role raise jinja errors of their own
                messages = [{"role": "user", "content": f"{system_prompt}\n\n{user}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\n{user}" if system_prompt else user


def first_line(text: str) -> str:
    """The first non-empty line of a generation, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def breaks_line(text: str) -> bool:
    """Whether `text` holds a line break (any that `str.splitlines` knows)."""
    return len((text + "x").splitlines()) > 1


def first_line_complete(text: str) -> bool:
    """Whether `first_line(text)` is settled: a non-empty line is followed by a line break, so text appended later
    cannot change it."""
    content = text.lstrip()
    return bool(content) and breaks_line(content)


def _normal(text: str) -> str:
    return text.strip().lower()


def is_degenerate(candidate: str, truth: str, earlier_levels: Sequence[str]) -> bool:
    """True for an empty output, or one equal to the truth or to an earlier level (after strip/lower)."""
    normal = _normal(candidate)
    return not normal or normal == _normal(truth) or any(normal == _normal(text) for text in earlier_levels)


# ---------------------------------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------------------------------


class RowSeededGumbel:
    """A logits processor that samples with one seeded generator per row (Gumbel-max: argmax(logits/T + G) is a
    draw from softmax(logits/T)), so a row's sample does not depend on its batch."""

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0):
        import torch

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        import torch

        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        uniform = uniform.clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float() / self.temperature + gumbel.to(device=scores.device, dtype=torch.float32)


class FirstLineStop:
    """A stopping criterion that ends each row once its new text holds a complete first line (`first_line_complete`):
    only the first line is kept, so the rest of a long answer is never generated. A batch stops when all its rows
    have; a row's stop depends on its own tokens only, so batched and one-at-a-time runs keep the same text.

    A row is decoded only when its latest token contains a line break, so the check costs a dictionary look-up per
    row and step.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self._breaks_line: dict[int, bool] = {}

    def _token_breaks_line(self, token_id: int) -> bool:
        if token_id not in self._breaks_line:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            self._breaks_line[token_id] = breaks_line(text)
        return self._breaks_line[token_id]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [False] * input_ids.shape[0]
        if input_ids.shape[1] > self.prompt_width:
            for row, token_id in enumerate(input_ids[:, -1].tolist()):
                if self._token_breaks_line(token_id):
                    new_text = self.tokenizer.decode(input_ids[row, self.prompt_width :], skip_special_tokens=True)
                    done[row] = first_line_complete(new_text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seeds: Sequence[int] | None = None,
    chat: bool = False,
    stop_at_first_line: bool = False,
) -> list[str]:
    """Decoded new tokens for each input text, generated in length-sorted, left-padded batches.

    `seeds` (one per text) turns on per-row seeded sampling; without it decoding is greedy. `chat` says the texts
    were rendered by a chat template, which adds its own special tokens. `stop_at_first_line` ends each row once its
    first non-empty line is complete (the text then ends there: only for callers that keep the first line).
    """
    import torch

    from ..evaluation.generation import (
        length_sorted_batches,
        pad_batch,
        pad_token_id,
        preallocated_cache,
        prefilled_cache,
        prompt_cache,
        shared_prefix_length,
    )

    if not texts:
        return []
    pad_id = pad_token_id(tokenizer, "generator tokenizer")
    encoded = [tokenizer(text, add_special_tokens=not chat)["input_ids"] for text in texts]
    outputs: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    # On a CPU a prefill is compute-bound: prompts one at a time cost no more than a batch, and pad nothing. On an
    # accelerator the batch's own prefill keeps the device busy (only the cache is preallocated there).
    prefill_alone = device.type == "cpu" and getattr(model, "config", None) is not None  # not a stand-in generator
    shared = shared_prefix_length(encoded)  # the system prompt and the template's opening: computed once for all
    shared_prefix = (shared, prompt_cache(model, encoded[0][:shared])) if prefill_alone and shared > 1 else None
    for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], pad_id, side="left")
        sequences = [encoded[i] for i in batch]
        if prefill_alone:
            cache = prefilled_cache(model, sequences, max_new_tokens, shared_prefix)
        else:
            cache = preallocated_cache(model, max_new_tokens)
        width = input_ids.shape[1]
        processors, stopping = [], []
        if seeds is not None:
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([RowSeededGumbel([seeds[i] for i in batch])])
        if stop_at_first_line:
            from transformers import StoppingCriteriaList

            stopping = StoppingCriteriaList([FirstLineStop(tokenizer, width)])
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                cache=cache,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                logits_processor=processors or None,
                stopping_criteria=stopping or None,
            )
        for row, index in enumerate(batch):
            outputs[index] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Generator loading and sharding
# ---------------------------------------------------------------------------------------------------------------


def load_generator(model, tokenizer=None, device=None):
    """(model, tokenizer, name): loads a path or Hub id with AutoModelForCausalLM/AutoTokenizer, or takes objects."""
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or ""
    if isinstance(model, str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..model_loading import from_pretrained

        if tokenizer is None:
            tokenizer = from_pretrained(AutoTokenizer, model, "generator tokenizer")  # one-line errors
        dtype = torch.float32 if device is None or str(device) == "cpu" else "auto"
        model = from_pretrained(AutoModelForCausalLM, model, "generator", dtype=dtype)
    elif tokenizer is None:
        raise GNMInputError("generator: pass its tokenizer along with a model object (or give a path / Hub id)")
    elif isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer, name


def distributed_state():
    """accelerate's PartialState when the run was started by a launcher with more than one process, else None.

    On a machine without CUDA it is asked for explicitly (`cpu=True`): without that, accelerate quietly runs each
    launched process on its own, as a world of one.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


# ---------------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------------


def _generate_shard(
    rows: list[dict[str, Any]],
    model,
    tokenizer,
    levels: int,
    template: str,
    system_prompt: str,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool,
    seed: int,
    max_retries: int,
    pool: FactPool,
) -> list[tuple[list[str], list[bool]]]:
    """For each row: its K level texts and, per level, whether it fell back to the perturb backend."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts: list[list[str]] = [[] for _ in rows]
    fallbacks: list[list[bool]] = [[] for _ in rows]
    for level in range(1, levels + 1):
        previous = [(texts[i] or [row["completion"]])[-1] for i, row in enumerate(rows)]  # level 0 is the truth
        prompts = [
            render_prompt(tokenizer, template, system_prompt, row["prompt"], previous[i], level, levels)
            for i, row in enumerate(rows)
        ]
        current: list[str] = [""] * len(rows)
        pending = list(range(len(rows)))
        for attempt in range(max_retries + 1):
            sampled = do_sample or attempt > 0
            seeds = [row_seed(seed, "llm", rows[i]["id"], level, attempt) for i in pending] if sampled else None
            inputs = [prompts[i] for i in pending]
            outputs = generate_texts(model, tokenizer, inputs, batch_size, max_new_tokens, seeds, chat,
                                     stop_at_first_line=True)  # fmt: skip
            for i, output in zip(pending, outputs):
                current[i] = first_line(output)
            pending = [i for i in pending if is_degenerate(current[i], rows[i]["completion"], texts[i])]
            if not pending:
                break
        failed = set(pending)
        for i, row in enumerate(rows):
            fell_back = i in failed
            if fell_back:
                rng = random.Random(row_seed(seed, row["id"], row["completion"]))
                current[i] = perturb_levels(row["completion"], levels, pool, rng)[level - 1]
            texts[i].append(current[i])
            fallbacks[i].append(fell_back)
    return list(zip(texts, fallbacks))


def generate_llm_negatives(
    forget_rows: Iterable[Mapping[str, Any]],
    model,
    tokenizer=None,
    levels: int = 3,
    prompt_template: str = DEFAULT_TEMPLATE,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    seed: int = 0,
    max_retries: int = 2,
    retain_rows: Iterable[Mapping[str, Any]] | None = None,
    pool: FactPool | None = None,
) -> list[dict[str, Any]]:
    """Negative rows (`levels` per forget row, backend "llm") written by a generator model.

    Args:
        forget_rows: normalised forget rows (list of dicts or `datasets.Dataset`).
        model: a causal LM object, or a local path / Hub id loaded with `AutoModelForCausalLM`.
        tokenizer: its tokenizer (object or path); loaded from `model` when that is a path.
        levels: K. prompt_template / system_prompt: see the module docstring.
        batch_size, max_new_tokens: generation batch and length.
        do_sample: seeded per-row sampling instead of greedy decoding for the first attempt.
        seed: base seed of sampling and of the perturb fallback.
        max_retries: sampled retries of a degenerate output before falling back.
        retain_rows: feed the perturb fallback's pool of replacement values.
        pool: that pool built beforehand with `build_pool` (then `retain_rows` is not read).
    Returns: rows ordered by forget row, then level; identical on every process.
    """
    require_levels(levels)
    check_template(prompt_template)
    if batch_size < 1 or max_new_tokens < 1 or max_retries < 0:
        raise GNMInputError("batch_size and max_new_tokens must be >= 1 and max_retries >= 0")
    rows = as_rows(forget_rows, "forget")
    state = distributed_state()
    device = state.device if state is not None else None
    model, tokenizer, generator_name = load_generator(model, tokenizer, device)
    if pool is None:
        retain = as_rows(retain_rows, "retain") if retain_rows is not None else []
        pool = build_pool(row["completion"] for row in retain)
    from ..evaluation.evaluator import shard_bounds

    start, end = shard_bounds(len(rows), state.num_processes, state.process_index) if state else (0, len(rows))
    shard = _generate_shard(
        rows[start:end], model, tokenizer, levels, prompt_template, system_prompt, batch_size, max_new_tokens,
        do_sample, seed, max_retries, pool,
    )  # fmt: skip
    results = list(enumerate(shard, start=start))
    if state is not None:
        from accelerate.utils import gather_object

        results = sorted(gather_object(results), key=lambda item: item[0])
    negatives = []
    for index, (texts, fallbacks) in results:
        for level, (text, fell_back) in enumerate(zip(texts, fallbacks), start=1):
            negatives.append(
                negative_row(rows[index], level, text, "llm", seed, generator_name, prompt_template, fell_back)
            )
    return negatives
