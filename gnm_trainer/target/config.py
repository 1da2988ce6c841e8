"""What decides a target (`TargetConfig`), where it is cached and the names of its files."""

import os
from dataclasses import dataclass

from ..errors import GNMInputError

TARGET_INFO_FILE = "target_info.json"
DATA_SUBDIR = "data"
PRETRAINED_SUBDIR = "pretrained"  # the target before it memorised anything (when it pretrained)
# Bump when the training recipe changes, so that older cached targets are rebuilt.
# 2: the tokenizer is trained without the MIA non-members (version 1 read them: the non-members then tokenised at 3.97
# characters per token against ~3.45 for unseen documents of the same generator, so they were not unseen text).
TARGET_FORMAT_VERSION = 2
# make_target's default budget: this many rounds of `epochs` epochs.
DEFAULT_ROUNDS = 4
LUME_SPLITS = ("forget_train", "retain_train", "forget_validation", "retain_validation")
MIA_SPLITS = ("mia_member", "mia_nonmember")
# Documents the target reads before it memorises anything (general language ability, as OLMo had before the
# organisers fine-tuned it); rows shaped like MIA rows: id, document.
PRETRAINING_SPLIT = "pretraining"


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
    epochs: int = 30  # one round: a warm-up and cosine cycle from the peak rate down to 0
    max_epochs: int = 120  # the budget: rounds follow one another until memorised or this many epochs ran
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    pretraining_epochs: int = 3  # epochs over the `pretraining` documents, when the data has any
    # Pretraining blocks mixed into each memorisation epoch, per memorised example (replay), so that fine-tuning
    # does not wipe out the general ability pretraining gave (without it held-out text ends above uniform NLL).
    pretraining_replay: float = 1.0
    include_validation: bool = False
    max_documents_per_split: int | None = None
    tasks: tuple[str, ...] | None = None
    sc_rouge_threshold: float = 0.95
    qa_exact_match_threshold: float = 0.9

    def __post_init__(self):
        for name in (
            "hidden_size", "num_layers", "num_heads", "vocab_size", "epochs", "max_epochs", "batch_size", "max_length"
        ):
            if getattr(self, name) < 1:
                raise GNMInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.pretraining_epochs < 0:
            raise GNMInputError(f"pretraining_epochs must be 0 or more, got {self.pretraining_epochs}")
        if not self.pretraining_replay >= 0 or self.pretraining_replay == float("inf"):
            raise GNMInputError(f"pretraining_replay must be a finite number >= 0, got {self.pretraining_replay}")
        if self.hidden_size % self.num_heads:
            raise GNMInputError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):  # a NaN fails `> 0`
            raise GNMInputError(f"learning_rate must be a finite positive number, got {self.learning_rate}")
        if self.max_documents_per_split is not None and self.max_documents_per_split < 1:
            raise GNMInputError(f"max_documents_per_split must be >= 1, got {self.max_documents_per_split}")
        unknown = sorted(set(self.tasks or ()) - {"Task1", "Task2", "Task3"})
        if unknown:
            raise GNMInputError(f"tasks: unknown {unknown}; expected some of Task1, Task2, Task3")
