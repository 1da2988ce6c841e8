"""`gnm merge`: merge saved LoRA adapters into one with TIES (logic in gnm_trainer.merging)."""

import argparse

EXAMPLES = """examples:
  # ZJUKLAB's merge: an over- and an under-forgetting adapter, weights 1.0 each, TIES keeping 80% of each update
  gnm merge runs/npo_gd_klr_over runs/npo_gd_klr_under --output_dir runs/merged

  # other weights and density; a base model that moved since the adapters were trained
  gnm merge runs/a runs/b --weights 0.7 0.3 --density 0.5 --base_model /models/target --output_dir runs/merged

  # then score the merged adapter like any other
  gnm evaluate --model runs/merged --data data/lume --output_dir runs/merged-eval

Writes the merged adapter (adapter_config.json, adapter_model.safetensors), the tokenizer, merge_info.json and a
README.md model card into --output_dir, which appears whole or not at all. The adapters must be LoRA adapters of
the same base model over the same modules (and, for ties and linear, of the same rank).
"""


def register(subparsers) -> None:
    from ..merging import COMBINATION_TYPES, DEFAULT_DENSITY, MAJORITY_SIGN_METHODS

    p = subparsers.add_parser(
        "merge",
        help="merge LoRA adapters into one with TIES",
        description="Merge saved LoRA adapters of the same base model into one adapter with PEFT's "
        "add_weighted_adapter (TIES by default), as ZJUKLAB did at SemEval-2025 Task 4 (arXiv 2503.21088).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="two or more LoRA adapter folders")
    p.add_argument("--output_dir", required=True, help="where to write the merged adapter")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per adapter (default: 1.0 each, ZJUKLAB's)")
    p.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                   help=f"share (0, 1] of each update's entries TIES keeps (default: {DEFAULT_DENSITY}, ZJUKLAB's)")
    p.add_argument("--combination_type", choices=COMBINATION_TYPES, default="ties",
                   help="PEFT's merge method (default: ties)")
    p.add_argument("--majority_sign_method", choices=MAJORITY_SIGN_METHODS, default="total",
                   help="how TIES elects each entry's sign (default: total)")
    p.add_argument("--base_model", default=None,
                   help="the base model to load (default: the adapters' base_model_name_or_path)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merging import merge_adapters

    output_dir = merge_adapters(
        args.adapters, args.output_dir, weights=args.weights, combination_type=args.combination_type,
        density=args.density, base_model=args.base_model, majority_sign_method=args.majority_sign_method,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    print(f"merged {len(args.adapters)} adapters ({args.combination_type}) into {output_dir}")
    return 0
