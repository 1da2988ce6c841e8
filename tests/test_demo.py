"""`gnm demo` end to end, in quick mode (a smaller target): forget scores fall, retain scores hold, files written."""

import json

from gnm_trainer.cli import main


def overall(results, split):
    return results[split]["overall-regurgitation-score"], results[split]["overall-knowledge-score"]


def test_quick_demo_forgets_and_keeps(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(
        ["demo", "--quick", "--output-dir", str(output), "--max-steps", "60", "--learning-rate", "3e-3", "--max-new-tokens", "32"]
    )
    assert code == 0
    for name in ("report.md", "plot.png", "attacks.png", "results_before.json", "results_after.json", "negatives.jsonl", "demo_summary.json"):
        assert (output / name).exists(), name
    assert (output / "model" / "adapter_config.json").exists()
    before = json.loads((output / "results_before.json").read_text())
    after = json.loads((output / "results_after.json").read_text())
    forget_before, forget_after = overall(before, "forget-set"), overall(after, "forget-set")
    retain_before, retain_after = overall(before, "retain-set"), overall(after, "retain-set")
    assert forget_before[1] == 1.0 and retain_before[1] == 1.0  # the target memorised its QA facts
    assert forget_after[0] < forget_before[0] - 0.3 and forget_after[1] <= 0.5  # forgotten
    assert retain_after[0] > retain_before[0] - 0.15 and retain_after[1] >= 0.8  # kept
    manifest = json.loads((output / "model" / "gnm_manifest.json").read_text())
    assert manifest["collapse_guard"]["collapsed"] is False  # forgetting without collapsing the retain set
    kept = manifest["best_on_membership"]  # the recommended recipe's step rule: 4/3 of 60 steps, kept from 40 on
    assert kept["last_step"] == 80 and 40 <= kept["step"] <= 80 and kept["step"] % 5 == 0
    assert (output / "model" / "best" / "best.json").is_file()
    printed = capsys.readouterr().out
    assert "| forget | Task2 |" in printed and "report:" in printed
    # the attacks, against the target's scores from the evaluation before unlearning
    attacks = after["attacks"]
    assert attacks["settings"]["attacks"] == ["quant8", "quant4", "relearn"]
    assert attacks["target-forget-set"]["overall"]["knowledge-score"] == forget_before[1]
    assert attacks["unlearned-forget-set"]["overall"]["knowledge-score"] == forget_after[1]
    for name in ("quant8", "quant4", "relearn"):
        assert attacks[name]["recovery"]["overall"]["mean"] is not None
    assert "## Attacks" in printed and "| relearn | held-out half" in (output / "report.md").read_text()
    assert json.loads((output / "demo_summary.json").read_text())["attack_seconds"] > 0


def reference_margin(target_dir, documents: int, with_base_model: bool) -> float:
    """The margin computed apart from the demo: the target's mean NLL of the synthetic reference documents (seed 0),
    one document at a time as `model(ids, labels=ids).loss`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnm_trainer.data.synthetic import make_reference_documents
    from gnm_trainer.recipes import calibrated_margin

    model, tokenizer = AutoModelForCausalLM.from_pretrained(target_dir), AutoTokenizer.from_pretrained(target_dir)
    with torch.no_grad():
        values = [model(**(ids := tokenizer(text, return_tensors="pt")), labels=ids["input_ids"]).loss.item()
                  for text in make_reference_documents(0, documents)]
    return calibrated_margin(sum(values) / len(values), with_base_model=with_base_model)


def test_the_recommended_recipe_takes_its_margin_from_reference_documents(tmp_path, capsys):
    """A target trained from scratch has no base model (nothing to pretrain on): the recommended recipe without `klb`,
    its margin from the reference documents, never from the evaluation's MIA non-members."""
    output = tmp_path / "demo"
    code = main(["demo", "--quick", "--pretraining_documents", "0", "--no_attacks", "--output_dir", str(output),
                 "--max_steps", "2", "--max_new_tokens", "8", "--fixed_steps", "--reference_documents", "6"])
    assert code == 0
    manifest = json.loads((output / "model" / "gnm_manifest.json").read_text())
    assert manifest["best_on_membership"] is None  # no step rule: the last step is the model
    summary = json.loads((output / "demo_summary.json").read_text())
    margin = reference_margin(summary["target_dir"], 6, with_base_model=False)
    assert summary["calibration"]["reference_documents"] == 6 and summary["calibration"]["simnpo_delta"] == margin
    printed = capsys.readouterr().out
    assert "keeping the step" not in printed
    assert f"simnpo 1 + gd 5 + gnm 0.2, forget_completion_only_loss=False, simnpo_delta={margin}," in printed


def test_a_target_with_pretraining_documents_gives_the_recommended_recipe_its_base_model(tmp_path, capsys):
    output, target = tmp_path / "demo", tmp_path / "target"
    code = main(["demo", "--quick", "--pretraining_documents", "6", "--no_attacks",
                 "--target_dir", str(target), "--output_dir", str(output), "--max_steps", "2", "--max_new_tokens", "8"])
    assert code == 0
    assert json.loads((target / "target_info.json").read_text())["pretraining"]["documents"] == 6
    margin = reference_margin(target, 24, with_base_model=True)
    printed = capsys.readouterr().out
    assert (f"simnpo 1 + klb 1 + gd 5 + gnm 0.2, forget_completion_only_loss=False, base_model={target}/pretrained, "
            f"simnpo_delta={margin},") in printed


def test_the_recommended_recipe_refuses_to_run_without_reference_documents(tmp_path, capsys):
    code = main(["demo", "--quick", "--reference_documents", "0", "--output_dir", str(tmp_path / "demo")])
    assert code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "reference_documents: the recommended recipe sets SimNPO's margin from them" in error[0]
    assert not (tmp_path / "demo").exists()
