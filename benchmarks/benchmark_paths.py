"""Where the benchmarks live and where they find LUME: one place for the scripts of this folder to import."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)  # the checkout: where every benchmark command runs
RESULTS = os.path.join(HERE, "results")  # ignored by git
# The shared LUME folder beside the checkout (`../shared/data/lume`); each script falls back when it is absent.
DEFAULT_LUME = os.path.join(HERE, "..", "..", "shared", "data", "lume")
