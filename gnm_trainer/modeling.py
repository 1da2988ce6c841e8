"""Questions about a model that several modules ask (is it a PEFT model, is it AdaLoRA) and the merged save.

They live here, below the trainer, so that the guard, the Hub upload and the manifest can use them without
importing `gnm_trainer.gnm_trainer` (which imports them in turn).
"""


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the package importable without it
        return False
    return isinstance(model, PeftModel)


def is_adalora(model) -> bool:
    """Whether `model` is a PEFT model whose active adapter is AdaLoRA."""
    if not is_peft_model(model):
        return False
    from peft import AdaLoraConfig

    return isinstance(model.peft_config.get(model.active_adapter), AdaLoraConfig)


def save_merged(peft_model, tokenizer, output_dir: str) -> None:
    """Write the adapter merged into full weights (from a copy: the trained PEFT model stays usable) and the tokenizer."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
