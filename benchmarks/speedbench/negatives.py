"""(e) Gradual negatives from a generator LLM: `generate_llm_negatives` batched against batch_size=1, same rows,
same outputs required."""

from .common import Data, Preset, build_model, clock, parameter_count, texts_of


def measure_negatives(preset: Preset, data: Data, device: str) -> dict:
    """(e): generate_llm_negatives batched against batch_size=1 on the same rows (same outputs required)."""
    from gnm_trainer.negatives import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, generate_llm_negatives
    from gnm_trainer.target import train_tokenizer

    rows = data.forget[: preset.negative_rows]
    texts = texts_of(rows + data.retain[: preset.negative_rows]) + [DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE]
    tokenizer = train_tokenizer(texts, vocab_size=preset.vocab_size)
    model = build_model(tokenizer, preset.model, device).eval()
    options = dict(levels=preset.negative_levels, max_new_tokens=preset.negative_max_new_tokens,
                   retain_rows=data.retain[: preset.negative_rows], seed=0)  # fmt: skip
    generate_llm_negatives(rows[:1], model, tokenizer, **{**options, "levels": 1, "max_new_tokens": 2})  # warm-up
    timings, outputs = {}, {}
    for name, batch_size in (("batched", preset.negative_batch_size), ("sequential", 1)):
        start = clock(device)
        outputs[name] = generate_llm_negatives(rows, model, tokenizer, batch_size=batch_size, **options)
        timings[name] = clock(device) - start
    return {
        "model_parameters": parameter_count(model),
        "rows": len(rows),
        "levels": preset.negative_levels,
        "max_new_tokens": preset.negative_max_new_tokens,
        "batch_size": preset.negative_batch_size,
        "batched_seconds": timings["batched"],
        "sequential_seconds": timings["sequential"],
        "speedup": timings["sequential"] / timings["batched"],
        "same_outputs": outputs["batched"] == outputs["sequential"],
        "fallback_levels": sum(row["fallback"] for row in outputs["batched"]),
    }
