"""The measurements of `benchmarks/speed.py`, one module each.

- `common`: presets, data, models, clocks and the `padding_free` option shared by all of them.
- `training`: (a) a GNMTrainer step against the published loop, and (b) against its packed compute floor.
- `memory`: (c) peak memory, one interpreter per variant.
- `evaluation`: (d) `evaluate_model` against the organisers' loop.
- `negatives`: (e) `generate_llm_negatives` batched against one row at a time.
- `report`: targets, verdicts, the table and the machine.
"""
