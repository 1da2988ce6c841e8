"""`CollapseGuard`: stop an unlearning run whose model is collapsing, and keep its last good weights.

Gradient ascent has no floor: a run that is too aggressive destroys the model's general ability, which shows as a
retain-set NLL that climbs far above where it started, or as a loss that becomes NaN or infinite. The guard is fed
the values the trainer already computes on every micro-batch (`add_micro_batch`, summed over processes, so every
process decides the same), so it does not depend on `logging_steps`; it observes them once per optimizer step, the
step's micro-batches averaged (`observe`), so that `warmup` and `window` count optimizer steps whatever the gradient
accumulation.

Collapse, for the weights after `step` optimizer updates, is any observed value that is NaN or infinite, or

    nll_retain > max(max_retain_nll_ratio × reference, reference + min_retain_nll_increase)

where `reference` is the mean retain NLL of the first `warmup` optimizer steps and `nll_retain` the mean of the last
`window` steps (the absolute floor keeps a near-zero, memorised retain NLL from tripping on noise). On collapse the
guard stops training, logs a warning, records the event (`events`, `state.log_history`), and with
`action="rollback"` reloads the newest checkpoint in `output_dir` saved before the collapse, so that the final
`save_model` writes the last good weights.
"""

import collections
import glob
import math
import os
import re
from typing import Any

from transformers import TrainerCallback
from transformers.utils import logging

from .errors import GNMInputError
from .modeling import load_checkpoint_weights

logger = logging.get_logger(__name__)

ACTIONS = ("rollback", "stop")
RETAIN_KEY = "nll_retain"
LOG_PREFIX = "collapse_guard/"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def collapse_threshold(reference: float, ratio: float, min_increase: float) -> float:
    """The retain NLL above which the model counts as collapsed."""
    return max(ratio * reference, reference + min_increase)


def checkpoints_before(output_dir: str, step: int) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-<k>` folder in `output_dir` with k < `step`, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*")):
        match = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match and os.path.isdir(path) and int(match.group(1)) < step:
            found.append((int(match.group(1)), path))
    return sorted(found)


class CollapseGuard(TrainerCallback):
    """Stop (and by default roll back) a run whose retain NLL explodes or whose losses stop being finite.

    Args:
        max_retain_nll_ratio: collapse when the retain NLL exceeds this multiple of the reference (> 1).
        min_retain_nll_increase: ... and exceeds the reference by at least this many nats (>= 0).
        warmup: number of first optimizer steps whose mean retain NLL is the reference (>= 1).
        window: the retain NLL compared with the threshold is the mean of the last `window` optimizer steps (>= 1),
            so one hard batch is not a collapse; a NaN/inf value stops at the end of its step.
        action: `rollback` (stop and reload the last checkpoint saved before the collapse; plain stop when there is
            none) or `stop`.
    """

    def __init__(
        self,
        max_retain_nll_ratio: float = 3.0,
        min_retain_nll_increase: float = 0.5,
        warmup: int = 1,
        action: str = "rollback",
        window: int = 1,
    ):
        if not max_retain_nll_ratio > 1:
            raise GNMInputError(f"max_retain_nll_ratio: must be > 1, got {max_retain_nll_ratio}")
        if not min_retain_nll_increase >= 0:
            raise GNMInputError(f"min_retain_nll_increase: must be >= 0, got {min_retain_nll_increase}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise GNMInputError(f"warmup: must be an integer >= 1, got {warmup!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise GNMInputError(f"window: must be an integer >= 1, got {window!r}")
        if action not in ACTIONS:
            raise GNMInputError(f"action: {action!r}; expected one of {ACTIONS}")
        self.max_retain_nll_ratio = max_retain_nll_ratio
        self.min_retain_nll_increase = min_retain_nll_increase
        self.warmup = warmup
        self.window = window
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self.action = action
        self.events: list[dict[str, Any]] = []
        self._warmup_values: list[float] = []
        self.reference: float | None = None
        self._pending: dict[str, Any] | None = None
        self.observations = 0
        # The optimizer step being accumulated: its number, and per metric (sum over examples, examples).
        self._step: int | None = None
        self._step_sums: dict[str, list[float]] = {}
        self._reference_logged = False

    @property
    def threshold(self) -> float | None:
        if self.reference is None:
            return None
        return collapse_threshold(self.reference, self.max_retain_nll_ratio, self.min_retain_nll_increase)

    # ------------------------------------------------------------------------------------------------------------
    # The hook the trainer calls with the values it computed
    # ------------------------------------------------------------------------------------------------------------

    def add_micro_batch(self, step: int, sums: dict[str, float], count: float) -> None:
        """Add one micro-batch's training values, as sums over its `count` examples (all processes), computed on the
        weights after `step` optimizer updates (the trainer's `state.global_step` inside `compute_loss`). The step's
        values are observed at its end (`on_step_end`), or when a micro-batch of a later step arrives."""
        if self._step is not None and step != self._step:
            self.end_step()
        self._step = step
        for name, total in sums.items():
            pair = self._step_sums.setdefault(name, [0.0, 0.0])
            pair[0] += total
            pair[1] += count

    def end_step(self) -> bool:
        """Observe the accumulated step (each value's mean over the step's examples); False when there is none."""
        if self._step is None:
            return False
        step, sums = self._step, self._step_sums
        self._step, self._step_sums = None, {}
        return self.observe(step, {name: total / count for name, (total, count) in sums.items() if count})

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Check one optimizer step's training values (`nll_retain`, `loss_<term>`, ..., each its mean over the step),
        computed on the weights after `step` optimizer updates. Returns True when these values show a collapse; the
        stop itself happens at the end of the optimizer step."""
        if self._pending is not None:
            return True
        self.observations += 1
        bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
        if bad:
            self._pending = {
                "step": step,
                "reason": "non-finite",
                "metric": bad[0],
                "value": metrics[bad[0]],
                "threshold": None,
            }
            return True
        retain_nll = metrics.get(RETAIN_KEY)
        if retain_nll is None:
            return False
        if self.reference is None:
            self._warmup_values.append(retain_nll)
            if len(self._warmup_values) >= self.warmup:
                self.reference = sum(self._warmup_values) / len(self._warmup_values)
            return False
        self._recent.append(retain_nll)
        recent_mean = sum(self._recent) / len(self._recent)
        if len(self._recent) == self.window and recent_mean > self.threshold:
            self._pending = {
                "step": step,
                "reason": "retain_nll",
                "metric": RETAIN_KEY,
                "value": recent_mean,
                "threshold": self.threshold,
            }
            return True
        return False

    # ------------------------------------------------------------------------------------------------------------
    # Trainer callbacks
    # ------------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run keeps the reference it logged before (state.log_history is restored from the checkpoint)."""
        key = LOG_PREFIX + "reference_retain_nll"
        logged = [entry[key] for entry in state.log_history if key in entry]
        if logged:
            self._reference_logged = True
            if self.reference is None:
                self.reference = logged[-1]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.end_step()
        if self.reference is not None and not self._reference_logged:
            state.log_history.append({"step": state.global_step, LOG_PREFIX + "reference_retain_nll": self.reference})
            self._reference_logged = True
        if self._pending is None:
            return
        event, self._pending = self._pending, None
        control.should_training_stop = True
        control.should_save = False  # never checkpoint the collapsed weights
        event["action"] = self._act(args, event["step"], model)
        self.events.append(event)
        state.log_history.append({"step": state.global_step, **{LOG_PREFIX + key: value for key, value in event.items()}})
        threshold = "" if event["threshold"] is None else f" > threshold {event['threshold']:.4g}"
        logger.warning(
            "Collapse guard: %s = %s%s on the weights after %d optimizer steps; training stopped (%s).",
            event["metric"], event["value"], threshold, event["step"], event["action"],
        )

    def _act(self, args, collapse_step: int, model) -> str:
        """Roll back when asked and possible; return what was done, in words."""
        if self.action == "stop":
            return "stopped"
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            return "stopped; rollback is not supported under DeepSpeed/FSDP, load a checkpoint by hand"
        candidates = checkpoints_before(args.output_dir, collapse_step)
        if not candidates or model is None:
            return f"stopped; no checkpoint saved before step {collapse_step} in {args.output_dir} to roll back to"
        step, path = candidates[-1]
        load_checkpoint_weights(model, path)
        return f"rolled back to {path} (step {step})"

    # ------------------------------------------------------------------------------------------------------------
    # Report
    # ------------------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Settings, reference, threshold and events, for the run's summary and manifest."""
        return {
            "max_retain_nll_ratio": self.max_retain_nll_ratio,
            "min_retain_nll_increase": self.min_retain_nll_increase,
            "warmup": self.warmup,
            "window": self.window,
            "action": self.action,
            "reference_retain_nll": self.reference,
            "threshold": self.threshold,
            "observations": self.observations,
            "collapsed": bool(self.events),
            "events": list(self.events),
        }
