"""The SemEval-2025 Task 4 metric as a Hugging Face `evaluate` module: `evaluate.load(<this folder>)`."""
