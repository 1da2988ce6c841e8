"""The model-free backend: gradual negatives made by swapping a completion's facts for wrong ones of the same type.

How a completion becomes K levels of negatives:

1. Its replaceable *items* are found with regexes, in this priority (a span taken by one type is not re-read by the
   next): e-mails, dates, SSN-like numbers (`123-45-6789`, 9 bare digits), phone numbers (`555-123-4567`,
   `(555) 123-4567`, 10 bare digits, `555-0192`), years, other numbers, proper names (runs of capitalised words,
   leading stopwords dropped; a single capitalised word at the start of a sentence is not a name), then every other
   run of letters and digits that ROUGE would see as a token: a content word, a stopword (kept unless needed, see
   4), or a leftover run with digits such as `1990s` (a number). The same text repeated is one item, replaced
   everywhere.
2. The items are ordered: typed facts first, then content words, each group in a seeded random order.
   Level k replaces the first ceil(k / K * n) of the n items, so the replaced set only grows with k and
   level K replaces them all.
3. Each item's replacement has the same type and, for digits, the same shape (`555-0192` -> `731-4468`). It is drawn
   from a pool built from the retain set's completions, else synthesised (random digits, a made-up e-mail, an
   invented name or word). A replacement never shares a ROUGE token (lower-cased, Porter-stemmed, as the
   SemEval metric tokenises) with the true completion, so no true fact survives at level K and ROUGE-L against the
   truth can only fall as the level rises.
4. Fewer items than levels: stopwords become items too (after everything else). If there are still fewer items
   than levels, a level whose share equals the previous level's re-draws every replaced value (a second, third...
   wrong value), so the K levels are always distinct strings. A completion with no word or digit at all gets a
   made-up word appended.

Everything depends only on (seed, row id, true completion) and the retain pool, never on the order or batching of
rows, so the LLM backend can use it as a per-row fallback.
"""

import functools
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .schema import as_rows, negative_row, require_levels, row_seed

STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each either few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself neither no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up upon very via was
    we were what when where which while who whom whose why will with within without would yet you your yours
    yourself yourselves
    """.split()
)
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
    r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_NOT_BEFORE = r"(?<![\w.,/-])"  # a fact starts at a token boundary
_NOT_AFTER = r"(?![\w/-]|[.,]\d)"  # and ends at one
_LETTERS = r"[^\W\d_]"  # a unicode letter
_WORD = r"[^\W_]+(?:['’][^\W_]+)*"  # letters and digits, as ROUGE splits text (plus apostrophes)

# Typed facts, in priority order: a span taken by one type is not read again by a later one.
FACT_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("email", r"[A-Za-z0-9._%+\\-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"),
        (
            "date",
            rf"{_NOT_BEFORE}(?:{_MONTH}\.? {_DAY},? \d{{4}}|{_DAY} {_MONTH},? \d{{4}}|{_MONTH} \d{{4}}"
            rf"|\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}){_NOT_AFTER}",
        ),
        ("ssn", rf"{_NOT_BEFORE}(?:\d{{3}}-\d{{2}}-\d{{4}}|\d{{9}}){_NOT_AFTER}"),
        (
            "phone",
            rf"{_NOT_BEFORE}(?:\+?1[ .-])?(?:\(\d{{3}}\) ?\d{{3}}[ .-]\d{{4}}|\d{{3}}[ .-]\d{{3}}[ .-]\d{{4}}"
            rf"|\d{{10}}|\d{{3}}-\d{{4}}){_NOT_AFTER}",
        ),
        ("year", rf"{_NOT_BEFORE}(?:1[5-9]|20)\d{{2}}{_NOT_AFTER}"),
        ("number", rf"{_NOT_BEFORE}\d+(?:[.,]\d+)*(?:st|nd|rd|th)?{_NOT_AFTER}"),
    )
)
FACT_TYPES = tuple(kind for kind, _ in FACT_PATTERNS) + ("name",)
DIGIT_TYPES = ("ssn", "phone", "year", "number")
_CAPITALISED_WORD = rf"[A-Z]{_LETTERS}*(?:[-'’]{_LETTERS}+)*"
_CAPITALISED_RUN = re.compile(rf"(?<![\w'’-]){_CAPITALISED_WORD}(?: +{_CAPITALISED_WORD})*")
_ANY_WORD = re.compile(rf"(?<![^\W_]){_WORD}")

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "ni", "pa", "quo", "zem", "bri", "fal", "gu", "har")
_EMAIL_DOMAINS = ("example.com", "example.net", "mailbox.test", "post.invalid", "inbox.example")
MAX_DRAWS = 64


@dataclass(frozen=True)
class Item:
    """One replaceable thing in a completion: its type, its text and every span where it occurs."""

    kind: str
    text: str
    spans: tuple[tuple[int, int], ...]


@dataclass
class FactPool:
    """Values of each type seen in the retain set, grouped by shape, to draw realistic wrong values from."""

    by_kind: dict[str, tuple[str, ...]] = field(default_factory=dict)
    by_shape: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def candidates(self, kind: str, shape: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(values of the same type and shape, values of the same type)."""
        return self.by_shape.get((kind, shape), ()), self.by_kind.get(kind, ())


# ---------------------------------------------------------------------------------------------------------------
# Finding items
# ---------------------------------------------------------------------------------------------------------------


def _at_sentence_start(text: str, position: int) -> bool:
    """True when only spaces, quotes or brackets separate `position` from the text's start or a sentence end."""
    index = position - 1
    while index >= 0 and text[index] in " \t\"'“‘([":
        index -= 1
    return index < 0 or text[index] in ".!?\n"


def _free(taken: list[tuple[int, int]], start: int, end: int) -> bool:
    return all(end <= s or start >= e for s, e in taken)


def _name_spans(text: str, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of proper names: capitalised runs without leading stopwords or a possessive 's."""
    spans = []
    for match in _CAPITALISED_RUN.finditer(text):
        words = list(re.finditer(r"\S+", match.group()))
        while words and words[0].group().lower() in STOPWORDS:
            words.pop(0)
        if not words:
            continue
        start, end = match.start() + words[0].start(), match.end()
        if text[start:end].endswith(("'s", "’s")):
            end -= 2
        if len(words) == 1 and _at_sentence_start(text, start):
            continue  # a capitalised word opening a sentence: read it as a plain word
        if start < end and _free(taken, start, end):
            spans.append((start, end))
    return spans


def _normal_key(text: str) -> str:
    return text.replace("\\", "").lower()


def _word_kind(word: str) -> str:
    """'number' for a leftover run with digits (`1990s`, `A1B2`), 'stopword' or 'word'."""
    if any(char.isdigit() for char in word):
        return "number"
    return "stopword" if word.lower() in STOPWORDS else "word"


def find_items(text: str, include_stopwords: bool = False) -> list[Item]:
    """The replaceable items of `text` in order of first occurrence: typed facts, names, content words (and
    stopwords when asked)."""
    taken: list[tuple[int, int]] = []
    found: list[tuple[str, int, int]] = []
    for kind, pattern in FACT_PATTERNS:
        for match in pattern.finditer(text):
            if _free(taken, *match.span()):
                taken.append(match.span())
                found.append((kind, *match.span()))
    for span in _name_spans(text, taken):
        taken.append(span)
        found.append(("name", *span))
    for match in _ANY_WORD.finditer(text):  # everything else ROUGE would see as a token
        if not _free(taken, *match.span()):
            continue
        kind = _word_kind(match.group())
        if kind != "stopword" or include_stopwords:
            found.append((kind, *match.span()))
    grouped: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kind, start, end in sorted(found, key=lambda f: f[1]):
        grouped.setdefault((kind, _normal_key(text[start:end])), []).append((start, end))
    return [Item(kind, text[spans[0][0] : spans[0][1]], tuple(spans)) for (kind, _), spans in grouped.items()]


# ---------------------------------------------------------------------------------------------------------------
# Shapes, tokens, pools
# ---------------------------------------------------------------------------------------------------------------


def shape_of(kind: str, text: str) -> str:
    """What a replacement should look like: digits as 9 and letters as a (dates, numbers, phones), word counts for
    names."""
    if kind == "name":
        return str(len(text.split()))
    if kind in DIGIT_TYPES or kind == "date":
        return re.sub(r"[A-Za-z]+", "a", re.sub(r"\d", "9", text))
    return ""


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@functools.lru_cache(maxsize=200_000)
def rouge_tokens(text: str) -> frozenset[str]:
    """The set of tokens ROUGE-L sees in `text` (lower-cased, alphanumeric, Porter-stemmed)."""
    return frozenset(_rouge_tokenizer().tokenize(text))


def build_pool(completions: Iterable[str]) -> FactPool:
    """A pool of typed values (e-mails, dates, numbers, names, words...) found in `completions` (the retain set)."""
    by_kind: dict[str, set[str]] = {}
    for text in completions:
        for item in find_items(text):
            value = item.text.replace("\\", "")
            by_kind.setdefault(item.kind, set()).add(value.lower() if item.kind == "word" else value)
    pool = FactPool()
    by_shape: dict[tuple[str, str], list[str]] = {}
    for kind, values in by_kind.items():
        ordered = tuple(sorted(values))
        pool.by_kind[kind] = ordered
        for value in ordered:
            by_shape.setdefault((kind, shape_of(kind, value)), []).append(value)
    pool.by_shape = {key: tuple(values) for key, values in by_shape.items()}
    return pool


# ---------------------------------------------------------------------------------------------------------------
# Synthesised values (when the pool has nothing usable)
# ---------------------------------------------------------------------------------------------------------------


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _random_digits(shape_text: str, rng: random.Random) -> str:
    """Every digit replaced by a random one; a run that did not start with 0 does not start with 0."""

    def redraw(match: re.Match) -> str:
        run = match.group()
        first = str(rng.randint(1, 9)) if run[0] != "0" else "0"
        return first + "".join(str(rng.randint(0, 9)) for _ in run[1:])

    return re.sub(r"\d+", redraw, shape_text)


def _other_month(name: str, rng: random.Random) -> str:
    """A random month, abbreviated to three letters when `name` is an abbreviation."""
    month = rng.choice(MONTHS)
    return month if name in MONTHS else month[:3]


def _random_date(text: str, rng: random.Random) -> str:
    """The same date format with another month name, year and day/month numbers (4..12: valid as either, and
    always 'th')."""
    text = re.sub(_MONTH, lambda match: _other_month(match.group(), rng), text)
    text = re.sub(r"\d{4}", lambda m: str(rng.randint(1900, 2030)), text)
    return re.sub(r"(?<!\d)\d{1,2}(?!\d)", lambda m: str(rng.randint(4, 12)).zfill(len(m.group())), text)


def synthesise(kind: str, original: str, rng: random.Random) -> str:
    """A made-up value of `kind` shaped like `original`."""
    if kind == "email":
        return f"{_made_up_word(rng)}{rng.choice('._')}{_made_up_word(rng)}@{rng.choice(_EMAIL_DOMAINS)}"
    if kind == "date":
        return _random_date(original, rng)
    if kind == "year":
        return str(rng.randint(1900, 2030))
    if kind in DIGIT_TYPES:
        return _random_digits(original, rng)
    if kind == "name":
        return " ".join(_made_up_word(rng).capitalize() for _ in original.split())
    if kind == "stopword":
        return rng.choice(sorted(STOPWORDS))
    return _made_up_word(rng)


def _match_case(value: str, item: Item) -> str:
    """A replacement word written like the word it replaces (capitalised, or all capitals)."""
    if item.kind not in ("word", "stopword"):
        return value
    if len(item.text) > 1 and item.text.isupper():
        return value.upper()
    if item.text[:1].isupper():
        return value[:1].upper() + value[1:]
    return value


def draw_replacement(item: Item, pool: FactPool, forbidden: frozenset[str], used: set[str], rng: random.Random) -> str:
    """A value of the item's type that shares no ROUGE token with the truth (`forbidden`) and was not used yet:
    from the pool (same shape first), else synthesised."""

    def acceptable(value: str) -> bool:
        return bool(value) and value.lower() not in used and not (rouge_tokens(value) & forbidden)

    same_shape, same_kind = pool.candidates(item.kind, shape_of(item.kind, item.text))
    sources = [same_shape] if item.kind in DIGIT_TYPES or item.kind == "date" else [same_shape, same_kind]
    for values in sources:
        for _ in range(min(MAX_DRAWS, 2 * len(values))):
            value = _match_case(rng.choice(values), item)
            if acceptable(value):
                return value
    for _ in range(MAX_DRAWS):
        value = _match_case(synthesise(item.kind, item.text, rng), item)
        if acceptable(value):
            return value
    return value if value.lower() != item.text.lower() else value + "x"  # practically unreachable


# ---------------------------------------------------------------------------------------------------------------
# Levels
# ---------------------------------------------------------------------------------------------------------------


def level_schedule(n_items: int, levels: int) -> list[tuple[int, int]]:
    """(items replaced, value variant) for levels 1..K: ceil(k/K * n) items; the variant goes up when that count
    repeats the previous level's (fewer items than levels), so every level differs."""
    schedule: list[tuple[int, int]] = []
    for level in range(1, levels + 1):
        count = -(-level * n_items // levels)
        variant = schedule[-1][1] + 1 if schedule and schedule[-1][0] == count else 0
        schedule.append((count, variant))
    return schedule


def _render(text: str, items: list[Item], values: list[list[str]], count: int, variant: int) -> str:
    edits = sorted((span, values[i][variant]) for i in range(count) for span in items[i].spans)
    pieces, cursor = [], 0
    for (start, end), value in edits:
        pieces.append(text[cursor:start])
        pieces.append(value)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def _ordered_items(text: str, levels: int, rng: random.Random) -> list[Item]:
    """Typed facts, then content words (each shuffled), then stopwords if there are fewer items than levels."""
    items = find_items(text, include_stopwords=True)
    facts = [item for item in items if item.kind in FACT_TYPES]
    words = [item for item in items if item.kind == "word"]
    stopwords = [item for item in items if item.kind == "stopword"]
    for group in (facts, words, stopwords):
        rng.shuffle(group)
    ordered = facts + words
    if len(ordered) < levels:
        ordered += stopwords
    if not ordered:  # nothing to replace: append a made-up word
        ordered = [Item("word", "", ((len(text), len(text)),))]
    return ordered


def perturb_levels(completion: str, levels: int, pool: FactPool, rng: random.Random) -> list[str]:
    """The K gradual negatives of one completion (level 1 first)."""
    items = _ordered_items(completion, levels, rng)
    schedule = level_schedule(len(items), levels)
    variants = max(variant for _, variant in schedule) + 1
    forbidden = rouge_tokens(completion)
    used = {item.text.lower() for item in items}
    values = []
    for item in items:
        drawn = []
        for _ in range(variants):
            value = draw_replacement(item, pool, forbidden, used, rng)
            used.add(value.lower())
            drawn.append(" " + value if item.text == "" else value)
        values.append(drawn)
    return [_render(completion, items, values, count, variant) for count, variant in schedule]


def _completions(rows: Iterable[Mapping[str, Any]] | None) -> list[str]:
    return [row["completion"] for row in rows or []]


def perturb_negatives(
    forget_rows: Iterable[Mapping[str, Any]],
    retain_rows: Iterable[Mapping[str, Any]] | None = None,
    levels: int = 3,
    seed: int = 0,
    pool: FactPool | None = None,
) -> list[dict[str, Any]]:
    """Negative rows (`levels` per forget row, backend "perturb") for normalised forget rows.

    Args:
        forget_rows: normalised rows (a list of dicts or a `datasets.Dataset` with `id` and `completion`).
        retain_rows: normalised retain rows whose completions feed the pool of replacement values (optional).
        levels: K, the number of levels per row.
        seed: base seed; each row's draws depend only on (seed, id, true completion).
        pool: a pool built beforehand with `build_pool` (then `retain_rows` is not read).
    """
    require_levels(levels)
    forget_rows = as_rows(forget_rows, "forget")
    if pool is None:
        pool = build_pool(_completions(as_rows(retain_rows, "retain") if retain_rows is not None else None))
    negatives = []
    for row in forget_rows:
        rng = random.Random(row_seed(seed, row["id"], row["completion"]))
        for level, text in enumerate(perturb_levels(row["completion"], levels, pool, rng), start=1):
            negatives.append(negative_row(row, level, text, backend="perturb", seed=seed))
    return negatives
