"""The loss math of GNM as pure functions: tensors in, tensors out.

Conventions:
- The math is token-level: `logits` (N, vocab) taken at the N positions that predict a completion token, `targets`
  (N,) those tokens, and `sequence_index` (N,) the sequence each belongs to, whatever the layout the model ran on
  (packed rows or padded batch, see `data/packing.py`). Per-sequence values are gathered with `index_add`.
- The `completion_*` functions take the padded layout, `logits` (batch, length, vocab), `input_ids` and
  `completion_mask` (batch, length), and select its completion positions for the same math: `completion_mask` is 1 on
  the completion's tokens and 0 on prompt and padding; the logits at position t predict the token at t + 1.
- Per-sequence values come back as (batch,) tensors: each is a mean over that sequence's completion tokens (so a long
  completion does not outweigh a short one), or a sum where the definition needs a sequence log-likelihood (NPO).
- In training, the trainer sums per-example values over a micro-batch and divides by the forget examples of the whole
  optimizer step (all micro-batches, all processes): any split of the same examples gives the same update.
"""

import torch
import torch.nn.functional as F

# Terms and what each needs: which sequences go through the model with gradients, and whether a reference is needed.
LOSS_TERMS = ("ga", "gd", "klr", "klf", "rm", "gnm", "npo", "simnpo", "klb")
TERMS_NEEDING_REFERENCE = frozenset({"klr", "klf", "npo"})
TERMS_NEEDING_BASE = frozenset({"klb"})  # the model before it read the forget set (`GNMConfig.base_model`)
TERMS_NEEDING_RETAIN = frozenset({"gd", "klr", "rm"})
TERMS_ON_FORGET = frozenset({"ga", "klf", "npo", "simnpo", "klb"})
TERMS_ON_RETAIN = frozenset({"gd", "klr"})


def completion_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, length - 1): the positions whose logit predicts a completion token (the only ones a loss reads).

    Selecting them before any softmax keeps the vocabulary-sized work and memory to the completion's tokens: prompt
    and padding positions can be most of a batch.
    """
    return completion_mask[:, 1:].bool()


def completion_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion tokens a loss predicts (N,) and the sequence (row) each belongs to (N,), in sequence order."""
    positions = completion_positions(completion_mask)
    return input_ids[:, 1:][positions], positions.nonzero()[:, 0]


# ---- Token-level math: logits (N, vocab) at the positions that predict the targets (N,), a sequence index (N,). ----


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each selected position (N,), in float32."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the vocabulary at each selected position (N,).

    Computed on log-probabilities of both distributions (the published code passed probabilities where
    log-probabilities were expected, which is not a KL).
    """
    policy_logprobs = F.log_softmax(policy_logits.float(), dim=-1)
    reference_logprobs = F.log_softmax(reference_logits.float(), dim=-1)
    return F.kl_div(policy_logprobs, reference_logprobs, log_target=True, reduction="none").sum(-1)


def per_sequence_sum(values: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(num_sequences,) sums of the token values of each sequence (0 for a sequence without tokens)."""
    return values.new_zeros(num_sequences).index_add(0, sequence_index, values)


def per_sequence_mean(values: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(num_sequences,) means of the token values of each sequence (0 for a sequence without tokens)."""
    counts = per_sequence_sum(torch.ones_like(values), sequence_index, num_sequences)
    return per_sequence_sum(values, sequence_index, num_sequences) / counts.clamp(min=1.0)


def sequence_nll(logits, targets, sequence_index, num_sequences: int) -> torch.Tensor:
    """NLL(x, y) per sequence: mean negative log-likelihood of the completion's tokens given everything before them."""
    return per_sequence_mean(-token_logprobs(logits, targets), sequence_index, num_sequences)


def sequence_logprob_sum(logits, targets, sequence_index, num_sequences: int) -> torch.Tensor:
    """log π(y | x) per sequence: the sum of the completion tokens' log-probabilities."""
    return per_sequence_sum(token_logprobs(logits, targets), sequence_index, num_sequences)


def sequence_kl(policy_logits, reference_logits, sequence_index, num_sequences: int) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) averaged over each sequence's completion tokens (num_sequences,)."""
    return per_sequence_mean(token_kl(policy_logits, reference_logits), sequence_index, num_sequences)


# ---- The same on the padded layout: logits (batch, length, vocab), input_ids and completion_mask (batch, length). ----


def _completion_logits(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1, :][completion_positions(completion_mask)]


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """`sequence_nll` of padded sequences (batch,)."""
    targets, sequence_index = completion_targets(input_ids, completion_mask)
    return sequence_nll(_completion_logits(logits, completion_mask), targets, sequence_index, len(input_ids))


def completion_logprob_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """`sequence_logprob_sum` of padded sequences (batch,)."""
    targets, sequence_index = completion_targets(input_ids, completion_mask)
    return sequence_logprob_sum(_completion_logits(logits, completion_mask), targets, sequence_index, len(input_ids))


def completion_kl(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """`sequence_kl` of padded sequences (batch,)."""
    sequence_index = completion_positions(completion_mask).nonzero()[:, 0]
    policy, reference = (_completion_logits(x, completion_mask) for x in (policy_logits, reference_logits))
    return sequence_kl(policy, reference, sequence_index, len(completion_mask))


def npo_loss(policy_logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO per sequence: (2/β)·log(1 + (π_θ(y|x) / π_ref(y|x))^β), written as (2/β)·softplus(β·log-ratio)."""
    return (2.0 / beta) * F.softplus(beta * (policy_logprob - reference_logprob))


def simnpo_loss(forget_nll: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO per sequence (Fan et al. 2024, arXiv 2410.07163), NPO without a reference model:
    −(2/β)·log σ(β·(NLL_mean − δ)), written as (2/β)·softplus(−β·(NLL_mean − δ)).

    `forget_nll` is the completion's mean token NLL (`sequence_nll`). `delta` is a margin in nats on the mean NLL, as
    the authors' code (Unlearn-Simple: `gamma`, subtracted from the mean NLL before β multiplies it) and open-unlearning
    (`delta`) have it; the paper prints −(2/β)·log σ(β·NLL_mean − γ), whose γ is β·delta. Minimising it raises the
    forget NLL, with a gradient that fades once β·(NLL_mean − δ) is large.
    """
    return (2.0 / beta) * F.softplus(-beta * (forget_nll - delta))


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
