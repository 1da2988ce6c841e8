"""The embedded default target: a tiny tokenizer and Llama, trained locally until they memorise a LUME-format dataset.

Nothing here downloads anything. The parts, one idea each:

- `tiny_model`: the byte-level BPE tokenizer and the `LlamaForCausalLM` built from a config;
- `data`: the rows a target is trained on (synthetic default, LUME folder, Hub id) and deterministic subsets;
- `training`: the training loop, in rounds, until memorised or out of budget;
- `memorisation`: the bar (greedy ROUGE-L recall on sentence completion, exact match on QA);
- `build`: `make_target`, which ties them together, caches by fingerprint and writes the folder atomically.
"""

from .build import TargetNotMemorisedError, data_fingerprint, make_target, read_target_info
from .config import (
    DATA_SUBDIR, DEFAULT_ROUNDS, LUME_SPLITS, MIA_SPLITS, TARGET_FORMAT_VERSION, TARGET_INFO_FILE, TargetConfig,
    default_target_dir,
)
from .data import document_key, draw_documents, load_target_data, select_documents
from .memorisation import is_memorised, memorisation_report, memorisation_scores
from .tiny_model import SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, build_tiny_llama, train_tokenizer
from .training import (
    TrainingExample, encode_row, length_grouped_batches, pad_batch, proxy_memorisation, reproduced_fraction,
    train_until_memorised, training_examples, warmup_cosine,
)

__all__ = [
    "DATA_SUBDIR", "DEFAULT_ROUNDS", "LUME_SPLITS", "MIA_SPLITS", "SPECIAL_TOKENS", "TARGET_FORMAT_VERSION",
    "TARGET_INFO_FILE", "TINY_CHAT_TEMPLATE", "TargetConfig", "TargetNotMemorisedError", "TrainingExample",
    "build_tiny_llama", "data_fingerprint", "default_target_dir", "document_key", "draw_documents", "encode_row",
    "is_memorised", "length_grouped_batches", "load_target_data", "make_target", "memorisation_report",
    "memorisation_scores", "pad_batch", "proxy_memorisation", "read_target_info", "reproduced_fraction",
    "select_documents", "train_tokenizer", "train_until_memorised", "training_examples", "warmup_cosine",
]
