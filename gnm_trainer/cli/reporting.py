"""`--report_to`: say what to install before training, rather than transformers' traceback at the first log."""

from ..errors import GNMInputError

# report_to values that a gnm_trainer extra (setup.cfg) installs.
REPORTING_EXTRAS = ("tensorboard", "wandb")


def check_reporting_integrations(report_to) -> None:
    """A `GNMInputError` naming what to install when `report_to` asks for an integration that is not installed
    (`pip install gnm_trainer[<extra>]` where an extra exists)."""
    from transformers.integrations import get_available_reporting_integrations

    requested = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = get_available_reporting_integrations()
    for integration in requested:
        if integration in ("none", "all") or integration in available:
            continue
        install = f"pip install 'gnm_trainer[{integration}]' (or pip install {integration})" if (
            integration in REPORTING_EXTRAS
        ) else f"install the package of '{integration}'"
        raise GNMInputError(f"report_to: '{integration}' is not installed; {install}, or choose another --report_to")
