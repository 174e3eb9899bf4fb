"""Expert parallelism: each rank holds routed experts [rank * E/W, (rank + 1) * E/W) and a share of the
shared experts' channels; the gate runs replicated, and one all-reduce per MoE layer sums the partial outputs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..model.moe import MoE, RoutedExperts
from .group import ParallelGroup
from .linear import local_copy, local_mlp


class LocalRoutedExperts(RoutedExperts):
    """This rank's routed experts only (expert ids from `offset`); pairs routed to other ranks contribute zero.

    Runs the parent's grouped-by-expert math on the (token, expert) pairs that stay here, each as its own row.
    """

    def __init__(self, experts: RoutedExperts, config: ModelConfig, group: ParallelGroup):
        local = group.local_range(experts.gate_proj.shape[0])
        with torch.device("meta"):
            super().__init__(dataclasses.replace(config, n_routed_experts=local.stop - local.start))
        self.gate_proj = local_copy(experts.gate_proj, local)  # [E / W, I, H]
        self.up_proj = local_copy(experts.up_proj, local)  # [E / W, I, H]
        self.down_proj = local_copy(experts.down_proj, local)  # [E / W, H, I]
        self.offset = local.start

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] (global expert ids) -> this rank's share of the weighted sum [T, H]."""
        local_ids = ids - self.offset
        here = (local_ids >= 0) & (local_ids < self.gate_proj.shape[0])  # [T, k]
        tokens, slots = here.nonzero(as_tuple=True)  # [N] each: the pairs routed to this rank
        out = torch.zeros_like(x)
        if tokens.numel():
            pairs = super().forward(x[tokens], weights[tokens, slots, None], local_ids[tokens, slots, None])  # [N, H]
            out.index_add_(0, tokens, pairs)
        return out


class ParallelMoE(nn.Module):
    """Replicated gate, local routed experts, local shared-expert channels, one all-reduce of their sum."""

    def __init__(self, moe: MoE, config: ModelConfig, group: ParallelGroup):
        super().__init__()
        self.gate = moe.gate
        self.experts = LocalRoutedExperts(moe.experts, config, group)
        self.shared_experts = local_mlp(moe.shared_experts, group) if moe.shared_experts is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [B * n, H]
        weights, ids = self.gate(flat)
        out = self.experts(flat, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return self.group.all_reduce(out).view_as(x)
