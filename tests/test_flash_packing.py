"""FlashAttention and packed sequences, on an exact CPU emulation of its kernels (`flash_emulation.py`).

transformers 5 reads the bounds of packed sequences from `position_ids` under FlashAttention only when the batch is
ONE row; given several rows it runs causal attention over each whole row, so a sequence attends to the sequences
before it. Packed training and packed NLL therefore put everything in one row for it (`packs_into_one_row`); batched
generation and padded NLL pass an attention mask, which FlashAttention unpads by itself.
"""

import copy

import pytest
import torch
from conftest import FACTS, fact_negatives, fact_rows
from flash_emulation import emulated_flash_attention
from test_packing import padded_group

from gnm_trainer.data.packing import pack_groups, padded_loss_positions
from gnm_trainer.evaluation.generation import (
    _padded_document_nll,
    document_nll,
    encode_each,
    generate_greedy,
    generate_one_by_one,
    pad_batch,
    pad_token_id,
    prefilled_cache,
)
from gnm_trainer.evaluation.packed_nll import packed_document_nll
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.packed_forward import packs_into_one_row
from gnm_trainer.target import build_tiny_llama

FLASH = ("flash_attention_2", "flash_attention_3")
ALL_TERMS = ["ga", "gd", "klr", "klf", "rm", "gnm", "npo", "klb"]
DOCUMENTS = [f"{question} {answer}" for question, answer in FACTS]


@pytest.fixture(autouse=True)
def emulated_flash(monkeypatch):
    emulated_flash_attention(monkeypatch)


def tiny_llama(tokenizer, attention: str):
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    model.set_attn_implementation(attention)
    return model.eval()


def random_group():
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (12, 5, 9, 3, 7)]
    return padded_group(sequences, [2, 1, 4, 1, 3])


def logits_at(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])[positions]


@pytest.mark.parametrize("attention", FLASH)
def test_the_emulated_kernels_compute_what_sdpa_computes(tiny_tokenizer, attention):
    """The plain kernel (one unpadded row) and the varlen one (a padded batch, unpadded by its mask) give sdpa's
    logits; so do Gemma-2's soft-capped scores and sliding windows against eager attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    group = random_group()
    padded = {"input_ids": group["input_ids"], "attention_mask": group["attention_mask"]}
    real = group["attention_mask"].reshape(-1).nonzero().squeeze(-1)
    flash, sdpa = tiny_llama(tiny_tokenizer, attention), tiny_llama(tiny_tokenizer, "sdpa")
    torch.testing.assert_close(logits_at(flash, padded, real), logits_at(sdpa, padded, real), rtol=0, atol=1e-5)
    one_row = {"input_ids": group["input_ids"][:1]}
    torch.testing.assert_close(logits_at(flash, one_row, slice(None)), logits_at(sdpa, one_row, slice(None)),
                               rtol=0, atol=1e-5)  # fmt: skip
    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)  # fmt: skip
    assert config.attn_logit_softcapping and max(group["attention_mask"].sum(-1)) > config.sliding_window
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config).eval()
    gemma.set_attn_implementation("eager")
    eager_logits = logits_at(gemma, padded, real)
    gemma.set_attn_implementation(attention)
    torch.testing.assert_close(logits_at(gemma, padded, real), eager_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", FLASH)
def test_several_packed_rows_leak_under_flash_attention_and_one_row_does_not(tiny_tokenizer, attention):
    model = tiny_llama(tiny_tokenizer, attention)
    group = random_group()
    padded = {"input_ids": group["input_ids"], "attention_mask": group["attention_mask"]}
    expected = logits_at(model, padded, padded_loss_positions(group["completion_mask"]))
    several = pack_groups([group], max_packed_length=16, pad_token_id=0)
    assert len(several.rows_of_sequences) > 1 and max(len(row) for row in several.rows_of_sequences) > 1
    leaking = logits_at(model, several.model_inputs(), several.loss_positions)
    assert (leaking - expected).abs().max() > 1e-2  # later sequences of a row attend to the earlier ones
    assert packs_into_one_row(model)
    one_row = pack_groups([group], max_packed_length=16, pad_token_id=0, one_row=True)
    assert one_row.input_ids.shape == (1, int(group["attention_mask"].sum()))
    assert one_row.rows_of_sequences == [[0, 1, 2, 3, 4]]
    torch.testing.assert_close(logits_at(model, one_row.model_inputs(), one_row.loss_positions), expected,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_only_flash_attention_packs_into_one_row(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    for attention in ("sdpa", "eager", "flex_attention", *FLASH):
        model = tiny_llama(tiny_tokenizer, attention)
        assert packs_into_one_row(model) is attention.startswith("flash")
        assert packs_into_one_row(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))) is (
            attention.startswith("flash")
        )


def rows_of_each_call(*models) -> list[int]:
    rows = []
    for model in models:
        model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)  # fmt: skip
    return rows


@pytest.mark.parametrize("attention", FLASH)
def test_packed_gradients_equal_padded_gradients_under_flash_attention(tiny_tokenizer, tmp_path, attention):
    """Full fine-tuning with every term: the policy, its frozen reference copy and the `klb` base model each run one
    packed row; loss, terms and every parameter's gradient equal the padded ones."""
    target = tmp_path / "target"
    tiny_llama(tiny_tokenizer, "sdpa").save_pretrained(target)
    tiny_tokenizer.save_pretrained(target)
    forget = fact_rows("forget", 0, 4)
    results = []
    for padding_free in (True, False):
        args = GNMConfig(
            output_dir=str(tmp_path / "out"), report_to="none", max_length=64, per_device_train_batch_size=4,
            loss_terms=ALL_TERMS, negative_schedule="all", padding_free=padding_free, max_packed_length=64,
            base_model=str(target), model_init_kwargs={"attn_implementation": attention},
        )  # fmt: skip
        trainer = GNMTrainer(str(target), args, train_dataset=forget, retain_dataset=fact_rows("retain", 4, 8),
                             negative_dataset=fact_negatives(forget), processing_class=tiny_tokenizer)  # fmt: skip
        models = (trainer.model, trainer.ref_model, trainer.base_model)
        assert all(model.config._attn_implementation == attention for model in models)
        rows = rows_of_each_call(*models)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        results.append((loss.item(), {k: v.item() for k, v in outputs["terms"].items()}, gradients, rows))
    (packed_loss, packed_terms, packed_grads, packed_rows), (padded_loss, padded_terms, padded_grads, _) = results
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert packed_terms.keys() == set(ALL_TERMS) and packed_terms == pytest.approx(padded_terms, abs=1e-5)
    assert any(gradient.abs().max() > 1e-4 for gradient in packed_grads.values())
    for name, gradient in packed_grads.items():
        torch.testing.assert_close(gradient, padded_grads[name], rtol=0, atol=1e-5, msg=name)
    assert packed_rows == [1, 1, 1]  # policy, reference, base: one row each


def loss_of_each_alone(model, encoded) -> list[float]:
    with torch.no_grad():
        return [model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() for ids in encoded]


@pytest.mark.parametrize("attention", FLASH)
def test_packed_and_padded_nll_under_flash_attention_equal_each_document_alone(tiny_tokenizer, attention):
    model = tiny_llama(tiny_tokenizer, attention)
    encoded = encode_each(tiny_tokenizer, DOCUMENTS)
    alone = loss_of_each_alone(model, encoded)
    rows = rows_of_each_call(model)
    # rows of about three documents, three rows per forward pass (as on a GPU): one row of nine documents per call
    packed = packed_document_nll(model, encoded, max_row_tokens=3 * max(map(len, encoded)), rows_per_forward=3)
    assert packed == pytest.approx(alone, abs=1e-5) and max(rows) == 1
    padded = _padded_document_nll(model, encoded, pad_token_id(tiny_tokenizer), 3, False, lambda count: None)
    assert padded == pytest.approx(alone, abs=1e-5)
    assert document_nll(model, tiny_tokenizer, DOCUMENTS, batch_size=4) == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("attention", FLASH)
def test_batched_generation_under_flash_attention_equals_one_at_a_time(tiny_tokenizer, attention):
    """Left-padded batches (and prompts prefilled one by one into a padded cache) generate what each prompt
    generates alone."""
    model = tiny_llama(tiny_tokenizer, attention)
    prompts = [question for question, _ in FACTS]
    assert len({len(ids) for ids in encode_each(tiny_tokenizer, prompts)}) > 1  # the batches are padded
    batched = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == generate_one_by_one(model, tiny_tokenizer, prompts, max_new_tokens=6)
    sequences = encode_each(tiny_tokenizer, prompts)
    input_ids, attention_mask = pad_batch(sequences, pad_token_id(tiny_tokenizer), side="left")
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                   pad_token_id=pad_token_id(tiny_tokenizer))  # fmt: skip
    padded = model.generate(**options)
    assert torch.equal(model.generate(**options, cache=prefilled_cache(model, sequences, max_new_tokens=6)), padded)
