"""Multi-head Latent Attention: low-rank q and kv, decoupled RoPE, absorbed and expanded paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .flash import causal_attention
from .norm import RMSNorm
from .plan import AttentionPlan
from .rope import RopeTables

LORA_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) without the module-call overhead (a decode step makes about 20 of these per layer). Only for
    projections that stay plain nn.Linear everywhere; o_proj is called as a module (tensor parallelism wraps it)."""
    return F.linear(x, linear.weight, linear.bias)


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

    def forward(self, hidden: torch.Tensor, plan: AttentionPlan, rope: RopeTables) -> torch.Tensor:
        """hidden [B, n, H] -> attention output [B, n, H]; writes this layer's new latents into plan.cache."""
        b, n, _ = hidden.shape
        q_nope, q_pe = self._queries(hidden)
        kv = _linear(self.kv_a_proj_with_mqa, hidden)
        c_kv = self.kv_a_layernorm(kv[..., : self.latent_dim])  # [B, n, R]
        if plan.cache is None:
            out = self._causal(q_nope, rope.apply(q_pe), c_kv, rope.apply(kv[..., self.latent_dim:]))
        else:
            k_pe = rope.rotate(kv[..., None, self.latent_dim:]).squeeze(-2)  # [B, n, dr]
            plan.cache.write(self.layer_idx, plan.slots, torch.cat([c_kv, k_pe], dim=-1))
            keys = plan.cache.read(self.layer_idx, plan.span)  # [B, S, R + dr]
            if plan.impl == "expanded":
                out = self._expanded(q_nope, rope.rotate(q_pe), keys, plan)
            else:
                out = self._absorbed(q_nope, rope.rotate(q_pe), keys, plan)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.v_dim))

    def _queries(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, n, heads, dn] and the un-roped q_pe [B, n, heads, dr]."""
        b, n, _ = hidden.shape
        if hasattr(self, "q_proj"):
            q = _linear(self.q_proj, hidden)
        else:
            q = _linear(self.q_b_proj, self.q_a_layernorm(_linear(self.q_a_proj, hidden)))
        q = q.view(b, n, self.num_heads, self.nope_dim + self.rope_dim)  # [B, n, heads, qk]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, q_pe

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]  # W_UK [heads, dn, R], W_UV [heads, dv, R]

    def _absorbed(self, q_nope, q_pe, keys, plan: AttentionPlan):
        """MQA over the shared latent: score = (q_nope W_UK) . c_kv + q_pe . k_pe, as ONE matmul of [q_lat | q_pe]
        against the cached [c_kv | k_pe] rows. Every head's query is a row of that matmul (head-major), so the cache
        is read once per sequence, not once per head; the mask is the plan's additive bias."""
        b, n, h, _ = q_nope.shape
        w_uk, w_uv = self._split_kv_b()
        q_lat = q_nope.transpose(1, 2) @ w_uk  # [B, heads, n, R]
        query = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).reshape(b, h * n, -1)  # [B, heads * n, R + dr]
        scores = torch.baddbmm(plan.head_bias(h, keys.dtype), query, keys.transpose(1, 2), alpha=self.scale)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(keys.dtype)  # [B, heads * n, S]
        out_lat = (probs @ keys[..., : self.latent_dim]).view(b, h, n, -1)  # [B, heads, n, R]
        return (out_lat @ w_uv.transpose(-1, -2)).transpose(1, 2)  # [B, n, heads, dv]

    def _decompress(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Per-head keys [B, S, heads, dqk] and values [B, S, heads, dv] from c_kv [B, S, R] and k_pe [B, S, dr]."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, s, self.num_heads, self.rope_dim)], dim=-1)
        return k, v

    def _causal(self, q_nope, q_pe, c_kv, k_pe):
        """Cache-free causal attention over the new tokens themselves (training, full-sequence logits)."""
        k, v = self._decompress(c_kv, k_pe)
        return causal_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale)

    def _expanded(self, q_nope, q_pe, keys, plan: AttentionPlan):
        """Decompress the cached latents with kv_b_proj and run ordinary attention (a causal kernel when the mask
        is exactly causal, masked SDPA otherwise)."""
        k, v = self._decompress(keys[..., : self.latent_dim], keys[..., self.latent_dim:])
        q = torch.cat([q_nope, q_pe], dim=-1)
        if plan.causal_only:
            return causal_attention(q, k, v, self.scale)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask[:, None], scale=self.scale)
        return out.transpose(1, 2)  # [B, n, heads, dv]
