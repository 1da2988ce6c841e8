"""PEFT settings checked against the model and the run before PEFT wraps the model.

A LoRA or AdaLoRA setting that cannot work on this model or in this run ends in one line naming the setting to
change (a `GNMInputError`), or is adjusted and said in one log line; PEFT's own errors, some raised only in the middle
of training and some never raised at all (a target module name with a typo is skipped silently), never reach the user
as a traceback. Each setting is named twice, as `gnm unlearn`'s flag and as the field of the `peft_config` handed to
`GNMTrainer`: "lora_dropout (peft_config.lora_dropout)".

- `check_config`: what the config alone shows (ranks, alpha, dropout, AdaLoRA's options, the task type); the CLI calls
  it as soon as it builds the config, before any model is loaded.
- `prepare_peft_config`: `check_config`, AdaLoRA's schedule against the run's optimizer steps, and the config against
  the model (target modules, target parameters, modules to save, layers, ranks, MoE experts); returns the config to
  wrap with.
- `wrap_model`: `get_peft_model`, with whatever PEFT still refuses told in the same kind of line (`explain`).
"""

import copy
import dataclasses
import re

import torch
from transformers.utils import logging

from .errors import GNMInputError, first_line

logger = logging.get_logger(__name__)

# The `gnm unlearn` flag that sets each field of a LoRA or AdaLoRA config (`cli/unlearn.py`, TRL's ModelConfig).
FLAGS = {
    "r": "lora_r",
    "init_r": "lora_r",
    "target_r": "adalora_target_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
    "target_parameters": "lora_target_parameters",
    "modules_to_save": "lora_modules_to_save",
    "layers_to_transform": "lora_layers_to_transform",
    "tinit": "adalora_tinit",
    "tfinal": "adalora_tfinal",
    "deltaT": "adalora_delta_t",
    "use_dora": "use_dora",
    "use_rslora": "use_rslora",
    "task_type": "lora_task_type",
}
ALL_LINEAR = "all-linear"
SHOWN_NAMES = 8  # module names listed in a message


def setting(field: str) -> str:
    """How a message names a config field: the CLI flag, then the API field."""
    return f"{FLAGS.get(field, field)} (peft_config.{field})"


def _is_lora(config) -> bool:
    from peft import LoraConfig

    return isinstance(config, LoraConfig)


def _is_adalora(config) -> bool:
    from peft import AdaLoraConfig

    return isinstance(config, AdaLoraConfig)


def _method(config) -> str:
    return "AdaLoRA" if _is_adalora(config) else "LoRA"


# ---------------------------------------------------------------------------------------------------------------
# The config alone
# ---------------------------------------------------------------------------------------------------------------


def check_config(config) -> None:
    """What a LoRA or AdaLoRA config shows on its own; other PEFT methods are left to PEFT (and `explain`)."""
    if not _is_lora(config):
        return
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type not in (None, "CAUSAL_LM"):
        raise GNMInputError(f"{setting('task_type')}: {task_type}; GNMTrainer unlearns causal language models, so the "
                            "adapter must be CAUSAL_LM (or unset)")
    rank_field = "init_r" if _is_adalora(config) else "r"
    rank = getattr(config, rank_field)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GNMInputError(f"{setting(rank_field)}: expected a rank >= 1, got {rank!r}")
    if config.lora_alpha == 0:
        raise GNMInputError(f"{setting('lora_alpha')}: 0 scales the adapter's update by alpha/r = 0, so training "
                            "would change nothing; use a positive value (e.g. 2 x the rank)")
    if not 0 <= config.lora_dropout < 1:
        raise GNMInputError(f"{setting('lora_dropout')}: expected a probability in [0, 1), got {config.lora_dropout}")
    if _is_adalora(config):
        _check_adalora_options(config)


def _check_adalora_options(config) -> None:
    target_r = config.target_r
    if isinstance(target_r, bool) or not isinstance(target_r, int) or not 1 <= target_r <= config.init_r:
        raise GNMInputError(
            f"{setting('target_r')}: {config.target_r!r} is not between 1 and the initial rank {setting('init_r')} "
            f"{config.init_r}; AdaLoRA prunes ranks from the initial rank down to the target average rank"
        )
    if isinstance(config.deltaT, bool) or not isinstance(config.deltaT, int) or config.deltaT < 1:
        raise GNMInputError(f"{setting('deltaT')}: expected the steps between two rank allocations, >= 1, "
                            f"got {config.deltaT!r}")
    for name, value in (("tinit", config.tinit), ("tfinal", config.tfinal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GNMInputError(f"{setting(name)}: expected a number of steps >= 0, got {value!r}")
    if config.use_dora:
        raise GNMInputError(f"{setting('use_dora')}: AdaLoRA has no DoRA variant; turn it off or use LoRA "
                            "(peft_method lora)")
    if config.use_rslora:
        raise GNMInputError(f"{setting('use_rslora')}: AdaLoRA scales each update by its own pruned rank, not by "
                            "rsLoRA's alpha/sqrt(r); turn it off or use LoRA (peft_method lora)")
    if config.target_parameters:
        raise GNMInputError(f"{setting('target_parameters')}: AdaLoRA adapts layers, not parameters "
                            f"({sorted(config.target_parameters)}); drop them or use LoRA (peft_method lora)")


def check_adalora_schedule(config, total_steps: int) -> None:
    """AdaLoRA budgets ranks between its first `tinit` and last `tfinal` steps; PEFT refuses a schedule that leaves
    no step in between (and would raise from inside `dataclasses.replace`)."""
    if config.tinit + config.tfinal >= total_steps:
        raise GNMInputError(
            f"{setting('tinit')} + {setting('tfinal')}: {config.tinit} + {config.tfinal} = "
            f"{config.tinit + config.tfinal} steps leave AdaLoRA no rank-budgeting phase in this run's {total_steps} "
            f"optimizer step(s); make them sum to less than {total_steps}, or train longer (max_steps, "
            "num_train_epochs)"
        )


# ---------------------------------------------------------------------------------------------------------------
# The config against the model and the run
# ---------------------------------------------------------------------------------------------------------------


def prepare_peft_config(config, model, total_steps: int, disable_dropout: bool = True):
    """The config to wrap `model` with, checked against the model and a run of `total_steps` optimizer steps:
    AdaLoRA's `total_step` set to them, and `lora_dropout` set to 0 (said in one log line) where PEFT cannot apply
    dropout and `disable_dropout` would zero it anyway. Raises a one-line `GNMInputError` naming the setting."""
    if not _is_lora(config):
        return config
    check_config(config)
    if _is_adalora(config):
        if config.total_step not in (None, total_steps):
            logger.warning("AdaLoRA total_step %s replaced by the training length %s.", config.total_step, total_steps)
        check_adalora_schedule(config, total_steps)
        config = dataclasses.replace(config, total_step=total_steps)
    resolved = _resolved(config, model)
    check_layers_to_transform(config, model)
    targeted = _check_target_modules(config, resolved, model)
    wrapped = _check_target_parameters(resolved, model, targeted)
    _check_modules_to_save(config, model, targeted, wrapped)
    config = _fit_dropout_to_parameters(config, wrapped, disable_dropout)
    _say_ranks_above_dimensions(config, model, targeted)
    return config


def _resolved(config, model):
    """A copy of `config` as PEFT will read it: on MoE models whose experts transformers 5 fuses into parameters,
    PEFT turns `all-linear` and module names of the experts into `target_parameters` (its conversion for
    transformers 5; nothing changes on other models)."""
    resolved = copy.deepcopy(config)
    resolved.modules_to_save = None  # PEFT's matching skips modules to save: the overlap is checked on its own
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the conversion: the names are read as given
        return resolved
    try:
        convert_peft_config_for_transformers(resolved, model, None)
    except ValueError as error:
        raise GNMInputError(explain(error, config, model)) from error
    return resolved


def _module_matches(config, name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, name))


def _linear_names(model) -> list[str]:
    """The leaf names of the model's linear layers (q_proj, ...), its output layer left out, for messages."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output}
    return sorted(names)


def _named(names, limit: int = SHOWN_NAMES) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _targeted_modules(resolved, model) -> list[str]:
    """The names of the modules PEFT will adapt (all-linear: every linear layer but the output layer)."""
    from transformers.pytorch_utils import Conv1D

    target = resolved.target_modules
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output]
    if target is None:
        return []
    return [name for name, _ in model.named_modules() if name and _module_matches(resolved, name)]


def _check_target_modules(config, resolved, model) -> list[str]:
    """Every target module name must match a module of the model (PEFT skips a name that matches nothing as long as
    another one matches: a typo would leave layers out silently). Returns the targeted modules' names."""
    target = resolved.target_modules
    if config.target_modules is None:  # PEFT's default modules for the model type, if it has some
        defaults = _default_targets(config, model)
        if defaults is None and not resolved.target_parameters:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise GNMInputError(
                f"{setting('target_modules')}: not set, and PEFT knows no default modules for this model type "
                f"({model_type}); name them, e.g. all-linear, or some of {_named(_linear_names(model))}"
            )
        with_defaults = copy.copy(resolved)
        with_defaults.target_modules = set(defaults or [])
        return _targeted_modules(with_defaults, model)
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target, str):
        unmatched = [] if target.lower() == ALL_LINEAR or any(re.fullmatch(target, n) for n in names) else [target]
    else:
        unmatched = sorted(t for t in target if not any(n == t or n.endswith("." + t) for n in names))
    if unmatched:
        listed = "{" + ", ".join(repr(name) for name in unmatched) + "}"
        raise GNMInputError(
            f"peft_config: Target modules {listed} not found in the base model; {setting('target_modules')} must "
            f"name modules of the model: its linear layers are {_named(_linear_names(model))} (or all-linear)"
        )
    return _targeted_modules(resolved, model)


def _default_targets(config, model):
    """PEFT's default target modules for this model type and method, or None."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    mapping = (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING if _is_adalora(config)
               else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    return mapping.get(getattr(getattr(model, "config", None), "model_type", None))


def _check_target_parameters(resolved, model, targeted: list[str]) -> list[str]:
    """Every target parameter name must match a parameter of a layer that is not adapted as a module already;
    returns the names of the parameters PEFT will wrap."""
    targets = sorted(resolved.target_parameters or [])
    names = [name for name, _ in model.named_parameters()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise GNMInputError(
            f"{setting('target_parameters')}: {unmatched} match no parameter of the model; name parameters as "
            "they appear in model.named_parameters(), e.g. mlp.experts.gate_up_proj"
        )
    wrapped = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    twice = [n for n in wrapped if n.rsplit(".", 1)[0] in set(targeted)]
    if twice:
        raise GNMInputError(
            f"{setting('target_parameters')}: in layers that {setting('target_modules')} adapts already (all-linear "
            f"takes every linear layer): {_named(twice, 3)}; adapt a layer either as a module or by its parameter"
        )
    return wrapped


def _check_modules_to_save(config, model, targeted: list[str], wrapped: list[str]) -> None:
    """Modules trained in full must exist and must not be adapted as well (PEFT then adapts nothing, or refuses)."""
    saved = list(config.modules_to_save or [])
    if not saved:
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [entry for entry in saved if not any(name.endswith(entry) for name in names)]
    if unmatched:
        raise GNMInputError(
            f"{setting('modules_to_save')}: {unmatched} match no module of the model, so nothing would be trained "
            f"in full; name modules of the model, e.g. lm_head or embed_tokens"
        )
    owners = {name.rsplit(".", 1)[0] for name in wrapped}
    both = sorted(name for name in names if any(name.endswith(entry) for entry in saved)
                  and (name in targeted or name in owners))
    if both:
        raise GNMInputError(
            f"{setting('modules_to_save')}: also adapted by {setting('target_modules')} or lora_target_parameters: "
            f"{_named(both, 3)}; a module is either adapted or trained in full, take it out of one of them"
        )


def _fit_dropout_to_parameters(config, wrapped: list[str], disable_dropout: bool):
    """PEFT's LoRA on a parameter (`lora.ParamWrapper`: MoE experts, `target_parameters`) cannot apply dropout."""
    if not wrapped or not config.lora_dropout:
        return config
    where = f"{_named(wrapped, 3)} (LoRA on parameters, PEFT's lora.ParamWrapper, which has no dropout)"
    if disable_dropout:
        logger.warning("%s: %s set to 0 before PEFT wraps the model, as disable_dropout zeroes it anyway: it adapts "
                       "%s", setting("lora_dropout"), config.lora_dropout, where)
        return dataclasses.replace(config, lora_dropout=0.0)
    raise GNMInputError(
        f"{setting('lora_dropout')}: {config.lora_dropout}, but the adapter covers {where}; set lora_dropout to 0, "
        "or leave disable_dropout on (it zeroes every dropout)"
    )


def _say_ranks_above_dimensions(config, model, targeted: list[str]) -> None:
    """A rank above a layer's smaller dimension is allowed by PEFT but adds parameters, not capacity: one log line."""
    field = "init_r" if _is_adalora(config) else "r"
    rank = getattr(config, field)
    narrow = []
    for name in targeted:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or (weight is not None and weight.dim() == 2):
            if rank > min(weight.shape):
                narrow.append((name, tuple(weight.shape)))
    if narrow:
        name, shape = narrow[0]
        logger.warning(
            "%s: %s is above the smaller dimension of %d of the %d adapted layers (e.g. %s, weight %s): an update of "
            "such a layer cannot have a rank above that dimension, so the extra ranks add parameters, not capacity",
            setting(field), rank, len(narrow), len(targeted), name, "x".join(map(str, shape)),
        )


def check_layers_to_transform(peft_config, model) -> None:
    """A one-line error naming the option when PEFT's `layers_to_transform` picks a layer the model does not have
    (PEFT itself skips such an index silently, or fails only when no layer at all matches)."""
    layers = getattr(peft_config, "layers_to_transform", None)
    if layers is None:
        return
    layers = [layers] if isinstance(layers, int) else list(layers)
    num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    outside = [index for index in layers if num_layers is not None and not 0 <= index < num_layers]
    if outside:
        raise GNMInputError(
            f"lora_layers_to_transform (peft_config.layers_to_transform): layer(s) {outside} outside the model's "
            f"{num_layers} layers; expected indices from 0 to {num_layers - 1}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Wrapping, and what PEFT still refuses
# ---------------------------------------------------------------------------------------------------------------


def wrap_model(model, config):
    """`get_peft_model(model, config)`; a setting PEFT refuses is a one-line `GNMInputError` (`explain`)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as error:  # PEFT's config checks: a setting that does not fit the model
        raise GNMInputError(explain(error, config, model)) from error


def build_config(make, **fields):
    """`make(**fields)` (the CLI's LoRA or AdaLoRA config: a config class, or a function that builds one), its
    refusals told as `explain` tells them."""
    try:
        return make(**fields)
    except (ValueError, TypeError) as error:
        raise GNMInputError(explain(error)) from error


def explain(error: BaseException, config=None, model=None) -> str:
    """One line for an error PEFT raised about a setting: the setting to change, then PEFT's reason."""
    message = " ".join(str(error).split())
    unsupported = re.match(r"Target module (\w+)\(", message)
    if unsupported and "is not supported" in message:
        module = _first_module_of_class(config, model, unsupported.group(1))
        kinds = ("linear and Conv1D layers" if config is not None and _is_adalora(config)
                 else "linear, embedding and convolution layers")
        return (f"{setting('target_modules')}: {module or 'a module'} is of type {unsupported.group(1)}, which "
                f"{_method(config) if config is not None else 'PEFT'} cannot adapt (it adapts {kinds}); name such "
                "layers inside it instead, or use all-linear (LoRA on an MoE's fused experts: lora_target_parameters)")
    rules = (
        (r"does not work with lora_dropout", "lora_dropout",
         "LoRA on a parameter (PEFT's lora.ParamWrapper: MoE experts, target_parameters) has no dropout; set it to 0"),
        (r"does not work with use_dora|does not support DoRA", "use_dora",
         "DoRA does not apply here; turn it off"),
        (r"without also targeting .* because they are fused", "target_modules", None),
        (r"Please specify `target_modules` or `target_parameters`|No `target_modules` passed", "target_modules",
         "name the modules to adapt, e.g. all-linear"),
        (r"Trying to wrap an `nn.Parameter`", "target_parameters",
         "a layer is adapted either as a module (lora_target_modules) or by its parameter, not both"),
        (r"modules_to_save cannot be applied|only targeted modules that are marked to be saved", "modules_to_save",
         "a module is either adapted or trained in full"),
        (r"No modules were targeted|not found in the base model|no parameter was matched", "target_modules", None),
        (r"`r` should be a positive integer", "r", None),
        (r"schedule values don't allow for a budgeting phase", "tinit", None),
        (r"unexpected keyword argument 'parameter_name'", "target_parameters",
         "AdaLoRA adapts layers, not parameters; drop them or use LoRA"),
    )
    for pattern, field, advice in rules:
        if re.search(pattern, message):
            return f"{setting(field)}: {first_line(error)}" + (f"; {advice}" if advice else "")
    return f"peft_config: {message}"


def _first_module_of_class(config, model, class_name: str) -> str | None:
    if config is None or model is None:
        return None
    for name, module in model.named_modules():
        if name and type(module).__name__ == class_name and (
                isinstance(config.target_modules, str) or _module_matches(config, name)):
            return name
    return None
