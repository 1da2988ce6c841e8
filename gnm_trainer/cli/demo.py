"""`gnm demo`: the whole GNM pipeline end to end on the embedded synthetic default (offline, CPU)."""

import argparse

EXAMPLES = """examples:
  gnm demo                              # everything, into ./gnm-demo
  gnm demo --output_dir /tmp/demo --max_steps 100
  gnm demo --negatives_backend llm      # negatives written by prompting the tiny target itself
  gnm demo --recipe paper               # the paper's loss instead of the recommended one (docs/results.md)
  gnm demo --pretraining_documents 0 --target_dir runs/scratch-target
                                        # a target trained from scratch: no base model, the recommended loss
                                        # without its klb term

It prints a before/after table and the attacks' figures (quantisation and relearning: how much of what was
removed comes back) and writes report.md, plot.png, attacks.png, results_before.json, results_after.json,
negatives.jsonl and the unlearned adapter (model/) into the output folder. The target model is cached
(see `gnm make-target`), so only the first run trains it.
"""


def register(subparsers) -> None:
    from ..demo import DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the embedded default",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", default=defaults.output_dir, help="where everything is written (default: %(default)s)")
    parser.add_argument("--target_dir", default=None, help="where the target is cached (default: the user cache)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--recipe", choices=["recommended", "paper"], default=defaults.recipe,
                        help="the loss: the paper's or the recommended recipe (docs/results.md) (default: %(default)s)")
    parser.add_argument("--pretraining_documents", type=int, default=defaults.pretraining_documents,
                        help="synthetic documents the target reads before it memorises the dataset, which gives it "
                        "a base model (the recommended recipe's klb term) (default: %(default)s)")
    parser.add_argument("--reference_documents", type=int, default=defaults.reference_documents,
                        help="synthetic documents the target never read, used by no reported figure: the recommended "
                        "recipe sets SimNPO's margin from their mean NLL and keeps the step at which the forget "
                        "documents look most like them, training to 4/3 of max_steps (default: %(default)s)")
    parser.add_argument("--fixed_steps", action="store_true",
                        help="the recommended recipe without its step rule: max_steps, the last step kept")
    parser.add_argument("--negatives_backend", choices=["perturb", "llm"], default=defaults.negatives_backend)
    parser.add_argument("--negative_levels", type=int, default=defaults.negative_levels)
    parser.add_argument("--max_steps", type=int, default=defaults.max_steps, help="unlearning steps (default: %(default)s)")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens, help="evaluation generation length")
    parser.add_argument("--no_attacks", action="store_true", help="skip the quantisation and relearning attacks")
    parser.add_argument("--quick", action="store_true", help="a much smaller target and a 1-step run (for tests)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(
            output_dir=args.output_dir,
            target_dir=args.target_dir,
            seed=args.seed,
            recipe=args.recipe,
            pretraining_documents=args.pretraining_documents,
            reference_documents=args.reference_documents,
            fixed_steps=args.fixed_steps,
            negatives_backend=args.negatives_backend,
            negative_levels=args.negative_levels,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            max_new_tokens=args.max_new_tokens,
            attacks=not args.no_attacks,
            quick=args.quick,
        )
    )
    return 0
