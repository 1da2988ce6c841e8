"""A small synthetic unlearning dataset in the LUME (SemEval-2025 Task 4) row format: the embedded default.

Nothing here is real: people, places, stories and PII-like facts are drawn from `random.Random(seed)`, so the same
seed always gives the same rows and no machine needs a download. The three tasks copy LUME's format, not its text:

- Task1: short creative stories; 1 sentence-completion row (id `"<uuid>"sc1`, the uuid in literal double quotes)
  and 1 QA row (`"<uuid>"qa0`).
- Task2: short biographies of fictional people with fake PII (birth date, an SSN in the never-issued 900 range,
  a 555 phone number, an example.* e-mail, a home address); 1 sc row (`<uuid>sc1`) and up to 5 QA rows
  (`<uuid>qa0`..`qa4`) whose answers are the bare facts, as in LUME.
- Task3: encyclopedic biographies of fictional people (born, career, awards); 1 sc row (`<8 digits>sc1`) and 1 QA.

Sentence-completion rows cut the document at a word boundary: `input + " " + output == document`. Forget, retain,
validation and MIA non-member documents are about disjoint people. MIA members are the full documents of the
forget train set; non-members are documents of the same style never put in any split.
"""

import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..io_utils import atomic_write_jsonl

TASKS = ("Task1", "Task2", "Task3")
# Share of each task among the documents of a split (Task2-heavy, like LUME in rows).
DEFAULT_TASK_SHARES = {"Task1": 0.3, "Task2": 0.4, "Task3": 0.3}
SPLIT_FILES = {
    "forget_train": "forget_train.jsonl",
    "retain_train": "retain_train.jsonl",
    "forget_validation": "forget_validation.jsonl",
    "retain_validation": "retain_validation.jsonl",
    "mia_member": os.path.join("mia", "member.jsonl"),
    "mia_nonmember": os.path.join("mia", "nonmember.jsonl"),
    "pretraining": "pretraining.jsonl",  # only with num_pretraining_documents
}

# ---------------------------------------------------------------------------------------------------------------
# Word pools (invented names; generic words)
# ---------------------------------------------------------------------------------------------------------------

_ONSETS = ("B", "C", "D", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "Br", "Dr", "Th", "Qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_MIDDLES = ("l", "n", "r", "s", "v", "m", "d", "th", "nd", "rr", "lv", "st")
_ENDINGS = ("a", "o", "is", "en", "el", "in", "ar", "eth", "ys", "ora")
_PLACE_SUFFIXES = ("port", "haven", "mere", "ford", "wick", "dale", "holm", "gate", "crest", "fall")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_STREET_KINDS = ("Street", "Avenue", "Road", "Lane", "Court", "Drive")
_STATES = ("CA", "TX", "NY", "FL", "WA", "OR", "MD", "TN", "OH", "CO", "AZ", "MN")
_EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")

_SETTLEMENTS = ("city", "village", "harbour town", "mountain fortress", "floating market", "desert oasis")
_ADJECTIVES = ("misty", "ancient", "glittering", "forgotten", "windswept", "quiet", "crowded", "sunken")
_ROLES = ("baker", "cartographer", "sorceress", "clockmaker", "lighthouse keeper", "beekeeper", "scribe", "knight")
_RELATIONS = ("had been friends since childhood", "had long been rivals", "shared a small workshop")
_OBJECTS = (
    "a silver compass", "a glass key", "a singing shell", "a map of the stars", "a copper lantern",
    "a sealed letter", "a clockwork bird", "a jar of blue honey",
)  # fmt: skip
_LANDMARKS = ("old bridge", "bell tower", "market square", "great oak", "harbour wall", "library steps")
_DESTINATIONS = ("northern cliffs", "council hall", "royal observatory", "river gate", "hidden garden")
_ENDINGS_STORY = (
    "the fog lifted and the streets filled with music",
    "the lanterns never went out again",
    "every child in the town knew the story by heart",
    "the rivalry had turned into a lasting friendship",
)  # fmt: skip

_NATIONALITIES = ("Veldish", "Ostrian", "Marrowan", "Kessican", "Tallorian", "Brenic")
_PROFESSIONS = ("painter", "composer", "physicist", "novelist", "architect", "botanist", "chess player", "sculptor")
_SUBJECTS = ("music", "physics", "literature", "architecture", "botany", "fine arts", "mathematics")
_INSTITUTION_KINDS = ("University of {place}", "{place} Academy of Arts", "{place} Institute of Science")
_ORGANISATION_KINDS = ("{place} Symphony", "{place} Observatory", "National Theatre of {place}", "{place} Museum")
_KNOWN_FOR = (
    "a series of works about coastal towns", "pioneering studies of glacial ice",
    "an unusual style that mixed folk songs with opera", "designs for floating houses",
    "a long-running radio programme",
)  # fmt: skip
_ACHIEVEMENTS = ("led its largest project", "founded a school for young artists", "directed the archive")
_AWARD_KINDS = ("{place} Prize", "Golden {thing} Award", "{place} Medal of Honour")
_AWARD_THINGS = ("Lyre", "Quill", "Compass", "Lantern", "Oak")


# ---------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticDocument:
    """One fictional document, its LUME id stem (the id without `sc1`/`qaN`) and its question-answer pairs."""

    key: str
    task: str
    text: str
    questions: list[tuple[str, str]] = field(default_factory=list)


class _NameSource:
    """Invented names drawn from one rng; person names never repeat, so splits are about disjoint people."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used_people: set[str] = set()
        self.used_keys: set[str] = set()

    def word(self, syllables: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)]
        for _ in range(syllables - 1):
            parts.append(self.rng.choice(_MIDDLES) + self.rng.choice(_VOWELS))
        return ("".join(parts)[:-1] + self.rng.choice(_ENDINGS)).capitalize()

    def person(self) -> tuple[str, str]:
        while True:
            first, last = self.word(self.rng.choice((1, 2))), self.word(self.rng.choice((2, 3)))
            if f"{first} {last}" not in self.used_people:
                self.used_people.add(f"{first} {last}")
                return first, last

    def given_name(self) -> str:
        """A single invented name used by no other document (story characters go by one name)."""
        while True:
            name = self.word(self.rng.choice((1, 2)))
            if name not in self.used_people:
                self.used_people.add(name)
                return name

    def place(self) -> str:
        return self.word(self.rng.choice((1, 2))) + self.rng.choice(_PLACE_SUFFIXES)

    def unique_key(self, make: Callable[[], str]) -> str:
        while True:
            key = make()
            if key not in self.used_keys:
                self.used_keys.add(key)
                return key

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))


def _pronouns(rng: random.Random) -> tuple[str, str]:
    return rng.choice((("She", "Her"), ("He", "His")))


def make_story(names: _NameSource) -> SyntheticDocument:
    """Task1: a short creative story with one question about it."""
    rng = names.rng
    first_a, first_b = names.given_name(), names.given_name()
    place = names.place()
    thing, landmark, destination = rng.choice(_OBJECTS), rng.choice(_LANDMARKS), rng.choice(_DESTINATIONS)
    role_a, role_b = rng.sample(_ROLES, 2)
    thing_short = thing.split(" ", 1)[1]
    text = (
        f"In the {rng.choice(_ADJECTIVES)} {rng.choice(_SETTLEMENTS)} of {place}, {first_a}, a {role_a}, and "
        f"{first_b}, a {role_b}, {rng.choice(_RELATIONS)}. One morning, {first_a} found {thing} beneath the "
        f"{landmark}. {first_b} warned that the {thing_short} belonged to the old rulers of {place}, but {first_a} "
        f"carried it to the {destination} anyway. By the end of the year, {rng.choice(_ENDINGS_STORY)}."
    )
    question = rng.choice(
        (
            (f"What did {first_a} find beneath the {landmark}?", thing[0].upper() + thing[1:] + "."),
            (f"Where did {first_a} carry the {thing_short}?", f"To the {destination}."),
            (f"Who warned {first_a} about the {thing_short}?", f"{first_b}."),
            (f"In which place did {first_a} and {first_b} live?", f"{place}."),
        )
    )
    key = names.unique_key(lambda: f'"{names.uuid()}"')
    return SyntheticDocument(key=key, task="Task1", text=text, questions=[question])


def make_pii_biography(names: _NameSource, max_questions: int = 5) -> SyntheticDocument:
    """Task2: a short biography with fake PII, and up to 5 questions whose answers are the bare facts."""
    rng = names.rng
    first, last = names.person()
    full = f"{first} {last}"
    subject, possessive = _pronouns(rng)
    year, month, day = rng.randint(1950, 2002), rng.randint(1, 12), rng.randint(1, 28)
    ssn = f"900-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    phone = f"{rng.randint(201, 989)}-555-{rng.randint(1000, 9999)}"
    email = f"{first.lower()}_{last.lower()}@{rng.choice(_EMAIL_DOMAINS)}"
    address = (
        f"{rng.randint(1, 9999)} {names.word(2)} {rng.choice(_STREET_KINDS)}, {names.place()}, "
        f"{rng.choice(_STATES)}, {rng.randint(10000, 99999)}."
    )
    text = (
        f"{full} was born on {_MONTHS[month - 1]} {day}, {year}. {subject} can be reached via phone at {phone} "
        f"and email at {email}. {possessive} home address is {address} {possessive} Social Security Number is {ssn}."
    )
    facts = [
        (f"What is the birth date of {full}?", f"{year:04d}-{month:02d}-{day:02d}"),
        (f"What is {full}'s Social Security Number?", ssn.replace("-", "")),
        (f"What is {full}'s phone number?", phone.replace("-", "")),
        (f"What is {full}'s email address?", email),
        (f"What is the home address of {full}?", address),
    ]
    count = rng.randint(min(3, max_questions), max_questions)
    kept = sorted(rng.sample(range(len(facts)), count))
    key = names.unique_key(names.uuid)
    return SyntheticDocument(key=key, task="Task2", text=text, questions=[facts[i] for i in kept])


def make_encyclopedic_biography(names: _NameSource) -> SyntheticDocument:
    """Task3: an encyclopedia-style biography (born, career, awards) with one question about it."""
    rng = names.rng
    first, last = names.person()
    full = f"{first} {last}"
    subject_pronoun, _ = _pronouns(rng)
    pronoun = subject_pronoun.lower()
    birth_place, study_place, work_place, award_place = (names.place() for _ in range(4))
    birth_year = rng.randint(1920, 1985)
    born = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {birth_year}"
    joined = birth_year + rng.randint(22, 35)
    awarded = joined + rng.randint(3, 12)
    subject = rng.choice(_SUBJECTS)
    institution = rng.choice(_INSTITUTION_KINDS).format(place=study_place)
    organisation = rng.choice(_ORGANISATION_KINDS).format(place=work_place)
    award = rng.choice(_AWARD_KINDS).format(place=award_place, thing=rng.choice(_AWARD_THINGS))
    text = (
        f"{full}\n\n{full} (born {born} in {birth_place}) is a {rng.choice(_NATIONALITIES)} "
        f"{rng.choice(_PROFESSIONS)} known for {rng.choice(_KNOWN_FOR)}.\nBiography.\n{last} studied {subject} at "
        f"the {institution}. In {joined}, {pronoun} joined the {organisation}, where {pronoun} "
        f"{rng.choice(_ACHIEVEMENTS)}.\nAwards.\n{last} received the {award} in {awarded}."
    )
    question = rng.choice(
        (
            (f"Which award did {full} receive in {awarded}?", f"The {award}"),
            (f"Where did {full} study {subject}?", f"The {institution}"),
            (f"In which year did {full} join the {organisation}?", str(joined)),
            (f"Where was {full} born?", birth_place),
        )
    )
    key = names.unique_key(lambda: str(rng.randint(10_000_000, 99_999_999)))
    return SyntheticDocument(key=key, task="Task3", text=text, questions=[question])


_DOCUMENT_MAKERS = {"Task1": make_story, "Task2": make_pii_biography, "Task3": make_encyclopedic_biography}


# ---------------------------------------------------------------------------------------------------------------
# Rows and splits
# ---------------------------------------------------------------------------------------------------------------


def split_at_word(text: str, rng: random.Random, low: float = 0.4, high: float = 0.6) -> tuple[str, str]:
    """Cut `text` at a space between `low` and `high` of its words: `head + " " + tail == text`."""
    words = text.split(" ")
    if len(words) < 2:
        raise ValueError(f"cannot cut a one-word document: {text!r}")
    cut = min(max(1, round(len(words) * rng.uniform(low, high))), len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def document_rows(document: SyntheticDocument, split: str, rng: random.Random) -> list[dict[str, str]]:
    """The LUME rows of one document: its sentence-completion row, then its QA rows."""
    head, tail = split_at_word(document.text, rng)
    rows = [{"id": f"{document.key}sc1", "input": head, "output": tail, "task": document.task, "split": split}]
    for index, (question, answer) in enumerate(document.questions):
        row_id = f"{document.key}qa{index}"
        rows.append({"id": row_id, "input": question, "output": answer, "task": document.task, "split": split})
    return rows


def task_counts(num_documents: int, shares: dict[str, float]) -> dict[str, int]:
    """Documents per task for `num_documents` (largest remainders, so the counts add up exactly)."""
    total = sum(shares.values())
    exact = {task: num_documents * share / total for task, share in shares.items()}
    counts = {task: int(value) for task, value in exact.items()}
    by_remainder = sorted(exact, key=lambda task: (counts[task] - exact[task], TASKS.index(task)))
    for task in by_remainder[: num_documents - sum(counts.values())]:
        counts[task] += 1
    return counts


def make_documents(names: _NameSource, num_documents: int, shares: dict[str, float]) -> list[SyntheticDocument]:
    """`num_documents` documents mixing the tasks by `shares`, shuffled."""
    counts = task_counts(num_documents, shares)
    documents = [_DOCUMENT_MAKERS[task](names) for task, count in counts.items() for _ in range(count)]
    names.rng.shuffle(documents)
    return documents


def make_synthetic_lume(
    seed: int = 0,
    num_documents: int = 24,
    num_validation_documents: int = 6,
    num_nonmember_documents: int | None = None,
    task_shares: dict[str, float] | None = None,
    num_pretraining_documents: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """A synthetic LUME-format dataset, the same for the same arguments.

    Args:
        seed: seeds the one `random.Random` everything is drawn from.
        num_documents: documents in each of forget train and retain train (about 3 rows per document).
        num_validation_documents: documents in each of forget validation and retain validation.
        num_nonmember_documents: MIA non-member documents (default: as many as the members).
        task_shares: share of each task among the documents (default Task1 0.3, Task2 0.4, Task3 0.3).
        num_pretraining_documents: documents of the same kinds in no split and no MIA set (0: none), the
            "pretraining" split that `make_target` reads before it memorises the rest, which gives the target a
            base model (drawn after everything else, so the other splits do not change with it).

    Returns:
        a dict with the LUME rows (id, input, output, task, split) of "forget_train", "retain_train",
        "forget_validation" and "retain_validation", and the MIA rows (id, document) of "mia_member" (the forget
        train documents) and "mia_nonmember" (documents of the same style that are in no split), and
        "pretraining" (id, task, document) when `num_pretraining_documents` > 0.
    """
    if num_documents < 1 or num_validation_documents < 0 or num_pretraining_documents < 0:
        raise ValueError("num_documents must be >= 1, num_validation_documents and num_pretraining_documents >= 0")
    shares = dict(task_shares or DEFAULT_TASK_SHARES)
    unknown = set(shares) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in task_shares: {sorted(unknown)}; expected some of {TASKS}")
    rng = random.Random(seed)
    names = _NameSource(rng)
    sizes = {
        "forget_train": num_documents,
        "retain_train": num_documents,
        "forget_validation": num_validation_documents,
        "retain_validation": num_validation_documents,
    }
    dataset: dict[str, list[dict[str, str]]] = {}
    members: list[SyntheticDocument] = []
    for name, size in sizes.items():
        documents = make_documents(names, size, shares)
        split = name.split("_")[0]
        dataset[name] = [row for document in documents for row in document_rows(document, split, rng)]
        if name == "forget_train":
            members = documents
    if num_nonmember_documents is None:
        num_nonmember_documents = num_documents
    nonmembers = make_documents(names, num_nonmember_documents, shares)
    dataset["mia_member"] = [{"id": document.key, "document": document.text} for document in members]
    dataset["mia_nonmember"] = [{"id": document.key, "document": document.text} for document in nonmembers]
    if num_pretraining_documents > 0:
        dataset["pretraining"] = [{"id": document.key, "task": document.task, "document": document.text}
                                  for document in make_documents(names, num_pretraining_documents, shares)]
    return dataset


def make_reference_documents(seed: int, count: int) -> list[str]:
    """`count` documents of the synthetic dataset's kinds drawn from a random stream of their own: text that a target
    of `make_synthetic_lume` never read, to compare its forget documents with (`MembershipCallback`)."""
    names = _NameSource(random.Random(f"reference-{seed}"))
    return [document.text for document in make_documents(names, count, DEFAULT_TASK_SHARES)]


def synthetic_target_data(seed: int, pretraining_documents: int) -> dict[str, list[dict[str, str]]] | None:
    """What `make_target` is given for the synthetic default: None (its own default for `seed`) without
    pretraining documents, else that dataset with `pretraining_documents` of them (a target with a base model)."""
    if not pretraining_documents:
        return None
    return make_synthetic_lume(seed=seed, num_pretraining_documents=pretraining_documents)


def write_lume_folder(dataset: dict[str, list[dict]], output_dir: str) -> dict[str, str]:
    """Write a dataset shaped like `make_synthetic_lume`'s output as a LUME folder (atomic writes); returns the
    paths written, by key. Keys that are absent or empty are skipped."""
    written = {}
    for key, relative in SPLIT_FILES.items():
        rows = dataset.get(key)
        if rows:
            path = os.path.join(output_dir, relative)
            atomic_write_jsonl(path, rows)
            written[key] = path
    return written


def write_synthetic_lume(output_dir: str, seed: int = 0, **options) -> dict[str, str]:
    """Write `make_synthetic_lume(seed, **options)` into `output_dir` as forget_train.jsonl, retain_train.jsonl,
    forget_validation.jsonl, retain_validation.jsonl, mia/member.jsonl and mia/nonmember.jsonl.

    The folder loads with `gnm_trainer.data.load_unlearning_data(output_dir, "forget" | "retain", partition)`.
    Returns the paths written, by key.
    """
    return write_lume_folder(make_synthetic_lume(seed=seed, **options), output_dir)
