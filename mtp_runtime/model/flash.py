"""Optional flash-attn kernel for causal prefill on CUDA (the `gpu` extra); SDPA serves every other case."""

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


def flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention q, k [B, T, heads, dqk], v [B, T, heads, dv] -> [B, T, heads, dv].

    flash-attn wants one head size for q, k and v, so v is zero-padded to dqk and the padding cut off after.
    """
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[..., :v_dim]
