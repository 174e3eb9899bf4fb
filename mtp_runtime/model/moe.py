"""DeepSeekMoE: a routing gate, fine-grained routed experts, and shared experts.

Routed experts never copy weights:
* a decode step, or any step of at most PAIRS_MAX (token, expert) pairs (five tokens of top-2 routing): each
  pair runs on views of its expert's weights, so only the chosen experts' weights are read (decoding a small
  model is bound by the bytes of weights it reads). The expert ids are read once (on the host in eager mode;
  as unbacked integers inside a compiled graph, which unrolls the pairs of its fixed shape without a graph
  break);
* up to DENSE_MAX_TOKENS tokens: every expert on every token, weighted by its routing weight (zero where not
  chosen), one matmul per projection over all experts' weights at once: no sort, no host read;
* more tokens: sorted by expert, then one grouped matmul per projection over every expert's segment
  (`grouped_swiglu`, an op of its own), which reads each used expert once; training runs each expert once on its
  segment instead (`swiglu_per_expert`, differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

PAIRS_MAX = 10
"""Up to this many (token, expert) pairs run pair by pair: five tokens of top-2 routing. Past that the grouped
matmul, which reads each used expert once where pairs re-read the experts tokens share, is as fast or faster;
below it the grouped path's fixed cost per layer (sorting, the op call, a `_grouped_mm` per projection) is the
larger part. Compiled trunk over n nodes of real text, shipped 20-layer model, 256 cached tokens, medians of 150
alternating calls (BENCHMARKS.md §14): n=3 13.6 ms pair by pair vs 17.0 grouped, n=5 16.4 vs 18.3, n=7 20.5 vs
20.4 (§12 measured 16 pairs: 2.68 vs 2.09 plain steps compiled). One token always runs per pair: it reads only
its own experts."""


DENSE_MAX_TOKENS = 12
"""Past PAIRS_MAX pairs and up to this many tokens, the experts run densely. Such a step uses most experts anyway
(a 9-node verify of real text: 5-6 of the shipped model's 8 per layer), and reading all of them in three matmuls
costs less than the grouped path's sort, op call and grouped matmuls (which on the CPU copy the transposed
weights they are given): compiled trunk over 7 / 9 / 12 nodes 14.0 / 21.5 / 22.9 ms vs 16.8 / 25.5 / 24.3 ms
grouped (at 16 nodes the two are even), eager experts over 9 tokens 571 vs 681 us per layer (BENCHMARKS.md
§15)."""


class DenseMLP(nn.Module):
    """SwiGLU feed-forward (dense layers and the shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for weight matrices [I, H], [I, H], [H, I]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


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
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.topk_group < cfg.n_group:
            choice = self._mask_groups(choice)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else weights), ids

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


def swiglu_per_expert(rows: torch.Tensor, ends: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e over its segment of the expert-sorted rows [N, H] (segment e ends at row ends[e]), for
    stacked weights gate/up [E, I, H] and down [E, H, I] -> [N, H]; each expert with rows runs once (the segment
    ends are read on the host). Differentiable: training takes this path."""
    outputs = torch.empty(rows.shape[0], down.shape[1], dtype=rows.dtype, device=rows.device)
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            outputs[start:end] = swiglu(rows[start:end], gate[expert], up[expert], down[expert])
        start = end
    return outputs


@torch.library.custom_op("mtp_runtime::grouped_swiglu", mutates_args=())
def grouped_swiglu(rows: torch.Tensor, ends: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """`swiglu_per_expert` as one grouped matmul per projection where torch has one for the device (the CPU);
    an op of its own, opaque to torch.compile, so that compiled graphs stay whole around it. Inference only."""
    if not (hasattr(torch, "_grouped_mm") and rows.device.type == "cpu"):
        return swiglu_per_expert(rows, ends, gate, up, down)
    offsets = ends.to(torch.int32)
    act = F.silu(torch._grouped_mm(rows, gate.transpose(1, 2), offs=offsets))
    act = act * torch._grouped_mm(rows, up.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(act, down.transpose(1, 2), offs=offsets)


@grouped_swiglu.register_fake
def _grouped_swiglu_shape(rows, ends, gate, up, down):
    return rows.new_empty(rows.shape[0], down.shape[1])


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
        if ids.shape[1] == 0:
            return torch.zeros_like(x)
        if x.shape[0] * ids.shape[1] <= PAIRS_MAX:
            return self._per_pair(x, weights, ids)
        if x.shape[0] <= DENSE_MAX_TOKENS:
            return self._dense(x, weights, ids)
        experts, k = self.gate_proj.shape[0], ids.shape[1]
        flat_ids = ids.reshape(-1)  # [T * k]
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        counts = torch.zeros(experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))
        segments = swiglu_per_expert if torch.is_grad_enabled() else grouped_swiglu
        outputs = segments(x[token_of], counts.cumsum(0), self.gate_proj, self.up_proj, self.down_proj)
        scaled = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, scaled)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]: every expert on every token, each output weighted by the token's routing weight for it."""
        t, (experts, inner, hidden) = x.shape[0], self.gate_proj.shape
        routing = torch.zeros(t, experts, dtype=x.dtype, device=x.device).scatter_(1, ids, weights.to(x.dtype))
        gate = F.linear(x, self.gate_proj.reshape(experts * inner, hidden)).view(t, experts, inner)
        up = F.linear(x, self.up_proj.reshape(experts * inner, hidden)).view(t, experts, inner)
        chosen = routing[:, :, None] != 0  # [T, E, 1]: an expert a token did not choose adds an exact zero
        act = torch.where(chosen, F.silu(gate) * up * routing[:, :, None], 0.0).transpose(0, 1)  # [E, T, I]
        return torch.bmm(act, self.down_proj.transpose(1, 2)).sum(0)  # [E, T, H] -> [T, H]

    def _per_pair(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]: each (token, chosen expert) pair on views of that expert's weights."""
        experts = self.gate_proj.shape[0]
        rows = []
        for t, chosen in enumerate(ids.tolist()):
            out = None
            for slot, expert in enumerate(chosen):
                torch._check(expert >= 0)
                torch._check(expert < experts)
                y = swiglu(x[t: t + 1], self.gate_proj[expert], self.up_proj[expert], self.down_proj[expert])
                y = y * weights[t: t + 1, slot, None].to(y.dtype)
                out = y if out is None else out + y
            rows.append(out)
        return rows[0] if len(rows) == 1 else torch.cat(rows)


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
