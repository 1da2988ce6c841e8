"""`gnm make-target`: train a tiny model that memorises a LUME-format dataset (the target to unlearn)."""

import argparse
import sys

EXAMPLES = """examples:
  # the embedded default: synthetic LUME-format data, a 4-layer hidden-256 Llama (about a minute on 2 CPU cores)
  gnm make-target --output_dir runs/target

  # a deterministic subset of the real LUME data: 20 Task2 documents per split
  gnm make-target --data ../shared/data/lume --tasks Task2 --max_documents_per_split 20 --output_dir runs/lume-target

  # a target with a base model: it first reads 300 other synthetic documents (kept in <output-dir>/pretrained,
  # the base model of the klb term); a LUME folder brings its own in pretraining.jsonl
  gnm make-target --pretraining_documents 300 --output_dir runs/pretrained-target

  # then score or unlearn it; the data it was trained on is in <output-dir>/data
  gnm evaluate --model runs/target --data runs/target/data

A second run with the same data and settings finds the finished target and returns at once (--force retrains).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-target",
        prog="gnm make-target",
        help="train a tiny model that memorises a LUME-format dataset",
        description=(
            "Train a byte-level BPE tokenizer and a tiny Llama from scratch and fine-tune it until it memorises the "
            "forget and retain train rows (greedy ROUGE-L recall >= 0.95 on sentence completion, exact match >= 0.9 "
            "on QA) and the MIA member documents: the target model to unlearn. The output folder holds the model "
            "and tokenizer, data/ (the rows it was trained on) and target_info.json."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default=None, help="LUME-format folder (default: the synthetic dataset)")
    parser.add_argument("--output_dir", default=None, help="where to write the target (default: the user cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic data, the model and the order")
    parser.add_argument("--force", action="store_true", help="retrain even when the output folder is up to date")
    parser.add_argument(
        "--max_documents_per_split", type=int, default=None, help="keep at most N documents per split (seeded)"
    )
    parser.add_argument("--tasks", nargs="+", default=None, choices=("Task1", "Task2", "Task3"), help="tasks to keep")
    parser.add_argument("--include_validation", action="store_true", help="train on the validation rows too")
    parser.add_argument("--pretraining_documents", type=int, default=0,
                        help="synthetic documents in no split that the target reads first, which gives it a base "
                        "model in <output_dir>/pretrained (only without --data; default: %(default)s)")
    parser.add_argument("--pretraining_epochs", type=int, default=3,
                        help="epochs over the pretraining documents (default: %(default)s)")
    parser.add_argument("--pretraining_replay", type=float, default=1.0,
                        help="pretraining blocks replayed per memorised row in every epoch (default: %(default)s)")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs per round: a cosine cycle from --learning_rate to 0 (default: %(default)s)")
    parser.add_argument("--max_epochs", type=int, default=None,
                        help="the budget: rounds follow one another until memorised or this many epochs have run; "
                        "then the command fails with the scores reached and writes nothing (default: 4 x --epochs)")
    parser.add_argument("--learning_rate", type=float, default=1e-3,
                        help="peak rate of each round (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512, help="longest training sequence, in tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Make the target; 1, with the scores reached (one line per split), when the budget ran out before the bar."""
    from ..errors import GNMInputError
    from ..target import TargetNotMemorisedError, make_target, read_target_info

    from ..data.synthetic import synthetic_target_data

    if args.pretraining_documents < 0:
        raise GNMInputError(f"pretraining_documents: expected an integer >= 0, got {args.pretraining_documents}")
    if args.pretraining_documents and args.data is not None:
        raise GNMInputError(f"pretraining_documents: only for the synthetic dataset; {args.data} brings its own "
                            "pretraining documents in pretraining.jsonl")
    data = args.data if args.data is not None else synthetic_target_data(args.seed, args.pretraining_documents)
    try:
        output_dir = make_target(
            data=data,
            output_dir=args.output_dir,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            vocab_size=args.vocab_size,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_length=args.max_length,
            pretraining_epochs=args.pretraining_epochs,
            pretraining_replay=args.pretraining_replay,
            include_validation=args.include_validation,
            max_documents_per_split=args.max_documents_per_split,
            tasks=args.tasks,
            force=args.force,
            progress=not args.quiet,
            max_epochs=args.max_epochs,
        )
    except TargetNotMemorisedError as error:
        print(f"gnm make-target: error: not memorised after {error.history['epochs']} epochs "
              f"(--max_epochs {error.config.max_epochs}); nothing written", file=sys.stderr)
        for line in error.figures:
            print(f"  {line}", file=sys.stderr)
        return 1
    info = read_target_info(output_dir) or {}
    figures = ", ".join(
        f"{split}: sc ROUGE-L recall {scores['sc_rougeL_recall']:.3f}, QA exact match {scores['qa_exact_match']:.3f}"
        for split, scores in info.get("memorisation", {}).items()
    )
    print(f"{output_dir}: memorised after {info.get('epochs')} epochs ({figures})")
    return 0
