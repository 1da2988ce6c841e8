"""Smaller defects an audit found (issue 24): the quantisation attack's recovery on the scored rows only, the collapse
guard's warm-up and window in optimizer steps, and SimNPO's margin against its authors' code."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FACTS, fact_rows

from gnm_trainer import losses
from gnm_trainer.evaluation.attacks import run_attacks
from gnm_trainer.gnm_config import GNMConfig
from gnm_trainer.gnm_trainer import GNMTrainer
from gnm_trainer.guard import CollapseGuard
from gnm_trainer.target import build_tiny_llama

# ---------------------------------------------------------------------------------------------------------------
# Quantisation attack: the target's and the unlearned model's scores on the rows the attack scored
# ---------------------------------------------------------------------------------------------------------------


def results_folder(root, rows):
    """What `gnm evaluate` writes for a target: evaluation_results.json with per_example.jsonl beside it."""
    root.mkdir()
    (root / "evaluation_results.json").write_text(json.dumps({"forget-set": {}}))
    (root / "per_example.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(root / "evaluation_results.json")


def test_a_target_results_file_with_extra_rows_gives_the_same_recovery(tiny_tokenizer, tmp_path):
    forget = [{"id": f"forget{i:03d}{kind}", "input": q, "output": a, "task": "Task2", "split": "forget"}
              for i, (q, a) in enumerate(FACTS[:2]) for kind in ("sc1", "qa0")]
    model = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256)
    scored = [{"id": row["id"], "split": "forget", "task": "Task2", "kind": row["id"][-3:-1], "score": 1.0}
              for row in forget]  # a target that knew every row
    extra = [{**row, "id": row["id"].replace("forget", "other"), "score": 0.0} for row in scored]  # not in the data
    figures = [run_attacks(model, tiny_tokenizer, forget, None, attacks="quant8", target=path, max_new_tokens=4,
                           batch_size=8)
               for path in (results_folder(tmp_path / "exact", scored),
                            results_folder(tmp_path / "extra", scored + extra))]
    exact, with_extra = figures
    assert exact["target-forget-set"]["overall"]["mean"] == 1.0
    assert with_extra["target-forget-set"] == exact["target-forget-set"]
    assert with_extra["quant8"]["recovery"] == exact["quant8"]["recovery"]
    assert exact["quant8"]["recovery"]["overall"]["mean"] is not None


# ---------------------------------------------------------------------------------------------------------------
# Collapse guard: warm-up and window count optimizer steps, whatever the gradient accumulation
# ---------------------------------------------------------------------------------------------------------------


def test_the_guard_observes_one_value_per_optimizer_step():
    guard = CollapseGuard(warmup=2, window=1)
    for step, values in ((0, (1.0, 3.0, 1.0, 3.0)), (1, (2.0, 2.0, 2.0, 2.0))):  # 4 micro-batches of 2 examples
        for value in values:
            guard.add_micro_batch(step, {"nll_retain": 2 * value}, 2)
        assert guard.reference is None  # a step is observed once it ended (here: when the next one starts)
    guard.end_step()
    assert guard.observations == 2 and guard.reference == pytest.approx(2.0)


def test_warmup_and_window_count_optimizer_steps_with_gradient_accumulation(tiny_model, tiny_tokenizer, tmp_path):
    # Aggressive on purpose: gradient ascent with a huge constant SGD step; 4 micro-batches of 1 per optimizer step.
    trainer = GNMTrainer(
        tiny_model,
        GNMConfig(
            output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=1,
            gradient_accumulation_steps=4, logging_steps=1, save_strategy="no", report_to="none", seed=7,
            max_length=64, loss_terms=["ga", "gd"], gd_weight=0.01, optim="sgd", learning_rate=5.0,
            lr_scheduler_type="constant", collapse_guard_action="stop", collapse_warmup=2, collapse_window=3,
            collapse_min_retain_nll_increase=0.5,
        ),
        train_dataset=fact_rows("forget", 0, 4),
        retain_dataset=fact_rows("retain", 4, 8),
        processing_class=tiny_tokenizer,
    )  # fmt: skip
    trainer.train()
    guard = trainer.collapse_guard
    (event,) = guard.events
    # The log entry of step s holds the mean over the 4 micro-batches run on the weights after s - 1 updates.
    logged = {entry["step"]: entry["nll_retain"] for entry in trainer.state.log_history if "nll_retain" in entry}
    assert guard.reference == pytest.approx((logged[1] + logged[2]) / 2, rel=1e-5)  # warm-up: 2 steps, 8 batches
    collapse = event["step"]
    assert collapse >= 4  # 2 warm-up steps, then a full window of 3 steps: the weights after 4 updates at the earliest
    window = [logged[step] for step in (collapse - 1, collapse, collapse + 1)]
    assert event["value"] == pytest.approx(sum(window) / 3, rel=1e-5)
    assert guard.observations == trainer.state.global_step == collapse + 1


# ---------------------------------------------------------------------------------------------------------------
# SimNPO: our `simnpo_delta` is the γ of the authors' code (and open-unlearning's δ); the paper's γ is β·δ
# ---------------------------------------------------------------------------------------------------------------


def authors_simnpo(logits, labels, beta, gamma):
    """OPTML-Group/Unlearn-Simple's `simnpo` loss per sequence, rewritten: the summed NLL of the labelled tokens (the
    logits at t predict the label at t + 1; -100 is ignored) divided by their count, minus γ, then
    −(2/β)·log σ(β·that). open-unlearning's SimNPO computes the same with `delta` in place of `gamma`."""
    shifted_logits, shifted_labels = logits[:, :-1, :], labels[:, 1:]
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none").sum(-1)
    forget_loss = nll / (labels != -100).sum(-1) - gamma
    return -F.logsigmoid(beta * forget_loss) * 2 / beta


def test_simnpo_delta_is_the_authors_gamma_and_the_papers_gamma_over_beta():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    input_ids = torch.randint(0, 11, (3, 7), generator=generator)
    # prompt (0), completion (1), padding (0): completions of 4, 2 and 5 tokens
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    nll = losses.completion_nll(logits, input_ids, completion_mask)
    for beta, gamma in ((0.7, 0.0), (0.7, 3.0), (4.5, 1.5), (5.5, 2.5)):  # MUSE's, TOFU's and WMDP's β
        ours = losses.simnpo_loss(nll, beta, delta=gamma)
        assert ours.tolist() == pytest.approx(authors_simnpo(logits, labels, beta, gamma).tolist(), rel=1e-5)
        papers_gamma = beta * gamma  # the paper: −(2/β)·log σ(β·NLL_mean − γ)
        papers = [-(2 / beta) * math.log(1 / (1 + math.exp(-(beta * value - papers_gamma)))) for value in nll.tolist()]
        assert ours.tolist() == pytest.approx(papers, rel=1e-5)


def test_the_simnpo_mapping_is_written_where_users_read_it():
    import dataclasses
    import os

    help_text = next(f for f in dataclasses.fields(GNMConfig) if f.name == "simnpo_delta").metadata["help"]
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    (line,) = [line for line in readme.splitlines() if line.startswith("| `simnpo` |")]
    for text in (help_text, line, GNMConfig.__doc__):
        assert "Unlearn-Simple" in text and "open-unlearning" in text and "β·δ" in text, text
