"""AttentionPlan: what one forward writes to the latent cache and what each query may attend to.

This is the one home of attention masks: causal visibility, the committed-prefix-plus-scratch mask of a forward
over the cache, and the additive per-head bias the absorbed kernel adds to its scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import LatentCache
from ..errors import CacheCapacityError

EXPANDED_MIN_TOKENS = 32
"""Forwards over at least this many new tokens (long prefills) use expanded (decompressed) attention."""


def attention_impl(num_new_tokens: int) -> str:
    """Expanded attention pays off for long prefills; decode, verify and drafting use the absorbed path."""
    return "expanded" if num_new_tokens >= EXPANDED_MIN_TOKENS else "absorbed"


def causal_visibility(batch: int, n: int, positions: torch.Tensor, start: int) -> torch.Tensor:
    """[B, n, n]: causal, hiding keys whose position is below `start`; every query always sees itself."""
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=positions.device)
    return (causal & (positions >= start)[:, None, :]) | eye


@dataclass
class AttentionPlan:
    """Explicit per-forward attention inputs shared by every layer of one network.

    With `cache=None` the forward is a plain causal pass over its own tokens (training, full-sequence logits).
    With a cache, layer i writes its new entries at `slots` and each query attends to the cache slots that
    `mask` marks (slots [0, span)); the cache length is never changed here.
    """

    positions: torch.Tensor
    """[B, n] RoPE positions of the new tokens (tree nodes at the same depth share one)."""
    cache: LatentCache | None = None
    slots: torch.Tensor | None = None
    """[B, n] cache slots the new entries are written to."""
    mask: torch.Tensor | None = None
    """[B, n, span] bool, True where query i may attend to cache slot j."""
    impl: str = "absorbed"
    """'absorbed' (attention over the latent, W_UK folded into q) or 'expanded' (decompressed K/V)."""
    causal_only: bool = False
    """The mask is exactly causal over the new tokens and nothing precedes them (training, a prefill into an
    empty cache), so causal kernels (flash-attn, SDPA's causal kernel) may serve it; False keeps the mask."""
    _biases: dict = field(default_factory=dict, repr=False)

    @property
    def span(self) -> int:
        """Cache slots [0, span) that this forward's queries may attend to."""
        return self.mask.shape[-1]

    def head_bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, heads * n, span] additive mask (0 visible, -inf hidden), rows head-major; built once per forward."""
        key = (heads, dtype)
        if key not in self._biases:
            b, n, span = self.mask.shape
            bias = torch.zeros(b, n, span, dtype=dtype, device=self.mask.device).masked_fill_(~self.mask, float("-inf"))
            self._biases[key] = bias.repeat(1, heads, 1)  # row h * n + i is query i of head h
        return self._biases[key]

    @classmethod
    def causal(cls, batch_size: int, length: int, device: torch.device | str = "cpu") -> "AttentionPlan":
        """Cache-free causal plan over positions 0..length-1."""
        positions = torch.arange(length, device=device).expand(batch_size, length)
        return cls(positions=positions, impl="expanded", causal_only=True)

    @classmethod
    def over_cache(cls, cache: LatentCache, positions: torch.Tensor, scratch_visible: torch.Tensor,
                   start: int = 0, impl: str = "absorbed", causal_only: bool = False) -> "AttentionPlan":
        """Plan for n new entries appended after `m - n` earlier uncommitted (scratch) entries.

        scratch_visible [B, n, m]: query i may see scratch entry j (slot lengths + j); the n new entries are
        the last n scratch entries. Committed slots [start, lengths) are visible to every query.
        """
        b, n, m = scratch_visible.shape
        lengths = cache.lengths
        span = cache.max_length + m
        if span > cache.capacity:
            raise CacheCapacityError(f"cache capacity {cache.capacity} exceeded (slot {span - 1}); "
                                     "lower max_new_tokens or the prompt length")
        device = lengths.device
        slots = lengths[:, None] + torch.arange(m - n, m, device=device)  # [B, n]
        slot_ids = torch.arange(span, device=device)
        committed = (slot_ids >= start) & (slot_ids < lengths[:, None])  # [B, span]
        mask = committed[:, None, :].expand(b, n, span).clone()
        scratch_slots = (lengths[:, None, None] + torch.arange(m, device=device)).expand(b, n, m)
        mask.scatter_(2, scratch_slots, scratch_visible)
        return cls(positions=positions, cache=cache, slots=slots, mask=mask, impl=impl, causal_only=causal_only)
