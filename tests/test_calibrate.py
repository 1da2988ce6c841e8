"""`gnm calibrate`: the recommended recipe's margin from reference documents, never from the reported non-members."""

import pytest
import torch
from conftest import write_jsonl

from gnm_trainer.cli import main
from gnm_trainer.recipes import calibrated_margin

REFERENCE = ["Hal Ivers keeps bees near Tork.", "The Quill Gala is held in Marrow Cove.",
             "Ines Varro paints boats in Lindholm."]


@pytest.fixture
def saved_model(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_the_margin_is_the_reference_documents_mean_nll(tmp_path, saved_model, tiny_model, tiny_tokenizer, capsys):
    write_jsonl(tmp_path / "reference.jsonl", [{"document": text} for text in REFERENCE])
    assert main(["calibrate", "--model_name_or_path", str(saved_model), "--reference_documents",
                 str(tmp_path / "reference.jsonl")]) == 0
    with torch.no_grad():  # one document at a time, as the membership attack scores them
        values = [tiny_model(**(ids := tiny_tokenizer(text, return_tensors="pt")), labels=ids["input_ids"]).loss.item()
                  for text in REFERENCE]
    level = sum(values) / len(values)
    printed = capsys.readouterr().out
    assert f"reference documents: 3, mean document NLL {level:.3f}" in printed
    assert f"simnpo_delta: {calibrated_margin(level, with_base_model=False)}" in printed
    assert "recommended recipe: simnpo 1 + gd 5 + gnm 0.2" in printed  # no base model: no klb


def test_reference_documents_that_the_evaluation_reports_on_are_refused(tmp_path, saved_model, capsys):
    write_jsonl(tmp_path / "reference.jsonl", [{"document": text} for text in REFERENCE])
    write_jsonl(tmp_path / "mia" / "member.jsonl", [{"document": "Alma Breck loves teal."}])
    write_jsonl(tmp_path / "mia" / "nonmember.jsonl", [{"document": "  The Quill Gala is held in\nMarrow Cove. "}])
    code = main(["calibrate", "--model_name_or_path", str(saved_model), "--reference_documents",
                 str(tmp_path / "reference.jsonl"), "--mia_data", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert "reference_documents: 1 of its 3 documents are also the MIA non-members of" in lines[0]
