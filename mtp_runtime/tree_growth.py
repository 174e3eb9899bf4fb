"""TreeGrowth: the pool of drafted nodes of one step, grown level by level (static shape or EAGLE-2 style).

Children are the top-k of the draft distribution under greedy decoding, and draws without replacement
(Gumbel-top-k) under sampling, which is what lossless multi-draft rejection sampling assumes.
"""

from __future__ import annotations

import torch

from .params import DraftParams
from .sampling import SamplingParams, logits_to_probs
from .verify.tree import DraftTree


class TreeGrowth:
    """The pool of drafted nodes of one step (node 0 is the root), grown level by level."""

    def __init__(self, roots: torch.Tensor, params: DraftParams, sampling: SamplingParams,
                 generator: torch.Generator | None, vocab_size: int):
        self.params, self.sampling, self.generator = params, sampling, generator
        b, device = roots.shape[0], roots.device
        cap = params.max_nodes + 1
        self.count = 1
        self.tokens = torch.zeros(b, cap, dtype=torch.long, device=device)
        self.tokens[:, 0] = roots
        self.parents = torch.full((b, cap), -1, dtype=torch.long, device=device)
        self.depths = torch.zeros(cap, dtype=torch.long, device=device)
        self.scores = torch.zeros(b, cap, device=device)
        self.valid = torch.ones(b, cap, dtype=torch.bool, device=device)
        self.anc = torch.zeros(b, cap, cap, dtype=torch.bool, device=device)
        self.anc[:, 0, 0] = True
        self.draft_probs = None if sampling.greedy else torch.zeros(b, cap, vocab_size, device=device)
        self.level_nodes: dict[int, list[int]] = {0: [0]}
        self.static_parents = set(params.shape.parents) if params.shape is not None else set()
        self.frontiers: dict[int, torch.Tensor] = {}  # a level never changes once built, nor its frontier

    def ancestors(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[B, u, c]: key node is an ancestor-or-self of query node."""
        rows = self.anc.gather(1, queries[..., None].expand(-1, -1, self.anc.shape[2]))  # [B, u, cap]
        return rows.gather(2, keys[:, None, :].expand(-1, queries.shape[1], -1))

    def frontier(self, depth: int) -> torch.Tensor:
        """[B, w] the nodes of `depth` that get children (static: by shape; dynamic: best w by score)."""
        if depth not in self.frontiers:
            self.frontiers[depth] = self._select_frontier(depth)
        return self.frontiers[depth]

    def _select_frontier(self, depth: int) -> torch.Tensor:
        level = torch.tensor(self.level_nodes.get(depth, []), dtype=torch.long, device=self.tokens.device)
        b = self.tokens.shape[0]
        if self.params.mode == "dynamic":
            scores = self.scores[:, level]
            best = scores.topk(min(self.params.topk, level.numel()), dim=1).indices
            return level[best]
        with_children = [i for i in level.tolist() if i in self.static_parents]
        return torch.tensor(with_children, dtype=torch.long, device=self.tokens.device).expand(b, -1)

    def expand(self, depth: int, frontier: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the children of frontier nodes [B, w] (at `depth`) given their draft logits [B, w, V]."""
        probs = logits.softmax(dim=-1) if self.sampling.greedy else logits_to_probs(logits, self.sampling)
        plan = self._child_plan(depth, frontier)  # list of (frontier column, child rank)
        max_rank = max(rank for _, rank in plan) + 1
        ranked = self._rank_children(probs, max_rank)  # [B, w, max_rank]
        if self.draft_probs is not None:
            self.draft_probs.scatter_(1, frontier[..., None].expand(-1, -1, probs.shape[-1]), probs)
        device = self.tokens.device
        columns = torch.tensor([c for c, _ in plan], dtype=torch.long, device=device)
        ranks = torch.tensor([r for _, r in plan], dtype=torch.long, device=device)
        nodes = torch.arange(self.count, self.count + len(plan), device=device)
        tokens = ranked[:, columns, ranks]  # [B, c]
        parents = frontier[:, columns]
        q = probs[:, columns].gather(2, tokens[..., None]).squeeze(-1)  # [B, c] draft probability of each child
        self.tokens[:, nodes] = tokens
        self.parents[:, nodes] = parents
        self.depths[nodes] = depth + 1
        self.scores[:, nodes] = self.scores.gather(1, parents) + q.clamp_min(1e-30).log()
        self.valid[:, nodes] = q > 0
        self.anc[:, nodes] = self.anc.gather(1, parents[..., None].expand(-1, -1, self.anc.shape[2]))
        self.anc[:, nodes, nodes] = True
        self.level_nodes[depth + 1] = nodes.tolist()
        self.count += len(plan)

    def _child_plan(self, depth: int, frontier: torch.Tensor) -> list[tuple[int, int]]:
        if self.params.mode == "dynamic":
            return [(col, rank) for col in range(frontier.shape[1]) for rank in range(self.params.topk)]
        shape = self.params.shape
        columns = {node: col for col, node in enumerate(frontier[0].tolist())}
        return [(columns[shape.parents[c]], shape.ranks[c]) for c in range(shape.num_nodes)
                if shape.depths[c] == depth + 1]

    def _rank_children(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k tokens (greedy) or k draws without replacement via Gumbel-top-k (sampling)."""
        if self.sampling.greedy:
            return probs.topk(k, dim=-1).indices
        uniform = torch.rand(probs.shape, generator=self.generator, device=probs.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return (probs.log() + gumbel).topk(k, dim=-1).indices

    def finish(self) -> DraftTree:
        """The tree to verify: every node (static), or the best num_draft_tokens nodes (dynamic)."""
        n = self.count
        keep = torch.arange(n, device=self.tokens.device).expand(self.tokens.shape[0], n)
        if self.params.mode == "dynamic" and n - 1 > self.params.num_draft_tokens:
            keep = self._select_dynamic(n)
        return self._subtree(keep)

    def _select_dynamic(self, n: int) -> torch.Tensor:
        """Greedy: the best nodes by cumulative draft probability (ancestor-closed, since a child never
        beats its parent). Sampling: the first nodes in growth order, which keeps the draws unbiased."""
        budget = self.params.num_draft_tokens
        b = self.tokens.shape[0]
        if not self.sampling.greedy:
            return torch.arange(budget + 1, device=self.tokens.device).expand(b, -1)
        by_depth = self.depths[1:n].argsort(stable=True) + 1
        scores = self.scores[:, by_depth]
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :budget]
        chosen = by_depth[order]  # [B, budget]
        chosen = chosen.sort(dim=1).values
        root = torch.zeros(b, 1, dtype=torch.long, device=self.tokens.device)
        return torch.cat([root, chosen], dim=1)

    def _subtree(self, keep: torch.Tensor) -> DraftTree:
        """Re-index the kept pool nodes [B, n'] (root first, parents before children) as a DraftTree."""
        b, n = keep.shape
        depths = self.depths[keep]  # [B, n']
        order = (depths * (self.count + 1) + keep).argsort(dim=1)
        keep = keep.gather(1, order)
        depths = depths.gather(1, order)
        position_of = torch.full((b, self.count), -1, dtype=torch.long, device=keep.device)
        position_of.scatter_(1, keep, torch.arange(n, device=keep.device).expand(b, n))
        parents = self.parents.gather(1, keep)
        new_parents = torch.where(parents < 0, parents, position_of.gather(1, parents.clamp_min(0)))
        probs = None
        if self.draft_probs is not None:
            probs = self.draft_probs.gather(1, keep[..., None].expand(-1, -1, self.draft_probs.shape[-1]))
        return DraftTree(tokens=self.tokens.gather(1, keep), parents=new_parents, depths=depths,
                         draft_probs=probs, valid=self.valid.gather(1, keep))
