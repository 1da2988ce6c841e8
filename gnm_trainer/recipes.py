"""Named loss recipes: the paper's, and the recommended one.

`RECOMMENDED` is the loss that scored best on validation rows in the quality benchmark (`benchmarks/quality.py
--preset cpu`, docs/results.md): among every method it compares, SemEval-2025's winners included, the choice that did
not collapse and kept 90% of the target's retain knowledge with the best validation final score. It is GNM's
gradual negatives added to NPO and gradient descent on the retain set, at a `gnm` weight 25 times the paper's. The
recipes `recipes/*/*/config_recommended.yaml` and `gnm demo --recipe recommended` use it; a test keeps them equal to
this dict.
"""

PAPER = {"loss_terms": ["ga", "klr", "gnm"], "ga_weight": 0.5, "klr_weight": 5.0, "gnm_weight": 0.04}
RECOMMENDED = {"loss_terms": ["npo", "gd", "gnm"], "npo_weight": 1.0, "gd_weight": 5.0, "gnm_weight": 1.0}
RECIPES = {"recommended": RECOMMENDED, "paper": PAPER}


def describe(recipe: dict) -> str:
    """`npo 1 + gd 5 + gnm 1`: the terms of a recipe with their weights, then any other setting it makes
    (`, forget_completion_only_loss=False`)."""
    terms = " + ".join(f"{term} {recipe[f'{term}_weight']:g}" for term in recipe["loss_terms"])
    weights = {f"{term}_weight" for term in recipe["loss_terms"]}
    others = [f"{key}={value}" for key, value in recipe.items() if key != "loss_terms" and key not in weights]
    return ", ".join([terms, *others])
