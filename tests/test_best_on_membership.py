"""`gnm unlearn --keep_best_membership_steps N`: the step whose forget documents a loss attack tells apart the least
from reference documents (text the model never read) is the model saved."""

import json

import pytest
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file
from test_best_on_validation import (  # noqa: F401 (memorised_target: a fixture)
    assert_same_tensors,
    error_line,
    lume_rows,
    memorised_target,
    two_process_run_keeps_best,
    unlearn,
)

from gnm_trainer.evaluation import document_nll, mia_auc, mia_score
from gnm_trainer.evaluation.membership import OBJECTIVE, MembershipCallback
from gnm_trainer.manifest import MANIFEST_FILE

REFERENCE = ["Hal Ivers keeps bees near Tork.", "The Quill Gala is held in Marrow Cove.",
             "Ines Varro paints boats in Lindholm.", "Jory Pell repairs clocks on Fenn Street."]


@pytest.fixture
def workspace(tmp_path, memorised_target):
    """Forget rows that are sentence completions (their whole text: the member documents), reference documents
    (`reference.jsonl`) and a recipe that scores membership every step from step 2 of 6 (at a learning rate whose
    best step comes before the last, so that loading it back shows)."""
    data = tmp_path / "data"
    write_jsonl(data / "forget_train.jsonl", lume_rows("forget", "sc1", 0, 4))
    write_jsonl(data / "retain_train.jsonl", lume_rows("retain", "qa0", 4, 6))
    write_jsonl(tmp_path / "reference.jsonl", [{"document": text} for text in REFERENCE])
    recipe = {
        "model_name_or_path": str(memorised_target), "data_dir": str(data), "loss_terms": ["ga"], "use_peft": True,
        "lora_r": 4, "lora_target_modules": ["all-linear"], "max_steps": 6, "per_device_train_batch_size": 2,
        "learning_rate": 5e-2, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "output_dir": str(tmp_path / "run"), "keep_best_membership_steps": 1, "membership_start_step": 2,
        "membership_reference": str(tmp_path),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def membership_scores(run) -> dict[int, float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[OBJECTIVE] for entry in history if OBJECTIVE in entry}


def test_the_saved_adapter_is_the_step_whose_forget_documents_look_most_unseen(workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert unlearn(workspace) == 0
    run = workspace / "run"
    scores = membership_scores(run)
    assert sorted(scores) == [2, 3, 4, 5, 6]  # from membership_start_step on, every step
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == max(scores, key=lambda step: (scores[step], step))  # the last of equal highest scores
    assert best["step"] < 6  # so that the final adapter equals best/'s only because best/ was loaded back
    assert_same_tensors(load_file(run / "adapter_model.safetensors"), load_file(run / "best" / "adapter_model.safetensors"))
    kept = json.loads((run / MANIFEST_FILE).read_text())["best_on_membership"]
    assert kept == {"step": best["step"], "objective": OBJECTIVE, "value": best["value"], "last_step": 6}
    # The saved model, scored again from disk: its members against the reference give the kept score.
    target = yaml.safe_load((workspace / "recipe.yaml").read_text())["model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(target), run).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    members = [f"{row['input']} {row['output']}" for row in lume_rows("forget", "sc1", 0, 4)]
    auc = mia_auc(document_nll(model, tokenizer, members), document_nll(model, tokenizer, REFERENCE))
    assert mia_score(auc) == pytest.approx(kept["value"])


@pytest.mark.parametrize("flags, message", [
    (("--keep_best_membership_steps", "0"), "keep_best_membership_steps: expected a number of optimizer steps of at "
                                            "least 1, got 0"),
    (("--membership_start_step", "-1"), "membership_start_step: expected a step of at least 0, got -1"),
    (("--membership_reference", "absent.jsonl"), "membership_reference: absent.jsonl: file or folder not found"),
    (("--eval_on_validation_steps", "2"), "keep_best_membership_steps and eval_on_validation_steps: give only one"),
])
def test_options_that_cannot_work_are_one_line_errors_before_training(workspace, capsys, flags, message):
    assert message in error_line(capsys, workspace, *flags)
    assert not (workspace / "run" / "trainer_state.json").exists()


def test_membership_options_need_the_steps_and_the_reference(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    del recipe["membership_reference"]
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert "membership_reference: required with keep_best_membership_steps" in error_line(capsys, workspace)
    del recipe["keep_best_membership_steps"]  # membership_start_step stays set
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert "membership_start_step: set, but no step is kept on membership" in error_line(capsys, workspace)
    assert not (workspace / "run").exists()


def test_a_forget_set_without_sentence_completions_needs_member_documents(workspace, capsys):
    write_jsonl(workspace / "data" / "forget_train.jsonl", lume_rows("forget", "qa0", 0, 4))
    assert "the forget set has no sentence-completion (sc1) rows" in error_line(capsys, workspace)
    write_jsonl(workspace / "members.jsonl", [{"document": f"{q} {a}"} for q, a in
                                              [(row["input"], row["output"]) for row in lume_rows("f", "sc1", 0, 4)]])
    assert unlearn(workspace, "--membership_members", str(workspace / "members.jsonl")) == 0
    assert sorted(membership_scores(workspace / "run")) == [2, 3, 4, 5, 6]


def test_the_callback_refuses_what_cannot_be_scored():
    with pytest.raises(ValueError, match="eval_steps must be at least 1"):
        MembershipCallback(["a"], ["b"], eval_steps=0)
    with pytest.raises(ValueError, match="needs member and reference documents"):
        MembershipCallback(["a"], [], eval_steps=1)


def test_two_processes_with_different_batches_keep_the_same_step(workspace):
    """Every process scores its shard of the documents and takes the gathered decision; each loads best/."""
    two_process_run_keeps_best(workspace, "best_on_membership")


@pytest.mark.parametrize("case", ["folder-of-nonmembers", "reference-is-the-reported-nonmembers",
                                  "validation-nonmembers-are-the-reported-ones"])
def test_calibration_documents_that_a_reported_score_uses_are_refused_before_any_work(workspace, capsys, case):
    """A kept step chosen on the evaluation's own non-members would make its MIA score look better than it is."""
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    reported = [{"document": text} for text in REFERENCE[:2] + ["An unseen line about Pim Argo."]]
    write_jsonl(workspace / "data" / "mia" / "nonmember.jsonl", reported)  # what `gnm evaluate --mia_data` reports on
    if case == "folder-of-nonmembers":  # a folder is read for reference.jsonl, never for its nonmember.jsonl
        recipe["membership_reference"] = str(workspace / "data")
        expected = "membership_reference: " + str(workspace / "data") + ": no MIA file reference.jsonl"
    elif case == "reference-is-the-reported-nonmembers":
        expected = ("membership_reference: 2 of its 4 documents are also the MIA non-members of the training data ("
                    + str(workspace / "data" / "mia" / "nonmember.jsonl") + ")")
    else:
        write_jsonl(workspace / "validation" / "nonmember.jsonl", reported)
        for option in ("keep_best_membership_steps", "membership_start_step", "membership_reference"):
            recipe.pop(option)
        recipe.update(eval_on_validation_steps=2, validation_mia_nonmembers=str(workspace / "validation"))
        expected = "validation_mia_nonmembers: 3 of its 3 documents are also the MIA non-members of the training data"
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    line = error_line(capsys, workspace).split("gnm unlearn: error: ", 1)[1]
    assert line.startswith(expected), line
    assert not (workspace / "run").exists()
