"""DeepSeekMoE: a routing gate, fine-grained routed experts run grouped by expert, and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class DenseMLP(nn.Module):
    """SwiGLU feed-forward (dense layers and the shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Chooses num_experts_per_tok experts per token and their weights (V2 softmax or V3 sigmoid + bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k])."""
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.n_group > 1:
            choice = self._mask_groups(choice)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only the topk_group best expert groups of each token."""
        cfg = self.config
        grouped = choice.view(choice.shape[0], cfg.n_group, -1)  # [T, groups, experts per group]
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        fill = float("-inf") if cfg.topk_method == "noaux_tc" else 0.0
        return grouped.masked_fill(~keep[..., None], fill).view_as(choice)


GATHERED_MAX_TOKENS = 1
"""Up to this many tokens (a plain decode step of one sequence), the chosen experts run as one batched matmul over
their gathered weights: no host sync, no Python loop. Gathering copies k expert matrices per token, so from two
tokens on, sorting tokens by expert and running each expert once is faster (measured: BENCHMARKS.md)."""


class RoutedExperts(nn.Module):
    """Expert weights fused into 3-D tensors [experts, out, in]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] -> weighted sum of expert outputs [T, H]."""
        if ids.shape[0] <= GATHERED_MAX_TOKENS:
            return self._gathered(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair as one row of a batched matmul over the chosen experts' weights."""
        t, k = ids.shape
        flat_ids = ids.reshape(-1)  # [T * k]
        rows = x[:, None, :].expand(t, k, x.shape[-1]).reshape(t * k, 1, -1)  # [T * k, 1, H]
        gate = rows @ self.gate_proj[flat_ids].transpose(1, 2)  # [T * k, 1, I]
        act = F.silu(gate) * (rows @ self.up_proj[flat_ids].transpose(1, 2))
        out = (act @ self.down_proj[flat_ids].transpose(1, 2)).view(t, k, -1)  # [T, k, H]
        return (out * weights[..., None].to(out.dtype)).sum(dim=1)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert; each expert with tokens runs once on its contiguous segment."""
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)  # [T * k]
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.gate_proj.shape[0]).tolist()
        rows = x[token_of]  # [T * k, H] sorted by expert
        outputs = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                seg = rows[start:start + count]
                act = F.silu(seg @ self.gate_proj[expert].T) * (seg @ self.up_proj[expert].T)
                outputs[start:start + count] = act @ self.down_proj[expert].T
                start += count
        scaled = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, scaled)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = DenseMLP(config.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [B * n, H]
        weights, ids = self.gate(flat)
        out = self.experts(flat, weights, ids).view_as(x)
        return out + self.shared_experts(x) if self.shared_experts is not None else out
