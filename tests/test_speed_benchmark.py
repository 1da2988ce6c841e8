"""The speed benchmark in its smoke preset (every figure present, equal scores, sane ratios), its packed compute
floor (the same logits as each sequence alone), and the two speed-ups of the library it measures: NLL batches capped
in tokens on a CPU, and negatives generation stopping at the first line.

The speed targets themselves are not asserted here (they depend on the machine); docs/performance.md has the
figures of the cpu preset.
"""

import json
import math
import os
import sys

import pytest

from conftest import FACTS, fact_rows
from gnm_trainer.data import load_unlearning_data
from gnm_trainer.evaluation.generation import length_sorted_batches
from gnm_trainer.negatives.llm import first_line, first_line_complete, generate_texts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import speed  # noqa: E402
from speedbench import training as training_module  # noqa: E402
from speedbench.common import PRESETS, Data, supports_padding_free  # noqa: E402
from speedbench.flops import linear_weights, lora_step_flops, peak_tflops, utilisation  # noqa: E402
from speedbench.training import TrainerRun, packed_rows, read_logits, real_sequences  # noqa: E402

FIGURES = {
    "a": ("gnm_seconds_per_example", "padded_seconds_per_example", "published_seconds_per_example",
          "published_speedup", "padded_published_speedup", "packing_speedup", "tokens_per_second",
          "padded_tokens_per_second"),
    "b": ("gnm_step_seconds", "floor_step_seconds", "overhead_ratio", "published_speedup_at_floor"),
    "c": ("klr_over_no_reference", "copy_over_klr"),
    "d": ("batched_seconds", "one_by_one_seconds", "speedup", "generation_speedup", "nll_speedup"),
    "e": ("batched_seconds", "sequential_seconds", "speedup"),
}  # fmt: skip


def test_smoke_preset_writes_every_figure(tmp_path, capsys):
    output = tmp_path / "speed.json"
    speed.main(["--preset", "smoke", "--output", str(output), "--threads", "1"])
    summary = json.loads(output.read_text())
    assert summary["preset"] == "smoke" and set(summary["figures"]) == set(speed.MEASUREMENTS)
    for measurement, keys in FIGURES.items():
        figures = summary["figures"][measurement]
        for key in keys:
            value = figures[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (measurement, key, value)
    training = summary["figures"]["a"]
    assert training["same_batches"] is True  # the default and the padded step trained on the same batches
    assert training["computed_tokens_per_step"] >= training["real_tokens_per_step"] > 0
    assert training["padded_computed_tokens_per_step"] > training["real_tokens_per_step"]  # LUME lengths are mixed
    # (tokens per second and model FLOPs against a hand count: test_training_figures_from_a_hand_count)
    assert training["policy_tokens_per_step"] < training["real_tokens_per_step"]  # the reference's tokens on top
    use = training["utilisation"]
    assert use["mfu"] is None and training["peak_memory_mib"] is None  # a CPU: no peak FLOPS, no CUDA memory
    memory = summary["figures"]["c"]["variants"]
    assert set(memory) == set(speed.MEMORY_VARIANTS)
    assert memory["klr_copy"]["reference_mode"] == "copy"
    assert memory["klr_adapter_disabled"]["reference_mode"] == "adapter_disabled"
    assert memory["no_reference"]["reference_mode"] == "none"
    ran = {name: v for name, v in memory.items() if "not_run" not in v}
    assert set(memory) - set(ran) == (set() if supports_padding_free() else {"packed_step"})
    assert all(v["peak_mib"] >= v["baseline_after_model_load_mib"] > 0 for v in ran.values())
    assert memory["padded_step"]["step_peak_mib"] > 0 and memory["padded_step"]["batch_size"] == 4
    evaluation = summary["figures"]["d"]
    assert evaluation["same_scores"] is True and evaluation["same_generations"] is True
    assert evaluation["batched_scores"] == evaluation["one_by_one_scores"]
    assert evaluation["batched_results"] == evaluation["one_by_one_results"]
    assert summary["figures"]["e"]["same_outputs"] is True
    assert set(summary["verdicts"]) == {"a", "a'", "a''", "b", "c", "c'", "c''", "d", "e"}
    printed = capsys.readouterr().out
    assert summary["table"] in printed and "| d |" in printed


def hand_group(lengths: list[int], padded_to: int, seed: int) -> dict:
    """A right-padded group of sequences of `lengths` real tokens, the last 2 of each the completion."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    group = {key: torch.zeros(len(lengths), padded_to, dtype=torch.long)
             for key in ("input_ids", "attention_mask", "completion_mask")}  # fmt: skip
    for row, length in enumerate(lengths):
        group["input_ids"][row, :length] = torch.randint(4, 100, (length,), generator=generator)
        group["attention_mask"][row, :length] = 1
        group["completion_mask"][row, length - 2 : length] = 1
    return group


def test_training_figures_from_a_hand_count(tmp_path, monkeypatch):
    """(a)'s tokens per second and model FLOPs from steps whose sequences and times are set by hand (the two trainer
    runs replaced, the floor and the published loop run for real on the tiny model): only the measured steps count,
    padding never does, the reference reads the retain sequences only, and the time is the default step's."""
    from dataclasses import replace

    # Real tokens per step: forget + retain + negative for the policy, retain for the reference. Step 0 is the
    # warm-up (long sequences, a slow step): it must not count. Groups are padded well past their lengths.
    lengths = [  # (forget, retain, negative) real lengths per step
        ([9, 9], [9, 9], [9, 9]),
        ([5, 3], [4, 6], [5, 2]),  # policy 25, reference 10
        ([6, 5], [2, 3], [4, 4]),  # policy 24, reference 5
    ]
    steps = [{name: hand_group(group, 12, seed=10 * step + i) for i, (name, group) in
              enumerate(zip(("forget", "retain", "negative"), groups))} for step, groups in enumerate(lengths)]
    seconds = {False: [9.0, 4.0, 6.0], None: [9.0, 2.0, 3.0]}  # padded run, default run: measured means 5.0 and 2.5
    models = []

    def fake_run(model, padding_free, setup, device, record_groups=False, after_step=None):
        from peft import get_peft_model

        models.append(model)
        trained = get_peft_model(model, training_module.lora_config())
        for step in range(len(steps)):
            if after_step is not None:
                after_step(step, trained)
        return TrainerRun(layout=str(padding_free), step_seconds=seconds[padding_free], computed_tokens=[100] * 3,
                          losses=[1.0, 2.0, 3.0], groups=steps if record_groups else [], peak_memory_mib=[])

    monkeypatch.setattr(training_module, "run_trainer", fake_run)
    forget = list(load_unlearning_data(fact_rows("forget", 0, 4), "forget"))
    retain = list(load_unlearning_data(fact_rows("retain", 4, 8), "retain"))
    preset = replace(PRESETS["smoke"], train_rows=4, train_batch_size=2, warmup_steps=1, measured_steps=2)
    figures, _ = training_module.measure_training(preset, Data("hand", forget, retain, [], []), "cpu", str(tmp_path),
                                                  None)  # fmt: skip

    assert figures["policy_tokens_per_step"] == (25 + 24) / 2
    assert figures["real_tokens_per_step"] == (25 + 10 + 24 + 5) / 2
    assert figures["gnm_step_seconds"] == 2.5 and figures["tokens_per_second"] == pytest.approx(24.5 / 2.5)
    assert figures["padded_tokens_per_second"] == pytest.approx(24.5 / 5.0)
    assert figures["gnm_seconds_per_example"] == pytest.approx(2.5 / 2) and figures["packing_speedup"] == 2.0
    # The tiny Llama's linear weights by hand (hidden 64, MLP 128, 2 layers, 2 heads, no grouped KV; the LM head),
    # 4 FLOPs per weight per policy token (forward and activation gradients of a LoRA step), 2 per reference token.
    vocab = models[0].config.vocab_size
    weights = 2 * (4 * 64 * 64 + 3 * 64 * 128) + vocab * 64
    flops = 4 * weights * 24.5 + 2 * weights * 7.5
    use = figures["utilisation"]
    assert use["model_tflops_per_step"] == pytest.approx(flops / 1e12)
    assert use["achieved_model_tflops"] == pytest.approx(flops / 1e12 / 2.5)


def test_only_and_bad_arguments(tmp_path):
    assert speed.parse_args(["--only", "d,a"]).only == ["a", "d"]
    with pytest.raises(SystemExit):
        speed.parse_args(["--only", "a,x"])
    assert speed.tiny(speed.PRESETS["gpu"]).eval_batch_size == speed.PRESETS["gpu"].eval_batch_size
    assert speed.tiny(speed.PRESETS["gpu"]).model == speed.PRESETS["smoke"].model


def test_model_flops_and_utilisation(tiny_model):
    from peft import LoraConfig, get_peft_model

    config = tiny_model.config
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inner  # q, o; k, v; gate, up, down
    expected = layers * per_layer + config.vocab_size * hidden  # the LM head
    assert linear_weights(tiny_model) == expected
    adapted = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear"))
    assert linear_weights(adapted) == expected  # the adapters are not counted
    assert lora_step_flops(1000, policy_tokens=10, reference_tokens=5) == 4 * 1000 * 10 + 2 * 1000 * 5
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H200", "float32") == 66.9
    assert peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0 and peak_tflops("Some GPU", "float32") is None
    use = utilisation(2e12, 0.5, "NVIDIA H200", "bfloat16")
    assert use["achieved_model_tflops"] == pytest.approx(4.0) and use["mfu"] == pytest.approx(4.0 / 989.4)


def test_packed_floor_computes_each_sequence_as_if_alone(tiny_model):
    """The floor's packed rows (no padding, position ids, no attention mask) give the logits of each sequence run
    alone, at exactly the positions that predict a completion token; every token is in one row, once."""
    import torch

    lengths, completions = [7, 3, 11, 5, 9], [2, 1, 4, 3, 3]
    group = {key: torch.zeros(5, 11, dtype=torch.long) for key in ("input_ids", "attention_mask", "completion_mask")}
    generator = torch.Generator().manual_seed(0)
    for row, (length, completion) in enumerate(zip(lengths, completions)):
        group["input_ids"][row, :length] = torch.randint(4, 200, (length,), generator=generator)
        group["attention_mask"][row, :length] = 1
        group["completion_mask"][row, length - completion : length] = 1
    tiny_model.eval()
    with torch.no_grad():
        alone = [  # each sequence alone: the logits that predict its completion tokens
            tiny_model(input_ids=group["input_ids"][row : row + 1, :length], use_cache=False).logits[0][
                length - completions[row] - 1 : length - 1]
            for row, length in enumerate(lengths)
        ]  # fmt: skip
        for row_tokens, expected_rows in ((None, 4), (16, 3), (1000, 1)):
            rows = packed_rows(real_sequences(group), row_tokens)
            assert len(rows) == expected_rows
            assert sorted(i for row in rows for i in row.sequences) == list(range(5))
            assert [len(row.input_ids) for row in rows] == [sum(lengths[i] for i in row.sequences) for row in rows]
            assert all(len(row.input_ids) <= max(row_tokens or 0, max(lengths)) for row in rows)
            packed = torch.cat([read_logits(tiny_model, row) for row in rows])
            expected = torch.cat([alone[i] for row in rows for i in row.sequences])
            torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


def test_nll_batches_respect_rows_and_token_budget():
    lengths = [5, 300, 250, 10, 260, 20]
    assert length_sorted_batches(lengths, 4) == [[1, 4, 2, 5], [3, 0]]
    batches = length_sorted_batches(lengths, 4, max_tokens=600)
    assert batches == [[1, 4], [2, 5], [3, 0]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(batch) * lengths[batch[0]] <= 600 for batch in batches)
    assert length_sorted_batches([700, 3], 4, max_tokens=600) == [[0], [1]]  # too long alone: a batch of its own


@pytest.mark.parametrize(
    "text, complete",
    [("", False), ("\n\n  ", False), ("Paris", False), ("Paris\n", True), ("\n Paris\r", True),
     ("  Paris is\nLyon", True), ("Paris\u2028", True)],
)  # fmt: skip
def test_first_line_complete(text, complete):
    assert first_line_complete(text) is complete
    if complete:  # whatever comes after cannot change the first line any more
        assert first_line(text + "more\nlines") == first_line(text)


def test_generation_stops_at_the_first_line_and_keeps_it(tiny_model, tiny_tokenizer):
    prompts = [question for question, _ in FACTS] * 3
    seeds = list(range(len(prompts)))  # sampled: random weights then write line breaks now and then
    tiny_model.eval()
    full = generate_texts(tiny_model, tiny_tokenizer, prompts, 8, 48, seeds)
    stopped = generate_texts(tiny_model, tiny_tokenizer, prompts, 8, 48, seeds, stop_at_first_line=True)
    one_by_one = generate_texts(tiny_model, tiny_tokenizer, prompts, 1, 48, seeds, stop_at_first_line=True)
    assert stopped == one_by_one
    assert [first_line(text) for text in stopped] == [first_line(text) for text in full]
    assert any(len(short) < len(long) for short, long in zip(stopped, full))  # some rows did stop early
