"""Padding-free training on every architecture family we claim, under every attention implementation that packs.

For each tiny model (2 layers, hidden 32, built from its config, its default dropout kept: `GNMConfig.disable_dropout`
turns it off) and each implementation in `PACKED_ATTENTION`, exactly one of:
- the model class does not offer the implementation: transformers refuses to build it, in one line;
- `packing_unsupported_reason` states why the model cannot pack: padded training still runs, packing on demand is
  refused with that reason;
- packed training equals padded training: two optimizer steps of LoRA with every term log the same losses, NLLs and
  gradient norm and leave the same adapter weights (within 1e-5), with `max_packed_length` small enough that sdpa,
  eager and flex get several rows, while FlashAttention gets one.
FlashAttention runs on its exact CPU stand-in (`flash_emulation.py`). FlexAttention has no backward pass on a CPU
(torch refuses, in one line), so its packed and padded loss terms are compared in a forward pass, run uncompiled:
the mask is the same, and torch's CPU compiler fails on sliding-window masks and costs ~15 s per model.
"""

import copy
import gc
import math

import pytest
import torch
import transformers
from conftest import fact_negatives, fact_rows
from flash_emulation import emulated_flash_attention
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.packed_forward import PACKED_ATTENTION, packing_unsupported_reason, packs_into_one_row

ALL_TERMS = ["ga", "gd", "klr", "klf", "rm", "gnm", "npo"]
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
GROUPED = dict(SMALL, num_key_value_heads=2, head_dim=8)  # grouped-query attention, 2 query heads per key/value head
# Windows shorter than the facts' sequences, so that sliding-window layers really slide.
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**GROUPED),
    "qwen2": lambda: transformers.Qwen2Config(**GROUPED),
    "qwen3": lambda: transformers.Qwen3Config(**GROUPED),
    "mistral": lambda: transformers.MistralConfig(**GROUPED, sliding_window=4),
    "gemma2": lambda: transformers.Gemma2Config(**GROUPED, sliding_window=4),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **GROUPED, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=256,
    ),  # fmt: skip
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, num_key_value_heads=2),
    "falcon": lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **GROUPED, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
    ),
}
# What transformers 5 does not offer (it refuses to build these, in one line).
NOT_OFFERED = {
    ("gemma2", "sdpa"), ("gpt2", "flex_attention"), ("falcon", "flex_attention"), ("gpt_bigcode", "flex_attention"),
    ("bloom", "sdpa"), ("bloom", "flex_attention"), ("bloom", "flash_attention_2"), ("bloom", "flash_attention_3"),
}  # fmt: skip
# Why our code refuses to pack these (`packing_unsupported_reason`), whatever the implementation.
REFUSED = {
    "opt": "OPTForCausalLM builds its attention mask without position_ids",
    "falcon": "FalconForCausalLM does not use transformers' attention interface",
    "bloom": "BloomForCausalLM.forward takes no position_ids",
}
MAX_PACKED_LENGTH = 64  # a few facts per row, several rows per step for sdpa, eager and flex


def build(tokenizer, architecture: str, attention: str):
    config = ARCHITECTURES[architecture]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention)


def make_trainer(model, tokenizer, tmp_path, padding_free):
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    args = GNMConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="no", report_to="none", seed=7, max_length=64, loss_terms=ALL_TERMS, optim="sgd",
        learning_rate=0.5, padding_free=padding_free, max_packed_length=MAX_PACKED_LENGTH,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    return GNMTrainer(model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=fact_negatives(forget),
                      processing_class=tokenizer, peft_config=lora)  # fmt: skip


def logged_values(trainer):
    return [{k: v for k, v in e.items() if k.startswith(("loss", "nll_", "negative_level")) or k == "grad_norm"}
            for e in trainer.state.log_history if "loss" in e]  # fmt: skip


def rows_per_call(model) -> list[int]:
    """Records the number of rows of every forward call of `model` (a list filled as it runs)."""
    rows = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)  # fmt: skip
    return rows


def assert_same_logs(packed, padded):
    assert len(packed) == 2 and [step.keys() for step in packed] == [step.keys() for step in padded]
    assert {"loss_klr", "loss_npo", "nll_negative", "grad_norm"} <= packed[0].keys()
    for packed_step, padded_step in zip(packed, padded):
        for key, value in packed_step.items():
            assert value == pytest.approx(padded_step[key], abs=1e-5), key


def train_packed_and_padded(base, tokenizer, tmp_path):
    """Logs and trained adapter weights of two steps packed, then padded, from the same model; and the number of rows
    of each packed forward call."""
    runs, rows = [], None
    for padding_free in (True, False):
        model = copy.deepcopy(base)
        trainer = make_trainer(model, tokenizer, tmp_path, padding_free)
        assert trainer.padding_free is padding_free
        if padding_free:
            rows = rows_per_call(model)
        trainer.train()
        adapter = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        runs.append((logged_values(trainer), adapter))
    return runs, rows


def loss_terms(base, tokenizer, tmp_path, padding_free) -> dict[str, float]:
    """The loss terms of one batch, without gradients."""
    trainer = make_trainer(copy.deepcopy(base), tokenizer, tmp_path, padding_free)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return {name: value.item() for name, value in outputs["terms"].items()}


@pytest.fixture(scope="module", autouse=True)
def frozen_garbage_collector():
    """The Trainer runs `gc.collect()` after each training (accelerate's `free_memory`); scanning every object of the
    test session takes ~0.3 s, most of a tiny model's run. `gc.freeze` leaves the objects made before out of it."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def uncompiled_flex_attention(monkeypatch):
    """transformers' flex attention and block masks without `torch.compile`: the same masks, computed densely, instead
    of a compilation per model and shape (several seconds each)."""
    import transformers.integrations.flex_attention as flex
    import transformers.masking_utils as masking

    def attention(query, key, value, training=False, **kwargs):
        return flex.flex_attention(query, key, value, **kwargs)

    def block_mask(*args, _compile=False, **kwargs):
        return flex.create_block_mask(*args, _compile=False, **kwargs)

    monkeypatch.setattr(flex, "compile_friendly_flex_attention", attention)
    monkeypatch.setattr(masking, "create_block_mask", block_mask)


def cases(keep) -> list:
    """The (architecture, attention) pairs that `keep` selects, with readable ids."""
    pairs = [(a, i) for a in ARCHITECTURES for i in PACKED_ATTENTION if keep(a, i)]
    return [pytest.param(a, i, id=f"{a}-{i}") for a, i in pairs]


def offered(architecture, attention) -> bool:
    return (architecture, attention) not in NOT_OFFERED


def packs(architecture, attention) -> bool:
    return offered(architecture, attention) and architecture not in REFUSED


@pytest.fixture(autouse=True)
def flash_and_flex_on_this_cpu(monkeypatch, uncompiled_flex_attention):
    emulated_flash_attention(monkeypatch)


@pytest.mark.parametrize(("architecture", "attention"), cases(lambda a, i: not offered(a, i)))
def test_transformers_refuses_an_implementation_the_model_does_not_offer(architecture, attention, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"does not support (an attention implementation|Flash Attention)"):
        build(tiny_tokenizer, architecture, attention)


@pytest.mark.parametrize(("architecture", "attention"), cases(lambda a, i: offered(a, i) and a in REFUSED))
def test_a_model_that_cannot_pack_says_why_and_trains_padded(architecture, attention, tiny_tokenizer, tmp_path):
    base = build(tiny_tokenizer, architecture, attention)
    assert base.config._attn_implementation == attention
    assert packing_unsupported_reason(base) == REFUSED[architecture]
    with pytest.raises(GNMInputError, match="padding_free: True, but this model cannot train on packed sequences"):
        make_trainer(copy.deepcopy(base), tiny_tokenizer, tmp_path, padding_free=True)
    if attention == "flex_attention":  # no backward pass on a CPU: a padded forward is all that can run
        assert all(map(math.isfinite, loss_terms(base, tiny_tokenizer, tmp_path, padding_free=False).values()))
        return
    trainer = make_trainer(base, tiny_tokenizer, tmp_path, padding_free=None)
    assert trainer.padding_free is False
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize(("architecture", "attention"), cases(lambda a, i: packs(a, i) and i != "flex_attention"))
def test_packed_training_equals_padded_training(architecture, attention, tiny_tokenizer, tmp_path):
    base = build(tiny_tokenizer, architecture, attention)
    assert base.config._attn_implementation == attention and packing_unsupported_reason(base) is None
    [(packed, packed_adapter), (padded, padded_adapter)], rows = train_packed_and_padded(base, tiny_tokenizer, tmp_path)
    assert_same_logs(packed, padded)
    assert (packed_adapter - padded_adapter).abs().max() <= 1e-5
    if packs_into_one_row(base):
        assert max(rows) == 1  # FlashAttention finds packed sequences only in a batch of one row
    else:
        assert max(rows) > 1


@pytest.mark.parametrize(("architecture", "attention"), cases(lambda a, i: packs(a, i) and i == "flex_attention"))
def test_packed_flex_attention_loss_equals_padded_and_cannot_train_on_a_cpu(
    architecture, attention, tiny_tokenizer, tmp_path
):
    base = build(tiny_tokenizer, architecture, attention)
    assert packing_unsupported_reason(base) is None
    packed, padded = (loss_terms(base, tiny_tokenizer, tmp_path, padding_free) for padding_free in (True, False))
    assert {"klr", "npo", "gnm"} <= packed.keys() and packed == pytest.approx(padded, abs=1e-5)
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        make_trainer(copy.deepcopy(base), tiny_tokenizer, tmp_path, padding_free=True).train()
