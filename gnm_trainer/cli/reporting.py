"""`--report_to`: say which extra to install before training, rather than transformers' traceback at the first log."""

from ..errors import GNMInputError

# report_to value -> the gnm_trainer extra (setup.cfg) that installs it.
REPORTING_EXTRAS = ("tensorboard", "wandb")


def _available(integration: str) -> bool:
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[integration]()


def check_reporting_integrations(report_to) -> None:
    """A `GNMInputError` naming `pip install gnm_trainer[<extra>]` when `report_to` asks for one that is missing."""
    requested = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for integration in REPORTING_EXTRAS:
        if integration in requested and not _available(integration):
            raise GNMInputError(
                f"report_to: '{integration}' is not installed; pip install 'gnm_trainer[{integration}]' "
                f"(or pip install {integration}), or choose another --report_to"
            )
