"""Push an unlearned model to the Hugging Face Hub with its generated model card.

`push_to_hub` stages exactly what will be uploaded in a temporary folder (the adapter, or merged full weights, and
the tokenizer, plus `README.md`, the card of `model_card.py`), then creates the repository and uploads the folder
with `huggingface_hub.HfApi`. `GNMTrainer.push_to_hub` (used by `gnm unlearn --push_to_hub`) goes through here, and
`GNMTrainer.save_model` writes the same card into the saved folder (`write_trainer_card`).

The token goes to `HfApi` and nowhere else: it is never logged nor written, the training state files (the pickled
`training_args.bin` holds `hub_token`) are never uploaded, the staged files are checked for it before anything is
sent, and Hub errors are re-raised as `GNMInputError` with the token scrubbed (`redact`).
"""

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import GNMInputError
from .io_utils import atomic_write_text
from .modeling import is_peft_model, save_merged
from .model_card import CARD_FILE, build_model_card, summary_from_directory, summary_from_trainer

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model unlearned with GNM"
REDACTED = "<redacted>"
# Anything shaped like a Hugging Face user access token, scrubbed even when it is not the token we were given.
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
# Files of a training run that are not part of a model (and may hold secrets: training_args.bin pickles hub_token).
NOT_UPLOADED = (
    "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
    "checkpoint-*", "runs", ".*", "_*", CARD_FILE,
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Staged files up to this size are searched for the token (weights are larger and cannot hold it as text).
TOKEN_SCAN_LIMIT = 64 * 2**20
STAGING_DIR = ".hub_upload"


def redact(text: str, token: str | None) -> str:
    """`text` with `token`, and anything shaped like a Hugging Face token, replaced by `<redacted>`."""
    if token:
        text = text.replace(token, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


# ---------------------------------------------------------------------------------------------------------------
# Staging: what will be uploaded
# ---------------------------------------------------------------------------------------------------------------


def _uploadable(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in NOT_UPLOADED)


def _copy_model_files(model_dir: str, staging: str, skip: Sequence[str] = ()) -> None:
    for name in sorted(os.listdir(model_dir)):
        if not _uploadable(name) or name in skip:
            continue
        source = os.path.join(model_dir, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(staging, name))
        else:
            shutil.copy2(source, os.path.join(staging, name))


def _stage_directory(model_dir: str, staging: str, merged: bool) -> None:
    """Copy a saved model folder's model files; with `merged`, an adapter folder becomes merged full weights."""
    if not os.path.isdir(model_dir):
        raise GNMInputError(f"{model_dir}: model folder not found")
    is_adapter = os.path.isfile(os.path.join(model_dir, "adapter_config.json"))
    if not (merged and is_adapter):
        _copy_model_files(model_dir, staging)
        return
    from peft import AutoPeftModelForCausalLM

    _copy_model_files(model_dir, staging, skip=ADAPTER_FILES)
    AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload().save_pretrained(staging)


@contextlib.contextmanager
def _hub_token_unset(args) -> Iterator[None]:
    """`Trainer.save_model` pickles the arguments into `training_args.bin`: keep the token out of that file."""
    token, args.hub_token = args.hub_token, None
    try:
        yield
    finally:
        args.hub_token = token


def _stage_trainer(trainer, staging: str, merged: bool) -> None:
    """Save the trainer's model into `staging` (every process calls this: saving gathers sharded weights)."""

    model = trainer.accelerator.unwrap_model(trainer.model)
    if merged and is_peft_model(model):
        # Merging needs the full adapter weights on the main process (single process or DDP).
        if trainer.args.should_save:
            save_merged(model, trainer.processing_class, staging)
    else:
        with _hub_token_unset(trainer.args):
            trainer.save_model(staging, _internal_call=True)
    if trainer.args.should_save:
        for name in os.listdir(staging):
            if not _uploadable(name):
                path = os.path.join(staging, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        trainer.write_manifest(staging)  # the upload carries the run's manifest beside its card


def _check_token_absent(staging: str, token: str | None) -> None:
    """Refuse to upload a staged file that contains the token (the message names the file, never the token)."""
    if not token:
        return
    needle = token.encode("utf-8")
    for folder, _, names in os.walk(staging):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.getsize(path) > TOKEN_SCAN_LIMIT:
                continue
            with open(path, "rb") as handle:
                if needle in handle.read():
                    raise GNMInputError(
                        f"{os.path.relpath(path, staging)}: this file would upload the Hub token; nothing was uploaded"
                    )


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


def upload_staged_folder(
    staging: str, repo_id: str, token: str | None, private: bool, commit_message: str, revision: str | None = None
):
    """Create `repo_id` (if needed) and upload `staging`; Hub errors become a `GNMInputError` without the token."""
    from huggingface_hub import HfApi

    from . import __version__

    count = sum(len(names) for _, _, names in os.walk(staging))
    logger.info("Uploading %d files to the Hub repository %s (private=%s).", count, repo_id, private)
    failure = None
    try:
        api = HfApi(token=token, library_name="gnm_trainer", library_version=__version__)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo, "repo_id", None) or repo_id
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message=commit_message, revision=revision
        )
    except Exception as error:  # the Hub client raises many types (HTTP, auth, validation, network)
        failure = f"{repo_id}: upload to the Hugging Face Hub failed ({type(error).__name__}: {error})"
    # Raised outside the `except` block, so the original error (which may quote the token) is not chained.
    raise GNMInputError(redact(failure, token))


def push_to_hub(
    trainer_or_model_dir,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    merged: bool = False,
    evaluation_results: Mapping[str, Any] | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | str | None = None,
    tags: Sequence[str] | str | None = None,
):
    """Upload an unlearned model and its generated model card to the Hub; returns `HfApi.upload_folder`'s result
    (None on processes other than the main one).

    Args:
        trainer_or_model_dir: a `GNMTrainer` after training (every process must call this), or a saved model folder
            (an adapter or full weights, with its tokenizer).
        repo_id: the Hub repository, `owner/name`.
        token: a Hub token with write access; None uses the token of `huggingface-cli login` / `HF_TOKEN`.
        private: create the repository as private (no effect when it exists).
        merged: upload the adapter merged into full weights (loadable with `AutoModelForCausalLM`) instead of the
            adapter alone.
        evaluation_results: SemEval results for the card: one results dict or `{"before": ..., "after": ...}`.
        license, datasets, tags: card metadata (`datasets` are Hub dataset ids; `tags` are added to ours).
    """
    if not repo_id:
        raise GNMInputError("repo_id: required (owner/name of the Hub repository)")
    is_trainer = not isinstance(trainer_or_model_dir, (str, os.PathLike))
    if is_trainer:
        trainer = trainer_or_model_dir
        # The same path on every process: saving sharded weights is collective; only the main process writes.
        staging = os.path.join(trainer.args.output_dir, STAGING_DIR)
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        trainer.accelerator.wait_for_everyone()
        _stage_trainer(trainer, staging, merged)
        if not trainer.is_world_process_zero():
            return None
        summary = summary_from_trainer(
            trainer, merged, model_name=repo_id, datasets=datasets, license=license, tags=tags
        )
    else:
        model_dir = os.fspath(trainer_or_model_dir)
        summary = summary_from_directory(model_dir, merged)
        summary.model_name = repo_id
        summary.license = license or summary.license
        summary.datasets = [datasets] if isinstance(datasets, str) else list(datasets or summary.datasets)
        summary.tags = [tags] if isinstance(tags, str) else list(tags or summary.tags)
        staging = tempfile.mkdtemp(prefix="gnm-hub-")
    try:
        if not is_trainer:
            _stage_directory(model_dir, staging, merged)
        card = build_model_card(summary, evaluation_results)
        atomic_write_text(os.path.join(staging, CARD_FILE), str(card))
        _check_token_absent(staging, token)
        return upload_staged_folder(staging, repo_id, token, private, commit_message, revision)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The GNMTrainer side (its push_to_hub and create_model_card delegate here)
# ---------------------------------------------------------------------------------------------------------------


def configured_repo_id(args) -> str:
    """The repository training arguments push to: `hub_model_id`, else the output folder's name (as `Trainer` does)."""
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def trainer_repo_id(trainer) -> str:
    """The repository a trainer pushes to: the one its Trainer set up, else `configured_repo_id`."""
    return trainer.hub_model_id or configured_repo_id(trainer.args)


def push_trainer(
    trainer,
    commit_message: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    merged: bool | None = None,
    evaluation_results: Mapping[str, Any] | None = None,
    **card_options,
):
    """`GNMTrainer.push_to_hub`: the trainer's Hub settings (`hub_model_id`, `hub_token`, `hub_private_repo`,
    `hub_revision`, `merge_adapters`) unless given; `card_options` are `Trainer.create_model_card`'s."""
    trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    return push_to_hub(
        trainer,
        trainer_repo_id(trainer),
        token=token if token is not None else trainer.args.hub_token,
        private=bool(private if private is not None else trainer.args.hub_private_repo),
        merged=trainer.args.merge_adapters if merged is None else merged,
        evaluation_results=evaluation_results,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=revision if revision is not None else trainer.args.hub_revision,
        **_card_metadata_options(card_options),
    )


def _card_metadata_options(card_options: Mapping[str, Any]) -> dict[str, Any]:
    """`Trainer.create_model_card`'s keywords that our card uses (license, dataset, tags); the others are ignored."""
    return {
        "license": card_options.get("license"),
        "datasets": card_options.get("dataset"),
        "tags": card_options.get("tags"),
    }


def write_trainer_card(
    trainer, evaluation_results: Mapping[str, Any] | None = None, output_dir: str | None = None, **card_options
) -> None:
    """`GNMTrainer.create_model_card`: write our card as `README.md` in `output_dir` (default: the trainer's output
    folder), on the main process only. It is the card `push_trainer` uploads (same repository name and summary)."""
    if not trainer.is_world_process_zero():
        return
    model_name = card_options.get("model_name") or trainer_repo_id(trainer)
    summary = summary_from_trainer(
        trainer, trainer.args.merge_adapters, model_name=model_name, **_card_metadata_options(card_options)
    )
    card = build_model_card(summary, evaluation_results)
    atomic_write_text(os.path.join(output_dir or trainer.args.output_dir, CARD_FILE), str(card))
