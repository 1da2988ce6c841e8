"""Chunked sequential unlearning: the schedule's order, the retain rows it cycles, its checks and a run on it."""

import pytest
from conftest import fact_rows

from gnm_trainer.data.chunked import ChunkedForgetSampler, schedule_blocks, scheduled_examples
from gnm_trainer.errors import GNMInputError
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer


def scheduled_rows(num_rows, num_chunks, epochs_per_chunk, seed, epoch=0):
    """The forget rows in the order the sampler trains them."""
    blocks = schedule_blocks(num_rows, num_chunks, epochs_per_chunk, seed)
    examples = scheduled_examples([{"row": row} for row in range(num_rows)], blocks)
    sampler = ChunkedForgetSampler([len(block) for block in blocks], seed)
    sampler.set_epoch(epoch)
    return [examples[index]["row"] for index in sampler], blocks


def test_chunks_are_disjoint_and_each_is_covered_epochs_per_chunk_times_in_sequence():
    order, blocks = scheduled_rows(num_rows=11, num_chunks=3, epochs_per_chunk=2, seed=5)
    chunks = [set(blocks[2 * c].tolist()) for c in range(3)]
    assert sorted(len(chunk) for chunk in chunks) == [3, 4, 4]
    assert set().union(*chunks) == set(range(11)) and sum(len(chunk) for chunk in chunks) == 11  # disjoint, all
    start = 0
    for chunk in chunks:  # chunk 1 twice, then chunk 2 twice, then chunk 3 twice
        for _ in range(2):
            assert set(order[start : start + len(chunk)]) == chunk
            assert len(set(order[start : start + len(chunk)])) == len(chunk)
            start += len(chunk)
    assert start == len(order) == 22


def test_the_schedule_is_deterministic_under_the_seed():
    assert scheduled_rows(11, 3, 2, seed=5) [0] == scheduled_rows(11, 3, 2, seed=5)[0]
    assert scheduled_rows(11, 3, 2, seed=5)[0] != scheduled_rows(11, 3, 2, seed=6)[0]
    same_epoch, later_epoch = scheduled_rows(11, 3, 2, seed=5)[0], scheduled_rows(11, 3, 2, seed=5, epoch=1)[0]
    assert later_epoch != same_epoch  # a new Trainer epoch reshuffles within the blocks ...
    assert [set(same_epoch[i : i + 4]) for i in (0, 8)] == [set(later_epoch[i : i + 4]) for i in (0, 8)]  # ... only


def chunked_trainer(tiny_model, tiny_tokenizer, tmp_path, num_forget=4, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), loss_terms=["ga", "gd"], forget_chunks=2, epochs_per_chunk=2,
        per_device_train_batch_size=2, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
        seed=3, max_length=64,
    )  # fmt: skip
    values.update(overrides)
    return GNMTrainer(
        tiny_model, GNMConfig(**values), train_dataset=fact_rows("forget", 0, num_forget),
        retain_dataset=fact_rows("retain", 4, 8), processing_class=tiny_tokenizer,
    )  # fmt: skip


def test_retain_rows_keep_cycling_through_the_whole_retain_set(tiny_model, tiny_tokenizer, tmp_path):
    """4 forget rows, 4 retain rows, 2 chunks of 2, 2 passes each: 8 examples, each retain row paired twice, and no
    forget row meets the same retain row at both of its passes."""
    trainer = chunked_trainer(tiny_model, tiny_tokenizer, tmp_path)
    collator, dataset = trainer.data_collator, trainer.train_dataset
    pairs = [
        (dataset[index]["id"], collator.paired_retain_index(dataset[index]["pair_index"], 0))
        for index in trainer._get_train_sampler()
    ]
    assert len(pairs) == 8
    assert sorted(retain for _, retain in pairs) == [0, 0, 1, 1, 2, 2, 3, 3]
    for forget_id in {forget_id for forget_id, _ in pairs}:
        met = [retain for other, retain in pairs if other == forget_id]
        assert len(met) == 2 and met[0] != met[1]


def test_a_chunked_run_sees_every_forget_row_chunk_after_chunk(tiny_model, tiny_tokenizer, tmp_path):
    trainer = chunked_trainer(tiny_model, tiny_tokenizer, tmp_path, num_forget=6, forget_chunks=3)
    seen = []
    original_collator = trainer.data_collator

    def recording_collator(features):
        seen.extend(feature["id"] for feature in features)
        return original_collator(features)

    trainer.data_collator = recording_collator
    trainer.train()
    assert trainer.state.global_step == 6  # 6 rows x 2 passes / batch 2
    assert sorted(set(seen)) == sorted(row["id"] for row in fact_rows("forget", 0, 6))
    chunk_of_step = [frozenset(seen[i : i + 4]) for i in range(0, 12, 4)]  # each chunk: 2 rows x 2 passes
    assert all(len(chunk) == 2 for chunk in chunk_of_step) and len(set(chunk_of_step)) == 3


def test_a_chunked_run_with_max_steps_repeats_the_schedule(tiny_model, tiny_tokenizer, tmp_path):
    trainer = chunked_trainer(tiny_model, tiny_tokenizer, tmp_path, max_steps=6)
    trainer.train()
    assert trainer.state.global_step == 6 and trainer.state.epoch == pytest.approx(1.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(forget_chunks=0), "forget_chunks: expected a finite number >= 1, got 0"),
        (dict(epochs_per_chunk=0), "epochs_per_chunk: expected a finite number >= 1, got 0"),
        (dict(forget_chunks=1.5), "forget_chunks: expected an integer, got float 1.5"),
        (dict(forget_chunks=5), "forget_chunks: 5 chunks but the forget set has 4 rows; expected at most 4"),
        (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy: 'group_by_length' cannot order"),
    ],
)
def test_chunk_settings_out_of_range_are_one_line_errors(tiny_model, tiny_tokenizer, tmp_path, overrides, message):
    with pytest.raises(GNMInputError) as error:
        chunked_trainer(tiny_model, tiny_tokenizer, tmp_path, **overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["olmo-7b", "olmo-1b"])
def test_the_chunked_and_simnpo_recipes_set_their_methods(model):
    import os

    from gnm_trainer.cli.unlearn import parse_arguments

    root = os.path.join(os.path.dirname(__file__), "..", "recipes", model, "semeval25")
    _, chunked, _ = parse_arguments(["--config", os.path.join(root, "config_chunked_gd.yaml"), "--bf16", "false"])
    assert chunked.chunked_schedule and chunked.loss_terms == ["ga", "gd"] and chunked.max_steps == -1
    _, simnpo, _ = parse_arguments(["--config", os.path.join(root, "config_simnpo_gd.yaml"), "--bf16", "false"])
    assert simnpo.loss_weights == {"simnpo": 1.0, "gd": 1.0} and not simnpo.chunked_schedule


def test_two_processes_share_out_the_schedule_as_accelerate_shards_the_default_sampler():
    """What each of 2 processes iterates (accelerate's own sharding, in process): together, step by step, exactly the
    single-process schedule, so every process follows the chunks in the same order."""
    import torch
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    blocks = schedule_blocks(12, 3, 2, seed=4)
    sampler = ChunkedForgetSampler([len(block) for block in blocks], seed=4)
    per_process = []
    for rank in range(2):
        loader = DataLoader(list(range(len(sampler))), sampler=sampler, batch_size=2)
        sharded = prepare_data_loader(loader, torch.device("cpu"), num_processes=2, process_index=rank, put_on_device=False)
        per_process.append([batch.tolist() for batch in sharded])
    steps = [first + second for first, second in zip(*per_process)]  # one global batch of 4 per step
    assert len(steps) == 6 and sum(steps, []) == list(sampler)
