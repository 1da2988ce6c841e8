"""`gnm calibrate`: SimNPO's margin for the recommended recipe, from reference documents that no reported figure uses.

The recommended recipe stops SimNPO's ascent where a forget document's mean NLL reaches the level of text the model
never read. That level is measured on *reference documents*: text of the forget documents' kind that the model never
read and that no evaluation reports on. Never the MIA non-members of the evaluation: a margin set on them makes their
membership score look better than it is; given `--mia_data`, reference documents that are also its non-members are
refused.
"""

import argparse

EXAMPLES = """examples:
  gnm calibrate --model_name_or_path ./target --reference_documents reference.jsonl --mia_data data/lume
  gnm calibrate --model_name_or_path ./target --reference_documents reference.jsonl --base_model ./target/pretrained

Reference documents: a jsonl/parquet file with a 'document' field per row (or a folder holding reference.jsonl).
For LUME-like data, hold out documents of the non-members' kind that no figure you report uses (e.g. part of the
validation non-members); for your own data, documents written like the forget set that the model never trained on.
It prints their mean NLL and the simnpo_delta to put in the recipe (config_recommended.yaml).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="SimNPO's margin for the recommended recipe, from reference documents",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model_name_or_path", required=True, help="the model to unlearn (a folder or a Hub id)")
    parser.add_argument("--reference_documents", required=True,
                        help="documents of the forget documents' kind that the model never read and that no reported "
                        "figure uses (a file with a 'document' field per row, or a folder with reference.jsonl)")
    parser.add_argument("--base_model", default=None,
                        help="the model before it read the forget set: the recipe then has its klb term (and a margin "
                        "at the reference level); without it, the recipe without klb (a margin at 0.9 of it)")
    parser.add_argument("--mia_data", default=None,
                        help="the MIA folder an evaluation will report on: reference documents among its non-members "
                        "are refused")
    parser.add_argument("--batch_size", type=int, default=16, help="documents per forward pass (default: 16)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import GNMInputError
    from .best_on_membership import REFERENCE_FILE
    from .best_on_validation import load_documents_option

    if args.batch_size < 1:
        raise GNMInputError(f"batch_size: expected an integer >= 1, got {args.batch_size}")
    reference = load_documents_option(args.reference_documents, "reference_documents", REFERENCE_FILE)
    if args.mia_data is not None:
        from ..evaluation import load_mia_documents
        from ..evaluation.membership import refuse_evaluation_documents

        refuse_evaluation_documents(reference, load_mia_documents(args.mia_data)[1], "reference_documents",
                                    f"the MIA non-members of {args.mia_data}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model_loading import from_pretrained
    from ..recipes import describe, recommended_recipe, reference_nll

    model = from_pretrained(AutoModelForCausalLM, args.model_name_or_path, "model_name_or_path").eval()
    tokenizer = from_pretrained(AutoTokenizer, args.model_name_or_path, "model_name_or_path")
    level = reference_nll(model, tokenizer, reference, args.batch_size)
    recipe = recommended_recipe(level, args.base_model)
    print(f"reference documents: {len(reference)}, mean document NLL {level:.3f}")
    print(f"simnpo_delta: {recipe['simnpo_delta']}")
    print(f"recommended recipe: {describe(recipe)}")
    return 0
