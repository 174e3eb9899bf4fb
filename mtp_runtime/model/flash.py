"""Causal attention kernels for training and prefill: flash-attn on CUDA (the optional `gpu` extra) where it can run,
otherwise SDPA's causal kernel (torch's flash kernel for CPU); masked attention stays with the caller's SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:  # the optional `gpu` extra is not installed
    flash_attn_func = None


def flash_available(q: torch.Tensor) -> bool:
    """flash-attn is installed and can run this query (CUDA, half precision)."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention q, k [B, T, heads, dqk], v [B, T, heads, dv] -> [B, T, heads, dv].

    Both kernels want one head size for q, k and v (SDPA otherwise falls back to its slow math path), so v is
    zero-padded to dqk and the padding cut off after.
    """
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    if flash_available(q):
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[..., :v_dim]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)[..., :v_dim]
