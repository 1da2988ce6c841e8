"""GNMTrainer end to end on tiny models: every term, gradient accumulation, the LoRA reference, AdaLoRA, saving,
and a real unlearning effect on a model that memorised a few facts."""

import copy
import math

import pytest
import torch
from conftest import FACTS, fact_rows
from peft import AdaLoraConfig, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnm_trainer import losses
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def negatives_for(rows, levels=3):
    """Hand-made gradual negatives: level 1 changes the last word, level K the whole answer."""
    negatives = []
    for row in rows:
        words = row["output"].split()
        for level in range(1, levels + 1):
            keep = max(0, len(words) - math.ceil(level / levels * len(words)))
            negatives.append({"id": row["id"], "level": level, "completion": " ".join(words[:keep] + ["zork"] * (len(words) - keep))})
    return negatives


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        max_length=64,
    )
    values.update(overrides)
    return GNMConfig(**values)


def make_trainer(model, tokenizer, tmp_path, peft=None, num_forget=4, eval_dataset=None, **overrides):
    forget, retain = fact_rows("forget", 0, num_forget), fact_rows("retain", 4, 8)
    return GNMTrainer(
        model,
        config(tmp_path, **overrides),
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=negatives_for(forget),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft,
    )


@pytest.mark.parametrize("term", ["ga", "gd", "klr", "klf", "rm", "gnm", "npo"])
def test_every_term_alone_trains_without_nan(tiny_model, tiny_tokenizer, tmp_path, term):
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=[term])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if f"loss_{term}" in entry]
    assert len(logged) == 2
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry[f"loss_{term}"]) for entry in logged)


def test_all_terms_together_log_each_component(tiny_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(
        tiny_model, tiny_tokenizer, tmp_path, peft=LoraConfig(**LORA), loss_terms=["ga", "gd", "klr", "klf", "rm", "gnm", "npo"]
    )
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    for key in ("loss_ga", "loss_gd", "loss_klr", "loss_klf", "loss_rm", "loss_gnm", "loss_npo", "nll_forget", "nll_retain", "nll_random_match", "nll_negative", "negative_level"):
        assert key in first
    assert first["loss_ga"] == pytest.approx(-first["nll_forget"])
    # Before any update the policy is the reference: both KLs are 0 and NPO is (2/β)·log 2.
    assert first["loss_klr"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss_npo"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)


def test_ga_is_minus_gd_on_the_same_batch(tiny_model, tiny_tokenizer, tmp_path):
    row = fact_rows("forget", 0, 1)
    trainer = GNMTrainer(
        tiny_model,
        config(tmp_path, loss_terms=["ga", "gd"], per_device_train_batch_size=1, max_steps=1),
        train_dataset=row,
        retain_dataset=row,
        processing_class=tiny_tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert outputs["terms"]["ga"].item() == pytest.approx(-outputs["terms"]["gd"].item(), rel=1e-6)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_loss_is_unchanged_by_extra_padding(tiny_model, tiny_tokenizer, tmp_path, padding_free):
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga", "gd", "klr", "rm", "gnm"],
                           reference_model="copy", padding_free=padding_free)  # fmt: skip
    features = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(features)
    padded = {}
    for key, value in batch.items():
        fill = tiny_tokenizer.pad_token_id if key.endswith("input_ids") else 0
        padded[key] = torch.nn.functional.pad(value, (0, 5), value=fill)
    trainer.model.eval()
    with torch.no_grad():
        _, plain = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        _, wide = trainer.compute_loss(trainer.model, padded, return_outputs=True)
    for term in plain["terms"]:
        assert wide["terms"][term].item() == pytest.approx(plain["terms"][term].item(), abs=1e-5), term


@pytest.mark.parametrize(
    ("num_forget", "forward_passes", "padding_free"),
    [(4, "one", False), (4, "per_group", False), (3, "one", False), (4, "auto", True), (3, "auto", True)],
    ids=["4-one", "4-per_group", "3-one", "4-packed", "3-packed"],
)
def test_gradient_accumulation_matches_the_larger_batch(tiny_tokenizer, tmp_path, num_forget, forward_passes, padding_free):
    """One SGD step over the same N examples gives the same parameters however they are split into micro-batches:
    1×4, 2×2 and 4×1 for 4 examples; 1×3, 2+1 and 3×1 for 3 (an uneven last micro-batch: each example still
    weighs 1/3, not 1/2 for the lone one)."""
    from gnm_trainer.target import build_tiny_llama

    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    results = []
    for batch_size, accumulation in [(num_forget, 1), (2, 2), (1, num_forget)]:
        trainer = make_trainer(
            copy.deepcopy(base),
            tiny_tokenizer,
            tmp_path,
            num_forget=num_forget,
            loss_terms=["ga", "gd", "klr", "rm", "gnm"],
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
            forward_passes=forward_passes,
            padding_free=padding_free,
        )
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    moved = (results[0] - torch.cat([p.flatten() for p in base.parameters()])).abs().max().item()
    assert moved > 1e-3  # the step really changed the weights
    assert torch.allclose(results[0], results[1], atol=1e-6, rtol=0)
    assert torch.allclose(results[0], results[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_training_length_is_the_trainers_step_count(tiny_model, tiny_tokenizer, tmp_path, drop_last):
    """4 examples in batches of 3 for 2 epochs: 2 batches per epoch (4 steps), or 1 when the last is dropped (2)."""
    from gnm_trainer.gnm_trainer import training_length

    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga"], per_device_train_batch_size=3,
                           max_steps=-1, num_train_epochs=2, dataloader_drop_last=drop_last)  # fmt: skip
    predicted = training_length(trainer.args, len(trainer.train_dataset))
    trainer.train()
    assert predicted == trainer.state.max_steps == (2 if drop_last else 4)


def test_evaluation_does_not_change_the_random_schedule(tiny_tokenizer, tmp_path):
    """Periodic evaluation draws its own random levels: training picks the same levels and reaches the same weights
    with and without it."""
    from gnm_trainer.target import build_tiny_llama

    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    runs = []
    for evaluate in (False, True):
        trainer = make_trainer(
            copy.deepcopy(base), tiny_tokenizer, tmp_path, loss_terms=["ga", "gnm"], negative_schedule="random",
            per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2,
            eval_dataset=fact_rows("forget", 0, 4) if evaluate else None, eval_strategy="steps" if evaluate else "no",
            eval_steps=1, per_device_eval_batch_size=2,
        )  # fmt: skip
        trainer.train()
        logged = [(e["step"], e["negative_level"], e["loss_gnm"]) for e in trainer.state.log_history if "loss" in e]
        evaluated = [e for e in trainer.state.log_history if "eval_negative_level" in e]
        assert len(evaluated) == (4 if evaluate else 0)
        runs.append((logged, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    (levels, weights), (levels_evaluated, weights_evaluated) = runs
    assert len(levels) == 4 and levels == levels_evaluated
    assert torch.equal(weights, weights_evaluated)


def test_one_forward_pass_unless_padding_wastes_too_much():
    from gnm_trainer.gnm_trainer import one_forward_pass

    assert one_forward_pass("auto", [(4, 20), (4, 22)])  # 176 padded tokens together vs 168 apart: within 25%
    assert not one_forward_pass("auto", [(4, 10), (4, 100)])  # 800 together vs 440 apart
    assert one_forward_pass("one", [(4, 10), (4, 100)])
    assert not one_forward_pass("per_group", [(4, 20), (4, 22)])
    assert one_forward_pass("per_group", [(4, 20)])
    # With several processes `auto` decides on the counts of all of them: here another process's 800 tokens,
    # padded alike either way, outweigh this process's 90 tokens of extra padding.
    assert one_forward_pass("auto", [(1, 10), (1, 100)], lambda counts: [counts[0] + 800, counts[1] + 800])
    assert not one_forward_pass("auto", [(1, 10), (1, 100)], lambda counts: counts)


def test_lora_reference_is_the_untrained_base_without_a_copy(tiny_model, tiny_tokenizer, tmp_path):
    base_weights = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    original = copy.deepcopy(tiny_model).eval()
    trainer = make_trainer(
        tiny_model, tiny_tokenizer, tmp_path, peft=LoraConfig(**LORA), loss_terms=["ga", "klr"], max_steps=3, learning_rate=5e-2
    )
    assert trainer.reference_mode == "adapter_disabled"
    assert trainer.ref_model is None
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    groups = {"retain": {key: batch[f"retain_{key}"] for key in ("input_ids", "attention_mask", "completion_mask")}}
    reference = trainer._reference_forward(trainer.model, groups)["retain"]
    with torch.no_grad():
        expected = original(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"]).logits
        adapted = trainer.model(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"]).logits
    at_completion = lambda logits: logits[:, :-1][losses.completion_positions(batch["retain_completion_mask"])]  # noqa: E731
    torch.testing.assert_close(reference, at_completion(expected), rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, expected)  # the adapter did learn something
    # The base weights inside the PEFT model are the only copy, and they were not modified.
    inner = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert inner.keys() == base_weights.keys()
    assert all(torch.equal(inner[name], weight) for name, weight in base_weights.items())
    model_tensors = sum(1 for _ in trainer.model.parameters())
    assert model_tensors == len(base_weights) + sum(1 for n, _ in trainer.model.named_parameters() if "lora_" in n)


def test_copy_reference_is_frozen_and_none_is_built_when_unneeded(tiny_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path / "a", loss_terms=["ga", "klr"])
    assert trainer.reference_mode == "copy"
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert not trainer.ref_model.training
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path / "b", loss_terms=["ga", "gnm"])
    assert trainer.reference_mode == "none" and trainer.ref_model is None


def test_adalora_fills_total_step_allocates_ranks_and_regularises(tiny_model, tiny_tokenizer, tmp_path):
    peft = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, target_modules=["q_proj", "v_proj"], total_step=100)
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=peft, loss_terms=["ga", "klr", "gnm"], max_steps=6, learning_rate=1e-2)
    assert trainer.model.peft_config["default"].total_step == 6
    calls = []
    allocate = trainer.model.base_model.update_and_allocate
    trainer.model.base_model.update_and_allocate = lambda step: calls.append(step) or allocate(step)
    trainer.train()
    assert calls == [0, 1, 2, 3, 4, 5]
    assert all("loss_orth" in entry for entry in trainer.state.log_history if "loss" in entry)
    kept_ranks = [int((m.lora_E["default"] != 0).sum()) for m in trainer.model.modules() if hasattr(m, "lora_E")]
    assert kept_ranks and sum(kept_ranks) < 6 * len(kept_ranks)  # the budget pruned ranks below init_r


def test_adalora_under_zero3_is_a_clear_error(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """ZeRO-3 partitions the matrices AdaLoRA's regulariser multiplies: an error at set-up, not an IndexError (or a
    failed backward, with PEFT's gather) at step 1."""
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    peft = AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj", "v_proj"], total_step=4)
    with pytest.raises(GNMInputError, match="AdaLoRA is not supported under DeepSpeed ZeRO-3"):
        make_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=peft, loss_terms=["ga"])


def test_saving_adapter_tokenizer_and_merged_weights(tiny_model, tiny_tokenizer, tmp_path):
    untrained = copy.deepcopy(tiny_model).eval()  # the base before PEFT wraps it in place
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, peft=LoraConfig(**LORA), loss_terms=["ga", "klr"], learning_rate=5e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    # The saved adapter loaded over a fresh copy of the untrained base, as a user would.
    reloaded = PeftModel.from_pretrained(copy.deepcopy(untrained), str(tmp_path / "adapter")).eval()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "adapter")).get_vocab() == tiny_tokenizer.get_vocab()
    trainer.args.merge_adapters = True
    trainer.save_model(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    ids = tokenizer("Where was Borin Tal born?", return_tensors="pt").input_ids
    trainer.model.eval()

    # Every trained adapter weight came back exactly (fp32 safetensors), under the same module names.
    trained = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert trained and trained.keys() == loaded.keys()
    assert all(torch.equal(loaded[name], weight) for name, weight in trained.items())
    # LoRA's B starts at zero: training moved it, so the comparison above is not of two untouched adapters.
    assert all(weight.abs().max() > 0 for name, weight in trained.items() if "lora_B" in name)
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
        # ...and the trained outputs are not the untrained base's: the saved files hold the training.
        assert (expected - untrained(input_ids=ids).logits).abs().max() > 1e-2
    assert isinstance(trainer.model, PeftModel)  # the trained model is still usable after a merged save


@pytest.fixture(scope="module")
def memorised(tiny_tokenizer):
    """A tiny Llama trained until it reproduces the 8 facts (the target to unlearn)."""
    return memorise_facts(tiny_tokenizer)


def memorise_facts(tiny_tokenizer):
    from gnm_trainer.target import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256, seed=1)
    texts = [f"{q} {a}{tiny_tokenizer.eos_token}" for q, a in FACTS]
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1
    return model


def mean_nll(model, tokenizer, pairs):
    from gnm_trainer.data.collator import GNMDataCollator, tokenize_examples
    from gnm_trainer.data.loading import load_unlearning_data

    rows = load_unlearning_data([{"id": f"r{i}", "input": p, "output": c} for i, (p, c) in enumerate(pairs)], "forget")
    examples = tokenize_examples(rows, tokenizer, "{prompt} {completion}", 64, None, True, "eval")
    batch = GNMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=64)(examples)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["forget_input_ids"], attention_mask=batch["forget_attention_mask"]).logits
    return losses.completion_nll(logits, batch["forget_input_ids"], batch["forget_completion_mask"]).mean().item()


def test_unlearning_forgets_the_forget_set_and_keeps_the_retain_set(memorised, tiny_tokenizer, tmp_path):
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    negatives = negatives_for(forget)
    forget_pairs = [(r["input"], r["output"]) for r in forget]
    retain_pairs = [(r["input"], r["output"]) for r in retain]
    negative_pairs = [(r["input"], n["completion"]) for r in forget for n in negatives if n["id"] == r["id"] and n["level"] == 3]
    before = [mean_nll(memorised, tiny_tokenizer, pairs) for pairs in (forget_pairs, retain_pairs, negative_pairs)]
    trainer = GNMTrainer(
        copy.deepcopy(memorised),
        config(tmp_path, loss_terms=["ga", "klr", "gnm"], max_steps=12, learning_rate=1e-2, per_device_train_batch_size=4, gnm_weight=1.0),
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=negatives,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    after = [mean_nll(trainer.model, tiny_tokenizer, pairs) for pairs in (forget_pairs, retain_pairs, negative_pairs)]
    forget_before, retain_before, negative_before = before
    forget_after, retain_after, negative_after = after
    assert forget_after > forget_before + 1.0, (before, after)
    # The retain set stays memorised: its NLL starts near 0 (0.009 nats per token), so an absolute margin such as
    # +0.5 nats would let every retain token drop to a probability of 0.6. At most 10x the start (measured 3.5x,
    # 0.033 nats: a token probability above 0.9); without klr the same run ends at 3.5 nats.
    assert retain_after < 10 * retain_before, (before, after)
    assert negative_after < negative_before, (before, after)


def test_configuration_errors_name_the_field(tmp_path):
    with pytest.raises(GNMInputError, match=r"loss_terms: unknown term\(s\) \['gx'\]"):
        GNMConfig(output_dir=str(tmp_path), loss_terms=["ga", "gx"])
    with pytest.raises(GNMInputError, match="gd_weight: set to 2.0 but 'gd' is not in loss_terms"):
        GNMConfig(output_dir=str(tmp_path), gd_weight=2.0)
    with pytest.raises(GNMInputError, match="negative_schedule"):
        GNMConfig(output_dir=str(tmp_path), negative_schedule="sometimes")
    with pytest.raises(GNMInputError, match="reference_model: 'none' but the terms \\['klr'\\]"):
        GNMConfig(output_dir=str(tmp_path), reference_model="none")
    with pytest.raises(GNMInputError, match="text_template"):
        GNMConfig(output_dir=str(tmp_path), text_template="{completion} then {prompt}")
    with pytest.raises(GNMInputError, match="remove_unused_columns"):
        GNMConfig(output_dir=str(tmp_path), remove_unused_columns=True)
    defaults = GNMConfig(output_dir=str(tmp_path))
    assert defaults.loss_weights == {"ga": 0.5, "klr": 5.0, "gnm": 0.04}
    assert defaults.bf16 is False and defaults.learning_rate == 1e-4


def test_trainer_errors_for_missing_inputs(tiny_model, tiny_tokenizer, tmp_path):
    forget = fact_rows("forget", 0, 2)
    with pytest.raises(GNMInputError, match="negative_dataset: the 'gnm' term needs gradual negatives"):
        GNMTrainer(tiny_model, config(tmp_path), train_dataset=forget, retain_dataset=fact_rows("retain", 4, 6), processing_class=tiny_tokenizer)
    with pytest.raises(GNMInputError, match=r"retain_dataset: required by the term\(s\) \['klr'\]"):
        GNMTrainer(tiny_model, config(tmp_path, loss_terms=["ga", "klr"]), train_dataset=forget, processing_class=tiny_tokenizer)
    with pytest.raises(GNMInputError, match="reference_model: 'adapter_disabled' needs a PEFT model"):
        GNMTrainer(
            tiny_model, config(tmp_path, loss_terms=["ga", "klr"], reference_model="adapter_disabled"),
            train_dataset=forget, retain_dataset=fact_rows("retain", 4, 6), processing_class=tiny_tokenizer,
        )


def test_group_by_length_sampling_uses_the_joined_lengths(tiny_model, tiny_tokenizer, tmp_path):
    """`train_sampling_strategy="group_by_length"` (the Trainer's own option) groups forget rows by prompt +
    completion length, which cuts padding when lengths vary (docs/performance.md)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga", "gnm"],
                           train_sampling_strategy="group_by_length")
    example = trainer.train_dataset[0]
    assert example["length"] == len(example["prompt_input_ids"]) + len(example["completion_input_ids"])
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == trainer.train_dataset["length"]
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


# ---------------------------------------------------------------------------------------------------------------
# Packed (padding-free) training equals padded training
# ---------------------------------------------------------------------------------------------------------------

ALL_TERMS = ["ga", "gd", "klr", "klf", "rm", "gnm", "npo"]
PEFT_METHODS = {
    "full": None,
    "lora": LoraConfig(**LORA),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, target_modules="all-linear", total_step=4),
}


def logged_values(trainer):
    """Every logged term, NLL, extra and the gradient norm, step by step."""
    return [{k: v for k, v in e.items() if k.startswith(("loss", "nll_", "negative_level")) or k == "grad_norm"}
            for e in trainer.state.log_history if "loss" in e]  # fmt: skip


@pytest.mark.parametrize("schedule", ["gradual", "random", "all"])
@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_packed_training_equals_padded_training(tiny_tokenizer, tmp_path, method, schedule):
    """Every term, the NLLs, the gradient norm and the trained weights are the same packed and padded (within 1e-5),
    with gradient accumulation: 2 optimizer steps of 2 micro-batches of 2 examples, all seven terms."""
    from gnm_trainer.target import build_tiny_llama

    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    runs = []
    for padding_free in (True, False):
        trainer = make_trainer(
            copy.deepcopy(base), tiny_tokenizer, tmp_path, peft=PEFT_METHODS[method], num_forget=8,
            loss_terms=ALL_TERMS, negative_schedule=schedule, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, optim="sgd", learning_rate=0.5, padding_free=padding_free,
        )  # fmt: skip
        assert trainer.padding_free is padding_free
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        runs.append((logged_values(trainer), weights))
    (packed, packed_weights), (padded, padded_weights) = runs
    assert len(packed) == 2 and [step.keys() for step in packed] == [step.keys() for step in padded]
    assert {"loss_npo", "loss_klf", "nll_negative", "grad_norm"} <= packed[0].keys()
    for packed_step, padded_step in zip(packed, padded):
        for key, value in packed_step.items():
            assert value == pytest.approx(padded_step[key], abs=1e-5), key
    assert (packed_weights - padded_weights).abs().max() <= 1e-5
    initial = torch.cat([p.detach().flatten() for p in base.parameters()])
    if method == "full":
        assert (packed_weights - initial).abs().max() > 1e-3  # the steps really changed the weights


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_packed_gradients_equal_padded_gradients(tiny_tokenizer, tmp_path, method):
    """The gradient of the loss with every term, on one batch, parameter by parameter."""
    from gnm_trainer.target import build_tiny_llama

    base = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    gradients = []
    for padding_free in (True, False):
        trainer = make_trainer(copy.deepcopy(base), tiny_tokenizer, tmp_path, peft=PEFT_METHODS[method],
                               loss_terms=ALL_TERMS, negative_schedule="all", padding_free=padding_free)  # fmt: skip
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        loss.backward()
        named = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        gradients.append((loss.item(), {k: v.item() for k, v in outputs["terms"].items()}, named))
    (packed_loss, packed_terms, packed_grads), (padded_loss, padded_terms, padded_grads) = gradients
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert packed_terms == pytest.approx(padded_terms, abs=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert any(g.abs().max() > 1e-4 for g in packed_grads.values())
    for name, gradient in packed_grads.items():
        torch.testing.assert_close(gradient, padded_grads[name], rtol=0, atol=1e-5, msg=name)


def test_packed_forward_projects_the_lm_head_only_where_a_loss_reads(tiny_model, tiny_tokenizer, tmp_path):
    """Policy and reference logits have one row per completion-predicting position of the step, packed or padded."""
    for padding_free in (True, False):
        trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, loss_terms=["ga", "klr"], padding_free=padding_free)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        shapes = []
        heads = [trainer.model.get_output_embeddings(), trainer.ref_model.get_output_embeddings()]  # a frozen copy
        handles = [h.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape))) for h in heads]
        trainer.compute_loss(trainer.model, batch)
        for handle in handles:
            handle.remove()
        completion_tokens = [int(losses.completion_positions(batch[f"{name}_completion_mask"]).sum()) for name in ("forget", "retain")]
        vocab = heads[0].out_features
        assert shapes == [(sum(completion_tokens), vocab), (completion_tokens[1], vocab)]  # policy, then reference


def test_padding_free_auto_packs_supported_models_and_pads_others_with_one_log_line(tiny_tokenizer, tmp_path, monkeypatch):
    """A decoder whose forward takes no position_ids (BLOOM) trains padded under auto, said once; forcing packing
    is an error naming the reason. The tiny Llama packs with sdpa and eager."""
    from transformers import BloomConfig, BloomForCausalLM

    from gnm_trainer import packed_forward as module
    from gnm_trainer.target import build_tiny_llama

    warnings = []
    monkeypatch.setattr(module.logger, "warning", lambda message, *args: warnings.append(message % args))
    for attention in ("sdpa", "eager"):
        llama = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
        llama.set_attn_implementation(attention)
        assert make_trainer(llama, tiny_tokenizer, tmp_path, loss_terms=["ga"]).padding_free is True
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=2, n_head=2))
    trainer = make_trainer(bloom, tiny_tokenizer, tmp_path, loss_terms=["ga", "gnm"])
    assert trainer.padding_free is False
    packing_lines = [w for w in warnings if w.startswith("padding_free")]
    assert packing_lines == ["padding_free: the model cannot train on packed sequences (BloomForCausalLM.forward takes "
                             "no position_ids); padding each batch instead"]  # fmt: skip
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    with pytest.raises(GNMInputError, match="padding_free: True, but this model cannot train on packed sequences"):
        make_trainer(bloom, tiny_tokenizer, tmp_path, loss_terms=["ga"], padding_free=True)


def test_packing_support_is_read_from_the_model_alone(tiny_model):
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    from gnm_trainer.packed_forward import packing_unsupported_reason

    assert packing_unsupported_reason(tiny_model) is None
    tiny_model.config._attn_implementation = "paged|sdpa"
    assert "attention implementation 'paged|sdpa'" in packing_unsupported_reason(tiny_model)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    assert packing_unsupported_reason(t5) == "it is an encoder-decoder model"
    # OPT takes position_ids but builds its mask without them: packed, its sequences would see each other.
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   word_embed_proj_dim=16, max_position_embeddings=64))  # fmt: skip
    assert packing_unsupported_reason(opt) == "OPTForCausalLM builds its attention mask without position_ids"


def test_packing_options_are_checked(tmp_path):
    with pytest.raises(GNMInputError, match="padding_free: 'yes'"):
        GNMConfig(output_dir=str(tmp_path), padding_free="yes")
    with pytest.raises(GNMInputError, match="max_packed_length: expected a finite number >= 2"):
        GNMConfig(output_dir=str(tmp_path), max_packed_length=1)
    assert GNMConfig(output_dir=str(tmp_path)).padding_free is None
