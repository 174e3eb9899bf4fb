"""Multi-head Latent Attention: low-rank q and kv, decoupled RoPE, absorbed and expanded paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .flash import flash_available, flash_causal
from .plan import AttentionPlan
from .rope import Rotary

LORA_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


class MLA(nn.Module):
    """DeepSeek MLA; the cache holds only the normalised latent c_kv and the roped shared key k_pe."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.scale = config.softmax_scale
        h, qk = config.hidden_size, config.qk_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.latent_dim + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.latent_dim, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=bias)

    def forward(self, hidden: torch.Tensor, plan: AttentionPlan, rotary: Rotary,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """hidden [B, n, H] -> attention output [B, n, H]; writes this layer's new latents into plan.cache."""
        b, n, _ = hidden.shape
        q_nope, q_pe = self._queries(hidden, rotary, cos_sin)
        c_kv, k_pe = self._latents(hidden, rotary, cos_sin)
        if plan.cache is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None].expand(b, n, n)
        else:
            plan.cache.write(self.layer_idx, plan.slots, c_kv, k_pe)
            mask = plan.mask
            c_kv, k_pe = plan.cache.read(self.layer_idx, mask.shape[-1])
        if plan.impl == "expanded":
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, mask, plan.causal_only)
        else:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.v_dim))

    def _queries(self, hidden, rotary, cos_sin):
        b, n, _ = hidden.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(b, n, self.num_heads, self.nope_dim + self.rope_dim)  # [B, n, heads, qk]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, rotary.apply(q_pe, *cos_sin)

    def _latents(self, hidden, rotary, cos_sin):
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.latent_dim, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), rotary.apply(k_pe, *cos_sin)

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]  # W_UK [heads, dn, R], W_UV [heads, dv, R]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """MQA over the shared latent: score = (q_nope W_UK) . c_kv + q_pe . k_pe. Every head's query is a row of
        one batched matmul against the latent, so the cache is read once per sequence, not once per head."""
        b, n, h, _ = q_nope.shape
        w_uk, w_uv = self._split_kv_b()
        q_lat = (q_nope.transpose(1, 2) @ w_uk).transpose(1, 2).reshape(b, n * h, -1)  # [B, n * heads, R]
        q_rope = q_pe.reshape(b, n * h, -1)  # [B, n * heads, dr]
        scores = q_lat @ c_kv.transpose(1, 2) + q_rope @ k_pe.transpose(1, 2)  # [B, n * heads, S]
        hidden = ~mask[:, :, None].expand(b, n, h, mask.shape[-1]).reshape(b, n * h, -1)
        probs = (scores * self.scale).float().masked_fill(hidden, float("-inf")).softmax(dim=-1).to(c_kv.dtype)
        out_lat = (probs @ c_kv).view(b, n, h, -1)  # [B, n, heads, R]
        return (out_lat.transpose(1, 2) @ w_uv.transpose(-1, -2)).transpose(1, 2)  # [B, n, heads, dv]

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask, causal_only: bool = False):
        """Decompress K/V with kv_b_proj and run ordinary attention (flash-attn for causal prefill on CUDA
        when installed, SDPA otherwise)."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, s, self.num_heads, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if causal_only and flash_available(q):
            return flash_causal(q, k, v, self.scale)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=self.scale)
        return out.transpose(1, 2)  # [B, n, heads, dv]
