"""An exact CPU stand-in for the FlashAttention kernels, for tests: `attn_implementation="flash_attention_2"` (and
`_3`) then runs through transformers' own flash path (`_flash_attention_forward`: unpadding by the attention mask,
the packed-sequence detection from `position_ids`, the varlen and plain kernels) with the kernels replaced by torch.

What the kernels compute, and so what the stand-ins compute:
- `flash_attn_func(q, k, v)`, (batch, length, heads, dim): causal attention over each WHOLE row, whatever its
  `position_ids` say; this is what transformers runs on a packed batch of several rows;
- `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)`, (tokens, heads, dim): attention within each
  sequence `cu_seqlens[i]:cu_seqlens[i + 1]`, as transformers runs it for a padded batch or a packed single row.
Causal masks are aligned to the bottom right (a query sees the keys up to its own position counted from the end, as
flash-attn >= 2.1 does), `window_size=(left, right)` keeps keys within that many positions (-1: unbounded), `softcap`
caps the scaled scores with `softcap * tanh(scores / softcap)`, key/value heads are shared by groups of query heads.
Attention dropout and attention sinks cannot be emulated exactly and are refused in one line. The real kernels take
fp16/bf16 only, so transformers casts float32 queries to the dtype of the model's first `nn.Linear` (GPT-2 has none:
its `Conv1D` makes that look-up fail); the stand-ins compute in float32, so that cast is left out and packed and
padded runs of a float32 model can be compared to 1e-5.

The product never imports this: only tests do, through `emulated_flash_attention(monkeypatch)`.
"""

import torch
import transformers.integrations.flash_attention as flash_integration
import transformers.modeling_flash_attention_utils as flash_utils
import transformers.modeling_utils as modeling_utils

EMULATED_VERSIONS = (2, 3)


def _attention_of_one_sequence(q, k, v, softmax_scale, causal, window_size, softcap):
    """Attention of one sequence: `q` (Tq, H, D), `k` and `v` (Tk, Hk, D); returns (Tq, H, D)."""
    query_length, heads, dim = q.shape
    key_length, key_heads = k.shape[:2]
    k = k.repeat_interleave(heads // key_heads, dim=1)
    v = v.repeat_interleave(heads // key_heads, dim=1)
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    # Query i stands at key position i + (Tk - Tq): the bottom-right alignment of flash-attn >= 2.1.
    query_position = torch.arange(query_length).unsqueeze(1) + key_length - query_length
    offset = torch.arange(key_length).unsqueeze(0) - query_position  # key position minus query position
    left, right = window_size
    allowed = torch.ones_like(offset, dtype=torch.bool)
    if causal:
        allowed &= offset <= 0
    if left >= 0:
        allowed &= offset >= -left
    if right >= 0:
        allowed &= offset <= right
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key left gives zeros, as the kernel
    return torch.einsum("hqk,khd->qhd", weights, v.float()).to(q.dtype)


def _refuse_what_is_not_emulated(dropout_p, alibi_slopes, s_aux):
    if dropout_p:
        raise NotImplementedError(f"flash emulation: attention dropout ({dropout_p}) is random, not emulated")
    if alibi_slopes is not None:
        raise NotImplementedError("flash emulation: alibi_slopes are not emulated")
    if s_aux is not None:
        raise NotImplementedError("flash emulation: attention sinks (s_aux) are not emulated")


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None,
):  # fmt: skip
    """flash-attn's `flash_attn_func`: (batch, length, heads, dim), each row attended as one sequence."""
    _refuse_what_is_not_emulated(dropout_p, alibi_slopes, s_aux)
    rows = [_attention_of_one_sequence(*qkv, softmax_scale, causal, window_size, softcap) for qkv in zip(q, k, v)]
    return torch.stack(rows)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, s_aux=None,
):  # fmt: skip
    """flash-attn's `flash_attn_varlen_func`: (tokens, heads, dim), each `cu_seqlens` span attended on its own."""
    _refuse_what_is_not_emulated(dropout_p, alibi_slopes, s_aux)
    output = torch.zeros_like(q)
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(), cu_seqlens_k[1:].tolist())
    for q_start, q_end, k_start, k_end in bounds:
        output[q_start:q_end] = _attention_of_one_sequence(
            q[q_start:q_end], k[k_start:k_end], v[k_start:k_end], softmax_scale, causal, window_size, softcap
        )
    return output


def _emulated_lazy_import(implementation, attention_wrapper=None, allow_all_kernels=False):
    """What `lazy_import_flash_attention` returns, with the emulated kernels (no paged-cache kernel)."""
    process_kwargs = flash_utils._lazy_define_process_function(flash_attn_varlen_func)
    kernels = (flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input)
    return kernels, (process_kwargs, dict)


def _flash_attn_can_dispatch(self, flash_attn_version: int, is_init_check: bool = False) -> bool:
    """transformers' check without the package, device and dtype checks: the model class must support FlashAttention."""
    if not self._supports_flash_attn:
        raise ValueError(f"{type(self).__name__} does not support Flash Attention {flash_attn_version} yet.")
    if flash_attn_version not in EMULATED_VERSIONS:
        raise ValueError(f"flash emulation: Flash Attention {flash_attn_version} is not emulated")
    return True


def emulated_flash_attention(monkeypatch) -> None:
    """Make `flash_attention_2` and `flash_attention_3` loadable and runnable on this CPU, with the emulated kernels,
    for the rest of the test (`monkeypatch` undoes it)."""
    for version in EMULATED_VERSIONS:
        entry = flash_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[version]
        monkeypatch.setitem(entry, "general_availability_check", lambda *args, **kwargs: True)
    monkeypatch.setattr(modeling_utils.PreTrainedModel, "_flash_attn_can_dispatch", _flash_attn_can_dispatch)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", _emulated_lazy_import)
    monkeypatch.setattr(modeling_utils, "lazy_import_flash_attention", _emulated_lazy_import)
    monkeypatch.setattr(flash_integration, "get_target_dtype", lambda query, module: None)
