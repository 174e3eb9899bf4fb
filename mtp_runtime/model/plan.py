"""AttentionPlan: what one forward writes to the latent cache and what each query may attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import LatentCache


@dataclass
class AttentionPlan:
    """Explicit per-forward attention inputs shared by every layer of one network.

    With `cache=None` the forward is a plain causal pass over its own tokens (training, full-sequence logits).
    With a cache, layer i writes its new entries at `slots` and each query attends to the cache slots that
    `mask` marks (slots [0, S) where S = mask.shape[-1]); the cache length is never changed here.
    """

    positions: torch.Tensor
    """[B, n] RoPE positions of the new tokens (tree nodes at the same depth share one)."""
    cache: LatentCache | None = None
    slots: torch.Tensor | None = None
    """[B, n] cache slots the new entries are written to."""
    mask: torch.Tensor | None = None
    """[B, n, S] bool, True where query i may attend to cache slot j."""
    impl: str = "absorbed"
    """'absorbed' (attention over the latent, W_UK folded into q) or 'expanded' (decompressed K/V)."""
    causal_only: bool = False
    """The mask is exactly causal over the new tokens and nothing precedes them (training, a prefill into an
    empty cache), so causal-only kernels such as flash-attn may serve it; False keeps it on SDPA."""

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
        slots = lengths[:, None] + torch.arange(m - n, m, device=lengths.device)  # [B, n]
        total = int(lengths.max()) + m
        slot_ids = torch.arange(total, device=lengths.device)
        committed = (slot_ids >= start) & (slot_ids < lengths[:, None])  # [B, S]
        mask = committed[:, None, :].expand(b, n, total).clone()
        scratch_slots = (lengths[:, None, None] + torch.arange(m, device=lengths.device)).expand(b, n, m)
        mask.scatter_(2, scratch_slots, scratch_visible)
        return cls(positions=positions, cache=cache, slots=slots, mask=mask, impl=impl, causal_only=causal_only)
