"""gnm_trainer: LLM unlearning with Gradual Negative Matching on the Hugging Face Trainer."""

__version__ = "0.1.0"
