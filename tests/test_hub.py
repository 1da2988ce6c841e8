"""Hub push and model card, offline: a recorded fake of `HfApi` captures exactly what would be uploaded."""

import logging
import os
import json
import pathlib
import shutil
import sys
import traceback
import types

import huggingface_hub
import pytest
import torch
from conftest import fact_rows
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from gnm_trainer import hub
from gnm_trainer.errors import GNMInputError
from gnm_trainer.evaluation import evaluate_model
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.model_card import RunSummary, build_model_card, command_from_argv
from gnm_trainer.negatives import perturb_negatives
from gnm_trainer.target import build_tiny_llama

TOKEN = "hf_PLANTEDtoken123"
BASE_ID = "tiny-org/tiny-llama"
REPO_ID = "someone/tiny-llama-gnm"


class FakeHub:
    """Records `create_repo` / `upload_folder` calls and copies each uploaded folder to `uploads/<n>`."""

    def __init__(self, root, fail_with: str | None = None):
        self.root, self.fail_with = root, fail_with
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[str] = []

    def install(self, monkeypatch):
        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            fake.calls.append(("upload_folder", {"repo_id": repo_id, "token": api.token, **kwargs}))
            if fake.fail_with is not None:
                raise RuntimeError(fake.fail_with)
            target = os.path.join(fake.root, f"upload{len(fake.uploads)}")
            shutil.copytree(folder_path, target)
            fake.uploads.append(target)
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self

    def call(self, name):
        return [kwargs for called, kwargs in self.calls if called == name]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    return FakeHub(str(tmp_path / "hub")).install(monkeypatch)


def base_model(tokenizer):
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    model.config._name_or_path = BASE_ID
    return model


def trained_trainer(tokenizer, tmp_path, peft=True, model=None, **overrides):
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                  save_strategy="no", report_to="none", max_length=64, seed=3)
    values.update(overrides)
    trainer = GNMTrainer(
        model if model is not None else base_model(tokenizer),
        GNMConfig(**values),
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=perturb_negatives(forget, retain, levels=2),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if peft else None,
    )
    trainer.train()
    return trainer


def logits_of(model, tokenizer):
    ids = tokenizer(["Where was Borin Tal born?"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


def read_card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def test_adapter_push_uploads_our_card_and_an_adapter_that_loads_back(fake_hub, tiny_tokenizer, tmp_path):
    trainer = trained_trainer(tiny_tokenizer, tmp_path)
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    after, _ = evaluate_model(trainer.model, tiny_tokenizer, forget, retain, max_new_tokens=6)
    before, _ = evaluate_model(base_model(tiny_tokenizer), tiny_tokenizer, forget, retain, max_new_tokens=6)

    hub.push_to_hub(trainer, REPO_ID, token=TOKEN, private=True, evaluation_results={"before": before, "after": after},
                    datasets="org/forget-data", license="apache-2.0")

    (create,) = fake_hub.call("create_repo")
    assert create["repo_id"] == REPO_ID and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == TOKEN  # the token goes to HfApi, and (below) nowhere else
    (upload,) = fake_hub.uploads
    uploaded = set(os.listdir(upload))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= uploaded
    assert "training_args.bin" not in os.listdir(upload)
    card = read_card(upload)
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert {"unlearning", "gnm", "gradual-negative-matching", "peft", "lora"} <= set(card.data.tags)
    assert card.data.datasets == ["org/forget-data"] and card.data.license == "apache-2.0"
    text = card.text
    for row in ("| `ga` |", "| 0.5 |", "| `klr` |", "| 5 |", "| `gnm` |", "| 0.04 |"):
        assert row in text
    assert "K = 2 levels" in text and "4 forget examples and 4 retain examples" in text
    assert "| forget | Task2 |" in text and "R before | R after" in text  # the before/after evaluation table
    assert "PeftModel.from_pretrained" in text and "gnm unlearn --config recipe.yaml" in text
    assert "@inproceedings" in text and "10.1007/978-3-031-88714-7_16" in text and "Kulkarni" in text

    reloaded = PeftModel.from_pretrained(base_model(tiny_tokenizer), upload)
    torch.testing.assert_close(logits_of(reloaded, tiny_tokenizer), logits_of(trainer.model, tiny_tokenizer))
    assert not os.path.exists(os.path.join(trainer.args.output_dir, hub.STAGING_DIR))


def test_merged_push_uploads_full_weights_loadable_with_auto_model(fake_hub, tiny_tokenizer, tmp_path):
    trainer = trained_trainer(tiny_tokenizer, tmp_path)
    hub.push_to_hub(trainer, REPO_ID, merged=True)

    (upload,) = fake_hub.uploads
    assert "adapter_config.json" not in os.listdir(upload) and "model.safetensors" in os.listdir(upload)
    card = read_card(upload)
    assert card.data.library_name == "transformers" and "merged into the weights" in card.text
    assert fake_hub.call("create_repo")[0]["private"] is False
    merged = AutoModelForCausalLM.from_pretrained(upload)
    expected = logits_of(trainer.model, tiny_tokenizer)
    torch.testing.assert_close(logits_of(merged, tiny_tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_push_from_a_saved_folder_rebuilds_the_card_from_its_metadata(fake_hub, tiny_tokenizer, tmp_path):
    trainer = trained_trainer(tiny_tokenizer, tmp_path)
    trainer.save_model()
    trainer.create_model_card()
    trainer.save_state()

    hub.push_to_hub(trainer.args.output_dir, REPO_ID, token=TOKEN)

    (upload,) = fake_hub.uploads
    assert "training_args.bin" not in os.listdir(upload) and "trainer_state.json" not in os.listdir(upload)
    card = read_card(upload)
    assert card.data.library_name == "peft" and card.data.model_name == REPO_ID
    assert "| `gnm` |" in card.text and "| 0.04 |" in card.text


def test_merged_push_from_an_adapter_folder(fake_hub, tiny_tokenizer, tmp_path):
    base_dir = str(tmp_path / "base")
    base_model(tiny_tokenizer).save_pretrained(base_dir)  # the adapter records this path: the merge reloads it
    trainer = trained_trainer(tiny_tokenizer, tmp_path, model=AutoModelForCausalLM.from_pretrained(base_dir))
    trainer.save_model()

    hub.push_to_hub(trainer.args.output_dir, REPO_ID, merged=True)

    (upload,) = fake_hub.uploads
    assert "adapter_config.json" not in os.listdir(upload) and "tokenizer.json" in os.listdir(upload)
    assert read_card(upload).data.library_name == "transformers"
    merged = AutoModelForCausalLM.from_pretrained(upload)
    expected = logits_of(trainer.model, tiny_tokenizer)
    torch.testing.assert_close(logits_of(merged, tiny_tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_trainer_push_to_hub_uses_our_card_and_never_reveals_the_token(
    fake_hub, tiny_tokenizer, tmp_path, monkeypatch, caplog, capsys
):
    monkeypatch.setattr(sys, "argv", ["gnm", "unlearn", "--hub_token", TOKEN, "--max_steps", "2", f"--token={TOKEN}"])
    caplog.set_level(logging.DEBUG)
    trainer = trained_trainer(
        tiny_tokenizer, tmp_path, push_to_hub=True, hub_model_id=REPO_ID, hub_token=TOKEN, hub_private_repo=True
    )
    written_with_token = []
    real_save = torch.save

    def spying_save(obj, path, *args, **kwargs):  # Trainer.save_model pickles its arguments with torch.save
        real_save(obj, path, *args, **kwargs)
        if isinstance(path, (str, os.PathLike)):
            with open(path, "rb") as handle:
                if TOKEN.encode() in handle.read():
                    written_with_token.append(os.fspath(path))

    monkeypatch.setattr(torch, "save", spying_save)
    trainer.push_to_hub()

    assert written_with_token == []  # not even in a temporary file
    assert trainer.args.hub_token == TOKEN  # restored after staging
    assert all(call["private"] is True for call in fake_hub.call("create_repo"))  # Trainer's init and our push
    (upload,) = fake_hub.uploads
    card = read_card(upload)
    assert "gnm unlearn --max_steps 2" in card.text and card.data.library_name == "peft" and "trl" in card.data.tags
    manifest = json.loads((pathlib.Path(upload) / "gnm_manifest.json").read_text())  # the run's manifest travels too
    assert manifest["loss_terms"] and manifest["config_sha256"]
    for folder, _, names in os.walk(upload):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), name
    assert TOKEN not in caplog.text
    assert all(TOKEN not in record.getMessage() for record in caplog.records)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err


def test_hub_errors_are_reported_without_the_token(monkeypatch, tiny_tokenizer, tmp_path, caplog):
    failure = f"401 Client Error: invalid credentials {TOKEN} for url"
    failing = FakeHub(str(tmp_path / "hub"), fail_with=failure).install(monkeypatch)
    trainer = trained_trainer(tiny_tokenizer, tmp_path)
    with pytest.raises(GNMInputError) as raised:
        hub.push_to_hub(trainer, REPO_ID, token=TOKEN)
    message = str(raised.value)
    assert REPO_ID in message and "401 Client Error" in message and "<redacted>" in message
    assert TOKEN not in "".join(traceback.format_exception(raised.value))
    assert TOKEN not in caplog.text and failing.uploads == []


def test_redact_scrubs_the_token_and_anything_shaped_like_one():
    assert hub.redact(f"bad {TOKEN}!", TOKEN) == "bad <redacted>!"
    assert hub.redact("env had hf_abcdefghijklmnop", None) == "env had <redacted>"
    assert hub.redact("nothing secret", None) == "nothing secret"


def test_command_line_in_the_card_drops_token_flags():
    argv = ["/venv/bin/gnm", "unlearn", "--hub_token", "secret", "--config", "r.yaml", "--token=secret",
            "--push_to_hub"]
    assert command_from_argv(argv) == "gnm unlearn --config r.yaml --push_to_hub"
    assert command_from_argv(["pytest", "-q"]) is None


def test_card_of_a_plain_summary_parses_with_its_metadata():
    recipe = {"loss_terms": ["ga", "gd"], "ga_weight": 1.0, "gd_weight": 2.0}
    summary = RunSummary(model_name="me/m", base_model="org/base", recipe=recipe)
    card = ModelCard(str(build_model_card(summary, evaluation_results=None)))
    assert card.data.library_name == "transformers" and card.data.base_model == "org/base"
    assert card.data.to_dict()["gnm"]["recipe"]["gd_weight"] == 2.0
    assert "## Evaluation" not in card.text and "AutoModelForCausalLM.from_pretrained(\"me/m\")" in card.text


def test_gnm_unlearn_push_to_hub_uploads_our_card(fake_hub, tiny_model, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    import json

    from gnm_trainer.cli import main

    tiny_model.save_pretrained(tmp_path / "target")
    tiny_tokenizer.save_pretrained(tmp_path / "target")
    (tmp_path / "data").mkdir()
    forget, retain = fact_rows("forget", 0, 4), fact_rows("retain", 4, 8)
    for name, rows in (("forget.jsonl", forget), ("retain.jsonl", retain)):
        (tmp_path / "data" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with open(tmp_path / "negatives.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in perturb_negatives(forget, retain, levels=2))
    argv = ["unlearn", "--model_name_or_path", str(tmp_path / "target"), "--data_dir", str(tmp_path / "data"),
            "--negatives_path", str(tmp_path / "negatives.jsonl"), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "all-linear", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
            "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", TOKEN, "--hub_private_repo", "true"]
    monkeypatch.setattr(sys, "argv", ["gnm", *argv])
    assert main(argv) == 0

    assert fake_hub.uploads and all(call["private"] is True for call in fake_hub.call("create_repo"))
    card = read_card(fake_hub.uploads[-1])
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local base path is not a Hub id
    assert "gnm unlearn --model_name_or_path" in card.text and "--hub_token" not in card.text
    for upload in fake_hub.uploads:
        for folder, _, names in os.walk(upload):
            for name in names:
                with open(os.path.join(folder, name), "rb") as handle:
                    assert TOKEN.encode() not in handle.read(), name
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize("merge_adapters", [False, True])
def test_final_save_writes_our_card_not_peft_template(tiny_tokenizer, tmp_path, merge_adapters):
    trainer = trained_trainer(tiny_tokenizer, tmp_path, merge_adapters=merge_adapters, save_strategy="steps",
                              save_steps=2)
    trainer.save_model()

    card = read_card(trainer.args.output_dir)
    assert card.data.base_model == BASE_ID and card.data.to_dict()["gnm"]["recipe"]["gnm_weight"] == 0.04
    assert card.data.library_name == ("transformers" if merge_adapters else "peft")
    assert "| `ga` |" in card.text and "| `klr` |" in card.text and "| `gnm` |" in card.text
    checkpoint_card = os.path.join(trainer.args.output_dir, "checkpoint-2", "README.md")
    assert not os.path.exists(checkpoint_card) or "gnm" not in read_card(os.path.dirname(checkpoint_card)).data.to_dict()


def test_card_recipe_names_the_winners_settings(tmp_path):
    """A SimNPO, chunked, layer-selective run: its card recipe holds everything needed to run it again."""
    from peft import LoraConfig

    from gnm_trainer import GNMConfig
    from gnm_trainer.model_card import TERM_MEANINGS, peft_summary, recipe_from_config

    args = GNMConfig(output_dir=str(tmp_path), loss_terms=["simnpo", "gd"], simnpo_beta=3.0, forget_chunks=4,
                     epochs_per_chunk=2, report_to="none")
    recipe = recipe_from_config(args)
    assert (recipe["simnpo_beta"], recipe["simnpo_delta"], recipe["forget_chunks"], recipe["epochs_per_chunk"]) == (
        3.0, 0.0, 4, 2)
    assert "without a reference model" in TERM_MEANINGS["simnpo"]
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1])
    assert peft_summary(lora)["layers_to_transform"] == [0, 1]
    klb = recipe_from_config(GNMConfig(output_dir=str(tmp_path), loss_terms=["klb", "gd"], base_model="org/base",
                                       report_to="none"))
    assert (klb["klb_weight"], klb["base_model"]) == (1.0, "org/base") and "base model" in TERM_MEANINGS["klb"]
