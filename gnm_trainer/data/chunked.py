"""Chunked sequential unlearning (AILS-NTUA, SemEval-2025 Task 4, 1st place; arXiv 2503.02443): the forget set is
split into disjoint chunks, unlearned one after another, each for `epochs_per_chunk` passes, every forget example
mixed with the next retain row of a cycle over the retain set.

The schedule is data layout, not loss math. `schedule_blocks` draws it: one block of forget rows per (chunk, pass),
shuffled. `scheduled_examples` lays the blocks out one after another as the train dataset, each example's
`pair_index` being its position there: `GNMDataCollator` pairs position k with the k-th retain row of its seeded
cycle, so the retain rows keep cycling through the whole retain set from pass to pass and chunk to chunk, and a forget
row meets other retain rows at its next pass. `ChunkedForgetSampler` yields the blocks in order.
"""

from typing import Any

import numpy as np
from torch.utils.data import Sampler


def schedule_blocks(num_rows: int, num_chunks: int, epochs_per_chunk: int, seed: int) -> list[np.ndarray]:
    """The forget row indices of each (chunk, pass), in schedule order: chunk 1's passes, then chunk 2's, and so on.

    Chunks are disjoint, drawn by a seeded permutation, their sizes differing by at most one; each pass holds its
    chunk's rows in its own seeded order.
    """
    permutation = np.random.default_rng([seed, num_rows, num_chunks]).permutation(num_rows)
    blocks = []
    for chunk_index, chunk in enumerate(np.array_split(permutation, num_chunks)):
        for pass_index in range(epochs_per_chunk):
            blocks.append(np.random.default_rng([seed, chunk_index, pass_index]).permutation(chunk))
    return blocks


def scheduled_examples(examples: list[dict[str, Any]], blocks: list[np.ndarray]) -> list[dict[str, Any]]:
    """The forget examples of every block, one block after another, each with its position as `pair_index` (the
    retain slot the collator pairs by)."""
    rows = np.concatenate(blocks)
    return [{**examples[int(row)], "pair_index": position} for position, row in enumerate(rows)]


class ChunkedForgetSampler(Sampler[int]):
    """Indices into `scheduled_examples`: its blocks in order, the indices of each block shuffled.

    A pure function of (seed, epoch): every process iterates the same order, and accelerate shards its batches as it
    does the default sampler's. Over the Trainer's epochs (`set_epoch`) the chunks and their order stay; only the
    order within each block changes.
    """

    def __init__(self, block_sizes: list[int], seed: int):
        self.block_sizes, self.seed = list(block_sizes), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.block_sizes)

    def __iter__(self):
        start = 0
        for block_index, size in enumerate(self.block_sizes):
            rng = np.random.default_rng([self.seed, self.epoch, block_index])
            yield from (start + int(offset) for offset in rng.permutation(size))
            start += size
