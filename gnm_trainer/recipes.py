"""Named loss recipes: the paper's, and the recommended one.

`RECOMMENDED` is the loss that scored best on validation rows in the quality benchmark (`benchmarks/quality.py
--preset cpu`, docs/results.md), among every method it compares, SemEval-2025's winners included: SimNPO on whole
forget documents with a margin, gradient descent on the retain set (weight 5) and GNM's gradual negatives (weight
0.2). It was also the best of all methods on the train rows (final score without MMLU 0.64 against 0.45 for the
next method).

The margin `simnpo_delta` is where SimNPO stops raising a forget document's mean NLL. It depends on the target:
`calibrated_margin` gives it from the mean NLL the target gives documents it never read (`gnm evaluate` prints it as
"MIA mean document NLL: ... non-members"; `mia_mean_nll` in its results), so that forgotten documents end where the
non-members are, which is what the membership attack compares. The recipes `recipes/*/*/config_recommended.yaml`
and `gnm demo --recipe recommended` use it; a test keeps them equal to this dict.
"""

PAPER = {"loss_terms": ["ga", "klr", "gnm"], "ga_weight": 0.5, "klr_weight": 5.0, "gnm_weight": 0.04}
RECOMMENDED = {"loss_terms": ["simnpo", "gd", "gnm"], "simnpo_weight": 1.0, "gd_weight": 5.0, "gnm_weight": 0.2,
               "forget_completion_only_loss": False}
RECIPES = {"recommended": RECOMMENDED, "paper": PAPER}
# The benchmark chose δ 5 among 3, 4 and 5 on validation, for a target whose non-members sit at 5.52 nats.
MARGIN_SHARE_OF_NONMEMBER_NLL = 0.9


def calibrated_margin(nonmember_nll: float) -> float:
    """`simnpo_delta` for the recommended recipe: 0.9 x the target's mean non-member document NLL, to 0.1 nat."""
    return round(MARGIN_SHARE_OF_NONMEMBER_NLL * nonmember_nll, 1)


def describe(recipe: dict) -> str:
    """`npo 1 + gd 5 + gnm 1`: the terms of a recipe with their weights, then any other setting it makes
    (`, forget_completion_only_loss=False`)."""
    terms = " + ".join(f"{term} {recipe[f'{term}_weight']:g}" for term in recipe["loss_terms"])
    weights = {f"{term}_weight" for term in recipe["loss_terms"]}
    others = [f"{key}={value}" for key, value in recipe.items() if key != "loss_terms" and key not in weights]
    return ", ".join([terms, *others])
