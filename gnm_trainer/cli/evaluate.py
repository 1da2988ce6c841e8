"""`gnm evaluate`: score a saved model with the SemEval-2025 Task 4 metric and write results, report and plot."""

import argparse

EXAMPLES = """examples:
  # forget/retain train partition of a LUME folder, with the membership attack
  gnm evaluate --model out/unlearned --data data/lume --mia_data data/lume/mia --output_dir out/eval

  # validation partition, MMLU taken from an earlier run, report compared with the model before unlearning
  gnm evaluate --model out/unlearned --data data/lume --partition validation \\
      --mmlu_score mmlu.json --baseline_results out/eval-target/evaluation_results.json

  # the leaderboard's setting: bf16, one example at a time, as the organisers' script runs
  gnm evaluate --model out/unlearned --data data/lume --dtype bfloat16 --batch_size 1

  # a model trained with the paper's template, prompted in that format (a diagnostic, not the official score)
  gnm evaluate --model out/paper --data data/lume --text_template "{prompt} >> {completion} is the answer."

  # attacks: is the forgetting robust to 8-/4-bit quantisation and to relearning on half the forget documents?
  gnm evaluate --model out/unlearned --data data/lume --attacks quant8,quant4,relearn --target_model out/target

  # several GPUs: each process scores a shard, the main process writes the files
  accelerate launch --multi_gpu --num_processes 4 "$(which gnm)" evaluate --model out/unlearned --data data/lume

Writes evaluation_results.json (the official keys, plus the settings used), per_example.jsonl, report.md and
plot.png into --output_dir. The model is loaded in float32 by default: batched and one-at-a-time generation then
give the same tokens. The organisers loaded bf16 and generated one example at a time (--dtype bfloat16
--batch_size 1 reproduces the leaderboard's numbers); batched bf16 generation can differ from one-at-a-time bf16.
Without MIA documents or an MMLU score the final score is the mean of the terms available, and the results say which.
With --attacks the figures go under "attacks" in evaluation_results.json (recovery 0: nothing came back, 1: everything
the unlearning removed came back; see the README), into report.md and attacks.png. quant8/quant4 need bitsandbytes
(pip install 'gnm_trainer[attacks]').
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a model with the SemEval-2025 Task 4 metric",
        description="Score a model with the SemEval-2025 Task 4 (LUME) metric: ROUGE-L recall on sentence "
        "completion, exact match on QA, their harmonic mean (forget inverted), MIA AUC and the final score.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a saved model folder (or PEFT adapter folder) or a Hub id")
    p.add_argument("--data", required=True, help="a folder holding the forget and retain files (LUME layout)")
    p.add_argument("--partition", choices=("train", "validation"), default="train",
                   help="which LUME partition to read (default: train)")
    p.add_argument("--mia_data", default=None,
                   help="folder with member.jsonl and nonmember.jsonl (or mia/ holding them); rows need 'document'")
    p.add_argument("--mmlu_score", default=None,
                   help="an MMLU average (0..1), or a JSON file holding 'mmlu_average' (or 'average_acc')")
    p.add_argument("--run_mmlu", action="store_true",
                   help="run MMLU with lm_eval when it is installed and no --mmlu_score is given")
    p.add_argument("--baseline_results", default=None,
                   help="an earlier evaluation_results.json to show as 'before' in the report")
    p.add_argument("--batch_size", type=int, default=16, help="prompts/documents per forward pass (default: 16)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="greedy tokens generated per prompt (default: 256)")
    # The choices are checked by the evaluation (DTYPES), which this parser does not import: `gnm --help` stays light.
    p.add_argument("--dtype", default="float32",
                   help="precision the model is loaded in: float32 (default; batch-invariant), bfloat16 (the "
                   "organisers', with --batch_size 1), float16, or auto (the checkpoint's)")
    p.add_argument("--text_template", default=None,
                   help="the training text template (GNMConfig.text_template): prompt with its prompt side and score "
                   "without its closing text (default: raw prompts, the official format; MIA documents stay raw)")
    attacks = p.add_argument_group("attacks on the unlearned model (see the README's evaluation section)")
    attacks.add_argument("--attacks", default=None,
                         help="comma-separated: quant8, quant4 (bitsandbytes reload), relearn (fine-tune on half the "
                         "forget documents, score the other half)")
    attacks.add_argument("--target_model", default=None,
                         help="the model before unlearning, evaluated on the same rows for the recovery figures")
    attacks.add_argument("--target_results", default=None,
                         help="instead of --target_model: the target's evaluation_results.json on the same data "
                         "(with its per_example.jsonl beside it)")
    attacks.add_argument("--relearn_steps", type=int, default=None, help="relearning optimizer steps (default: 20)")
    attacks.add_argument("--relearn_learning_rate", type=float, default=None,
                         help="relearning learning rate (default: 1e-3)")
    attacks.add_argument("--relearn_lora_r", type=int, default=None,
                         help="relearning LoRA rank; 0 fine-tunes every weight (default: 8)")
    attacks.add_argument("--attack_seed", type=int, default=0,
                         help="seed of the relearning split, LoRA initialisation and batch order (default: 0)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars during generation and MIA")
    p.add_argument("--output_dir", default="evaluation", help="where to write the results (default: ./evaluation)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import GNMInputError
    from ..evaluation import evaluate_path
    from ..evaluation.evaluator import is_main_process

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise GNMInputError("--batch_size and --max_new_tokens must be at least 1")
    results = evaluate_path(
        args.model, args.data, args.output_dir, mia_dir=args.mia_data, mmlu_score=args.mmlu_score,
        partition=args.partition, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        run_mmlu=args.run_mmlu, baseline_results=args.baseline_results, dtype=args.dtype,
        text_template=args.text_template, show_progress=not args.no_progress, **_attack_arguments(args),
    )
    if is_main_process():
        summary = {key: results[key] for key in ("harmonic-mean-task-aggregate", "mia_loss_acc", "mia_final_score",
                                                 "mmlu_average", "aggregate-score")}
        print(" ".join(f"{key}={'-' if value is None else f'{value:.4f}'}" for key, value in summary.items()))
        if results["mia_mean_nll"]:
            print("MIA mean document NLL: members {members:.3f}, non-members {nonmembers:.3f}".format(
                **results["mia_mean_nll"]))
        if "attacks" in results:
            from ..evaluation.report import attack_summary_line

            print(attack_summary_line(results["attacks"]))
        print(f"wrote {args.output_dir}/evaluation_results.json, per_example.jsonl, report.md, plot.png"
              + (", attacks.png" if "attacks" in results else ""))
    return 0


def _attack_arguments(args) -> dict:
    """`attacks` and `attack_options` for `evaluate_path` from the attack flags (options not given keep their
    defaults); attack flags without --attacks are an error rather than silently unused."""
    from ..errors import GNMInputError

    options = {"relearn_steps": args.relearn_steps, "relearn_learning_rate": args.relearn_learning_rate,
               "relearn_lora_r": args.relearn_lora_r}
    options = {key: value for key, value in options.items() if value is not None}
    if args.target_model and args.target_results:
        raise GNMInputError("--target_model and --target_results: give one of them (the target's scores come from "
                            "either)")
    target = args.target_model or args.target_results
    if not args.attacks:
        if options or target:
            raise GNMInputError("--target_model/--target_results/--relearn_*: they set up attacks; add --attacks "
                                "(e.g. --attacks quant8,quant4,relearn)")
        return {}
    return {"attacks": args.attacks, "attack_options": {**options, "target": target, "seed": args.attack_seed}}
