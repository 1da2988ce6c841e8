"""The loss math of GNM as pure functions: tensors in, tensors out.

Conventions:
- `logits` is (batch, length, vocab) from a causal LM, `input_ids` and `completion_mask` are (batch, length).
  `completion_mask` is 1 on the completion's tokens and 0 on prompt and padding; the logits at position t predict the
  token at t + 1, so every function shifts once.
- Per-sequence values come back as (batch,) tensors: each is a mean over that sequence's completion tokens (so a long
  completion does not outweigh a short one), or a sum where the definition needs a sequence log-likelihood (NPO).
- In training, the trainer sums per-example values over a micro-batch and divides by the forget examples of the whole
  optimizer step (all micro-batches, all processes): any split of the same examples gives the same update.
"""

import torch
import torch.nn.functional as F

# Terms and what each needs: which sequences go through the model with gradients, and whether a reference is needed.
LOSS_TERMS = ("ga", "gd", "klr", "klf", "rm", "gnm", "npo")
TERMS_NEEDING_REFERENCE = frozenset({"klr", "klf", "npo"})
TERMS_NEEDING_RETAIN = frozenset({"gd", "klr", "rm"})
TERMS_ON_FORGET = frozenset({"ga", "klf", "npo"})
TERMS_ON_RETAIN = frozenset({"gd", "klr"})


def completion_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, length - 1): the positions whose logit predicts a completion token (the only ones a loss reads).

    Selecting them before any softmax keeps the vocabulary-sized work and memory to the completion's tokens: prompt
    and padding positions can be most of a batch.
    """
    return completion_mask[:, 1:].bool()


def scatter_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(batch, length - 1) tensor holding `values` (one per selected position, in order) and 0 elsewhere."""
    full = values.new_zeros(positions.shape)
    full[positions] = values
    return full


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Log-probability of each next token (batch, length - 1) and the matching float mask; 0 outside the mask.

    The logit at position t predicts the token at t + 1: drop the last logit and the first token.
    """
    positions = completion_positions(completion_mask)
    selected_logits = logits[:, :-1, :][positions].float()
    targets = input_ids[:, 1:][positions]
    picked = torch.gather(selected_logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = picked - torch.logsumexp(selected_logits, dim=-1)
    return scatter_positions(logprobs, positions), positions.float()


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the masked positions of each sequence; 0 for a sequence with no masked position."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """NLL(x, y) per sequence: mean negative log-likelihood of the completion's tokens given everything before them."""
    logprobs, mask = token_logprobs(logits, input_ids, completion_mask)
    return masked_sequence_mean(-logprobs, mask)


def completion_logprob_sum(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log π(y | x) per sequence: the sum of the completion tokens' log-probabilities."""
    logprobs, mask = token_logprobs(logits, input_ids, completion_mask)
    return (logprobs * mask).sum(-1)


def completion_kl(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the vocabulary, averaged over each sequence's completion tokens (batch,).

    Computed on log-probabilities of both distributions (the published code passed probabilities where
    log-probabilities were expected, which is not a KL).
    """
    positions = completion_positions(completion_mask)
    policy_logprobs = F.log_softmax(policy_logits[:, :-1, :][positions].float(), dim=-1)
    reference_logprobs = F.log_softmax(reference_logits[:, :-1, :][positions].float(), dim=-1)
    per_token = F.kl_div(policy_logprobs, reference_logprobs, log_target=True, reduction="none").sum(-1)
    return masked_sequence_mean(scatter_positions(per_token, positions), positions.float())


def npo_loss(policy_logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO per sequence: (2/β)·log(1 + (π_θ(y|x) / π_ref(y|x))^β), written as (2/β)·softplus(β·log-ratio)."""
    return (2.0 / beta) * F.softplus(beta * (policy_logprob - reference_logprob))


def capped_forget_kl(kl: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The `klf` term per sequence: −min(KL, cap). The cap stops an unbounded ascent once the model is far enough."""
    if cap is None:
        return -kl
    return -torch.clamp(kl, max=cap)


def combine_losses(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ w_k · L_k over the given terms (each a scalar)."""
    if not terms:
        raise ValueError("no loss term to combine")
    return sum(weights[name] * value for name, value in terms.items())


def adalora_orthogonality(model: torch.nn.Module, adapter_name: str = "default") -> torch.Tensor | None:
    """AdaLoRA's orthogonal regulariser: mean over its A and B matrices of ‖P Pᵀ − I‖_F (A) or ‖Pᵀ P − I‖_F (B).

    PEFT only adds it when the model computes its own loss from `labels`; GNM computes its loss itself, so the trainer
    adds it explicitly. Returns None when the model has no AdaLoRA matrices.
    """
    penalties = []
    for name, parameter in model.named_parameters():
        if adapter_name not in name or not parameter.requires_grad:
            continue
        if ".lora_A." in name:
            gram = parameter @ parameter.T
        elif ".lora_B." in name:
            gram = parameter.T @ parameter
        else:
            continue
        identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        penalties.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    if not penalties:
        return None
    return torch.stack(penalties).mean()
