"""The loss math as a contract: pure functions checked against their definitions."""

import math

import pytest
import torch

from gnm_trainer import losses


def random_batch(batch=3, length=7, vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    completion_mask[0, 3:] = 1
    completion_mask[1, 2:5] = 1  # followed by padding
    completion_mask[2, 6:] = 1
    return logits, input_ids, completion_mask


def test_kl_is_non_negative_and_zero_at_identity():
    logits, _, mask = random_batch()
    other = torch.randn_like(logits)
    kl = losses.completion_kl(logits, other, mask)
    assert kl.shape == (3,)
    assert (kl > 0).all()
    assert torch.allclose(losses.completion_kl(logits, logits.clone(), mask), torch.zeros(3), atol=1e-6)


def test_kl_matches_definition_on_one_token():
    policy = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])
    reference = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[0, 1]])
    p_ref = torch.softmax(reference[0, 0], -1)
    p_pol = torch.softmax(policy[0, 0], -1)
    expected = (p_ref * (p_ref.log() - p_pol.log())).sum()
    assert torch.allclose(losses.completion_kl(policy, reference, mask), expected.reshape(1), atol=1e-6)


def test_nll_is_mean_over_completion_tokens_only():
    logits, input_ids, mask = random_batch()
    logprobs = torch.log_softmax(logits, -1)
    for row in range(3):
        positions = [t for t in range(1, 7) if mask[row, t]]
        expected = -sum(logprobs[row, t - 1, input_ids[row, t]] for t in positions) / len(positions)
        assert losses.completion_nll(logits, input_ids, mask)[row].item() == pytest.approx(expected.item(), rel=1e-5)


def test_losses_ignore_padding_and_prompt_logits():
    logits, input_ids, mask = random_batch()
    padded_logits = torch.cat([logits, torch.randn(3, 4, 11) * 100], dim=1)
    padded_ids = torch.cat([input_ids, torch.randint(0, 11, (3, 4))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    reference = torch.randn_like(padded_logits)
    assert torch.allclose(
        losses.completion_nll(logits, input_ids, mask), losses.completion_nll(padded_logits, padded_ids, padded_mask)
    )
    assert torch.allclose(
        losses.completion_kl(logits, reference[:, :7], mask), losses.completion_kl(padded_logits, reference, padded_mask)
    )
    # Changing a logit that predicts a prompt token changes nothing either.
    changed = logits.clone()
    changed[0, 0] += 50.0  # predicts token 1 of row 0, a prompt token
    assert torch.allclose(losses.completion_nll(changed, input_ids, mask), losses.completion_nll(logits, input_ids, mask))


def test_logprob_sum_is_nll_times_token_count():
    logits, input_ids, mask = random_batch()
    counts = mask[:, 1:].sum(-1).float()
    assert torch.allclose(
        losses.completion_logprob_sum(logits, input_ids, mask), -losses.completion_nll(logits, input_ids, mask) * counts
    )


def test_npo_equals_its_formula():
    policy = torch.tensor([-3.0, -10.0, -0.5])
    reference = torch.tensor([-4.0, -9.0, -0.5])
    beta = 0.3
    expected = [(2 / beta) * math.log(1 + math.exp(p - r) ** beta) for p, r in zip(policy.tolist(), reference.tolist())]
    assert losses.npo_loss(policy, reference, beta).tolist() == pytest.approx(expected, rel=1e-6)
    # At the reference, NPO is (2/β)·log 2.
    assert losses.npo_loss(reference, reference, beta)[0].item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_klf_is_negated_and_capped():
    kl = torch.tensor([0.5, 3.0, 9.0])
    assert losses.capped_forget_kl(kl, 2.0).tolist() == [-0.5, -2.0, -2.0]
    assert losses.capped_forget_kl(kl, None).tolist() == [-0.5, -3.0, -9.0]


def test_combine_losses_is_the_weighted_sum():
    terms = {"ga": torch.tensor(-2.0), "klr": torch.tensor(0.25), "gnm": torch.tensor(3.0)}
    weights = {"ga": 0.5, "klr": 5.0, "gnm": 0.04}
    assert losses.combine_losses(terms, weights).item() == pytest.approx(-1.0 + 1.25 + 0.12)
    with pytest.raises(ValueError):
        losses.combine_losses({}, weights)


def test_completion_only_math_equals_the_all_positions_formula():
    """The losses select completion positions before any softmax; values and gradients equal the plain formula
    computed over every position and masked afterwards, and non-completion logits get exactly zero gradient."""
    logits, input_ids, mask = random_batch()
    reference = torch.randn_like(logits)
    logits.requires_grad_(True)
    shifted_mask = mask[:, 1:].float()
    all_logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
    plain_nll = -(all_logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * shifted_mask).sum(-1) / shifted_mask.sum(-1)
    plain_kl = (torch.nn.functional.kl_div(all_logprobs, torch.log_softmax(reference[:, :-1], -1), log_target=True,
                                           reduction="none").sum(-1) * shifted_mask).sum(-1) / shifted_mask.sum(-1)
    ours = (losses.completion_nll(logits, input_ids, mask), losses.completion_kl(logits, reference, mask))
    for value, plain in zip(ours, (plain_nll, plain_kl)):
        assert torch.allclose(value, plain, atol=1e-6)
        (gradient,) = torch.autograd.grad(value.sum(), logits)
        (plain_gradient,) = torch.autograd.grad(plain.sum(), logits, retain_graph=True)  # both share all_logprobs
        assert torch.allclose(gradient, plain_gradient, atol=1e-6)
        assert gradient[:, :-1][~mask[:, 1:].bool()].abs().max() == 0


def test_token_level_math_is_the_padded_math_in_any_token_order():
    """The packed layout hands the losses the completion positions of all sequences in any order with a sequence
    index: per-sequence NLL, log-likelihood and KL equal the padded functions', and a sequence without tokens gets 0."""
    logits, input_ids, mask = random_batch()
    reference = torch.randn_like(logits)
    targets, sequence_index = losses.completion_targets(input_ids, mask)
    positions = losses.completion_positions(mask)
    selected, selected_reference = logits[:, :-1][positions], reference[:, :-1][positions]
    shuffle = torch.randperm(len(targets), generator=torch.Generator().manual_seed(1))
    args = (targets[shuffle], sequence_index[shuffle], 4)  # a fourth sequence with no completion token
    nll = losses.sequence_nll(selected[shuffle], *args)
    assert torch.allclose(nll[:3], losses.completion_nll(logits, input_ids, mask), atol=1e-6) and nll[3] == 0
    logprob_sum = losses.sequence_logprob_sum(selected[shuffle], *args)
    assert torch.allclose(logprob_sum[:3], losses.completion_logprob_sum(logits, input_ids, mask), atol=1e-5)
    kl = losses.sequence_kl(selected[shuffle], selected_reference[shuffle], *args[1:])
    assert torch.allclose(kl[:3], losses.completion_kl(logits, reference, mask), atol=1e-6) and kl[3] == 0


def test_completion_targets_are_the_predicted_completion_tokens_in_sequence_order():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]])  # a completion token at position 0 is predicted by nothing
    targets, sequence_index = losses.completion_targets(input_ids, mask)
    assert targets.tolist() == [6, 7, 3, 4] and sequence_index.tolist() == [0, 0, 1, 1]
