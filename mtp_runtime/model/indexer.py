"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2) and its top-k key selection.

Per attention layer: n_heads indexer queries q = wq_b(q latent) per token and ONE shared key k = k_norm(wk(x))
per token (cached beside c_kv / k_pe), both roped on their first qk_rope_head_dim dims in half-split layout
(never interleaved, unlike the MLA rope). Query s scores key t as

    I[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t] / sqrt(head_dim)),   w = weights_proj(x) / sqrt(n_heads)

(weights_proj is kept and computed in float32, the dot products in float32). Only the keys a query may see
compete, and it attends to the min(topk, visible) best.

Ties are broken by a fixed rule, the lower cache slot wins: a key on which no indexer head fires scores exactly 0,
so ties are common, and `torch.topk` alone breaks them differently for different numbers of queries. With the rule
a query selects the same keys in a tree-verify forward as in a one-token step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import RopeTables

INDEXER_NORM_EPS = 1e-6
"""The key LayerNorm's eps (DeepSeek's and transformers' value, not rms_norm_eps)."""


class Indexer(nn.Module):
    """Scores queries against keys; parameter names follow checkpoints (`self_attn.indexer.*`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        spec = config.indexer
        self.n_heads, self.head_dim, self.topk = spec.n_heads, spec.head_dim, spec.topk
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim ** -0.5

    def keys(self, hidden: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """hidden [B, n, H] -> roped indexer keys [B, n, D] (what the cache stores)."""
        k = self.k_norm(F.linear(hidden, self.wk.weight))
        return self._rope(k[:, :, None], rope)[:, :, 0]

    def queries(self, q_latent: torch.Tensor, hidden: torch.Tensor,
                rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """q latent [B, n, q_lora_rank] and hidden [B, n, H] -> roped queries [B, n, heads, D] and the float32
        head weights [B, n, heads] (the 1/sqrt(n_heads) included)."""
        b, n, _ = q_latent.shape
        q = F.linear(q_latent, self.wq_b.weight).view(b, n, self.n_heads, self.head_dim)
        weights = F.linear(hidden.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5
        return self._rope(q, rope), weights

    def scores(self, queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """queries [B, n, heads, D], weights [B, n, heads], keys [B, S, D], visible [B, n, S] -> float32 scores
        [B, n, S], -inf where a key is not visible."""
        b, n, h, d = queries.shape
        # [B, n * heads, D] @ [B, D, S] -> [B, n, heads, S]
        dots = (queries.float().reshape(b, n * h, d) @ keys.float().transpose(1, 2)).view(b, n, h, -1)
        per_head = (dots * self.scale).relu_()
        scores = (weights[:, :, None, :] @ per_head)[:, :, 0]  # [B, n, 1, heads] @ [B, n, heads, S]
        return scores.masked_fill_(~visible, float("-inf"))

    def _rope(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """RoPE on the first rope_dim dims of x [B, n, k, D], half-split; the rest passes through."""
        return torch.cat([rope.apply_half_split(x[..., : self.rope_dim]), x[..., self.rope_dim:]], dim=-1)


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Slots [B, n, k] of the k best scores [B, n, S] per query, in ascending slot order; equal scores go to the
    lower slot, so the choice never depends on which other queries share the forward.

    Slots past a query's visible keys (scores -inf) fill its selection when it sees fewer than k; callers mask
    them with the visibility they scored with.
    """
    kth = scores.topk(k, dim=-1).values[..., -1:]  # [B, n, 1] the k-th best score
    above = scores > kth
    tied = ~(above | (scores < kth))  # equal to the k-th (NaN counts as tied, so exactly k are always chosen)
    room = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1) <= room))  # [B, n, S], exactly k per query
    return chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)


def selection_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """[B, n, S] bool: visible and among the query's top k (the masked dense form of select_top_k)."""
    chosen = torch.zeros_like(visible).scatter_(-1, select_top_k(scores, k), True)
    return chosen & visible
