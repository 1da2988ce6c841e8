"""`gnm negatives`: generate the gradual negatives of a forget set (logic in gnm_trainer.negatives)."""

import argparse
import os
import sys

EXAMPLES = """examples:
  # model-free negatives for a LUME-layout folder (retain pool from the same folder), 4 levels
  gnm negatives --forget data/lume --backend perturb --levels 4 --output negatives/forget.jsonl

  # the paper's backend: an instruct model rewrites each level further from the truth
  gnm negatives --forget data/forget.jsonl --retain data/retain.jsonl --backend llm \\
      --generator path/or/hub-id --levels 3 --batch_size 16 --max_new_tokens 128 --output negatives/llm.jsonl

  # across 2 GPUs (each process generates a shard; the main process writes the files)
  accelerate launch --num_processes 2 -m gnm_trainer.cli negatives --forget data/lume --backend llm \\
      --generator path/or/hub-id --levels 3 --output negatives/llm.jsonl

A rerun with the same settings resumes an interrupted run (<output stem>.partial.jsonl) or reuses the finished
file; --overwrite starts again. Both <stem>.jsonl and <stem>.parquet are written.
"""


def _text_or_file(value: str | None) -> str | None:
    """The content of a file when `value` names one, else `value` itself."""
    if value is not None and os.path.isfile(value):
        from ..io_utils import read_text_file

        return read_text_file(value)  # not UTF-8: one line naming the file and line
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "negatives",
        prog="gnm negatives",
        help="generate gradual negatives for a forget set",
        description="Generate K levels of gradual negatives (level 1 slightly wrong, level K fully wrong) for each "
        "forget row, with a generator LLM (--backend llm) or by swapping facts (--backend perturb).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--forget", required=True, help="forget set: a data folder (LUME layout) or a .jsonl/.parquet file")
    p.add_argument("--retain", help="retain set (feeds the perturb pool); default: the --forget folder's retain split")
    p.add_argument("--partition", default="train", choices=("train", "validation"), help="default train")
    p.add_argument("--backend", required=True, choices=("llm", "perturb"), help="how negatives are made")
    p.add_argument("--levels", type=int, required=True, help="K, levels per forget row (e.g. 3)")
    p.add_argument("--generator", help="llm backend: generator model, a local folder or a Hub id")
    p.add_argument("--prompt_template", help="llm backend: a file or a str.format string with {prompt}, {previous}, "
                   "{level}, {levels} (default: the built-in template)")  # fmt: skip
    p.add_argument("--system_prompt", help="llm backend: a file or a string (default: the built-in system prompt)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--batch_size", type=int, default=8, help="llm backend: generation batch size (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="llm backend: new tokens per negative (default 64)")
    p.add_argument("--max_retries", type=int, default=2, help="llm backend: sampled retries of a degenerate output")
    p.add_argument("--sample", action="store_true", help="llm backend: seeded sampling instead of greedy decoding")
    p.add_argument("--output", required=True, help="output path: <stem>.jsonl and <stem>.parquet are written")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a finished or partial output exists")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import GNMInputError
    from ..negatives import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, build_negatives, negatives_paths
    from ..negatives.build import load_sources
    from ..negatives.llm import distributed_state

    if args.backend == "llm" and not args.generator:
        raise GNMInputError("--backend llm needs --generator (a model folder or Hub id)")
    forget, retain = load_sources(args.forget, args.retain, args.partition)
    rows = build_negatives(
        forget,
        args.backend,
        args.levels,
        args.output,
        retain_rows=retain,
        seed=args.seed,
        generator=args.generator,
        prompt_template=_text_or_file(args.prompt_template) or DEFAULT_TEMPLATE,
        system_prompt=DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else _text_or_file(args.system_prompt),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        max_retries=args.max_retries,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    state = distributed_state()
    if state is not None and not state.is_main_process:
        return 0
    fallbacks = sum(row["fallback"] for row in rows)
    jsonl_path, parquet_path = negatives_paths(args.output)
    print(
        f"{len(rows)} negatives ({len(rows) // max(1, args.levels)} forget rows x {args.levels} levels, "
        f"{fallbacks} perturb fallbacks) -> {jsonl_path}, {parquet_path}",
        file=sys.stderr,
    )
    return 0
