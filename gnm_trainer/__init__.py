"""gnm_trainer: LLM unlearning with Gradual Negative Matching on the Hugging Face Trainer.

    from gnm_trainer import GNMConfig, GNMTrainer

The public names are imported lazily, so `gnm --help` and light modules do not pay for importing transformers.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GNMConfig": "gnm_trainer.gnm_config",
    "GNMTrainer": "gnm_trainer.gnm_trainer",
    "GNMDataCollator": "gnm_trainer.data.collator",
    "load_unlearning_data": "gnm_trainer.data.loading",
    "load_unlearning_splits": "gnm_trainer.data.loading",
    "GNMInputError": "gnm_trainer.errors",
    "unlearn": "gnm_trainer.semeval_submission",
    "push_to_hub": "gnm_trainer.hub",
    "build_model_card": "gnm_trainer.model_card",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gnm_trainer' has no attribute {name!r}")
