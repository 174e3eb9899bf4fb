"""TreeGrowth: the pool of drafted nodes of one step, grown level by level (static shape or EAGLE-2 style).

The pool is laid out by depth: node 0 is the root, then the nodes of depth 1, then those of depth 2, and so on.
A static shape fixes everything but the tokens (parents, depths, ancestors, which nodes get children and with
which ranks), so that layout is built once per shape and device (`StaticPool`) and a step only writes tokens.
Dynamic growth keeps a fixed layout too (depth 1 holds topk nodes, every deeper depth topk x topk: the children
of the topk frontier nodes chosen by cumulative draft probability), but its parents and ancestors are data.

Children are the top-k of the draft distribution under greedy decoding, and draws without replacement
(Gumbel-top-k) under sampling, which is what lossless multi-draft rejection sampling assumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .params import DraftParams
from .sampling import SamplingParams, logits_to_probs
from .verify.tree import DraftTree, StaticTreeShape


@dataclass(frozen=True)
class LevelPlan:
    """How the nodes of one depth get their children."""

    frontier: torch.Tensor
    """[w] static: the pool nodes of this depth that have children; dynamic: every node of this depth (the
    candidates the frontier is chosen from each step)."""
    children: torch.Tensor
    """[c] pool indices of the children, in pool order."""
    columns: torch.Tensor
    """[c] which frontier node (its column in the frontier) each child hangs from."""
    ranks: torch.Tensor
    """[c] each child is its parent's ranks-th best draft."""
    max_rank: int


@dataclass(frozen=True)
class PoolLayout:
    """Everything about a pool that does not depend on the drafted tokens."""

    size: int
    """Nodes in the pool, the root included."""
    depths: torch.Tensor
    """[size] depth of each pool node."""
    levels: tuple[LevelPlan, ...]
    """levels[d]: how the nodes of depth d get children (d = 0 .. max depth - 1)."""
    parents: torch.Tensor | None = None
    """[size] static shapes only: each node's parent (-1 for the root)."""
    ancestors: torch.Tensor | None = None
    """[size, size] static shapes only: [i, j] is True iff node j is node i or one of its ancestors."""


@functools.lru_cache(maxsize=64)
def static_layout(shape: StaticTreeShape, device: torch.device) -> PoolLayout:
    """The pool of a static shape (its node order is the shape's own: by depth, then by ranks)."""
    n = shape.num_nodes
    parents = torch.tensor(shape.parents, dtype=torch.long)
    ancestors = torch.eye(n, dtype=torch.bool)
    for node in range(1, n):
        ancestors[node] |= ancestors[shape.parents[node]]
    levels = []
    for depth in range(shape.max_depth):
        children = [c for c in range(n) if shape.depths[c] == depth + 1]
        frontier = sorted({shape.parents[c] for c in children})
        column = {node: i for i, node in enumerate(frontier)}
        ranks = [shape.ranks[c] for c in children]
        levels.append(LevelPlan(
            frontier=torch.tensor(frontier, dtype=torch.long, device=device),
            children=torch.tensor(children, dtype=torch.long, device=device),
            columns=torch.tensor([column[shape.parents[c]] for c in children], dtype=torch.long, device=device),
            ranks=torch.tensor(ranks, dtype=torch.long, device=device), max_rank=max(ranks) + 1))
    return PoolLayout(size=n, depths=torch.tensor(shape.depths, dtype=torch.long, device=device),
                      levels=tuple(levels), parents=parents.to(device), ancestors=ancestors.to(device))


@functools.lru_cache(maxsize=64)
def dynamic_layout(depth: int, topk: int, device: torch.device) -> PoolLayout:
    """Depth 1: topk children of the root; depth d > 1: topk children of each of topk frontier nodes."""
    levels, depths = [], [0]
    nodes = torch.zeros(1, dtype=torch.long, device=device)  # the nodes of depth d, starting with the root
    for d in range(depth):
        width = 1 if d == 0 else topk  # frontier nodes that get children
        children = torch.arange(len(depths), len(depths) + width * topk, device=device)
        levels.append(LevelPlan(frontier=nodes, children=children,
                                columns=torch.arange(width, device=device).repeat_interleave(topk),
                                ranks=torch.arange(topk, device=device).repeat(width), max_rank=topk))
        depths += [d + 1] * children.numel()
        nodes = children
    start = len(depths)
    return PoolLayout(size=start, depths=torch.tensor(depths, dtype=torch.long, device=device), levels=tuple(levels))


class TreeGrowth:
    """The pool of drafted nodes of one step (node 0 is the root), grown level by level."""

    def __init__(self, roots: torch.Tensor, params: DraftParams, sampling: SamplingParams,
                 generator: torch.Generator | None, vocab_size: int):
        self.params, self.sampling, self.generator = params, sampling, generator
        b, device = roots.shape[0], roots.device
        self.dynamic = params.mode == "dynamic"
        self.layout = dynamic_layout(params.depth, params.topk, device) if self.dynamic \
            else static_layout(params.shape, device)
        size = self.layout.size
        self.tokens = torch.zeros(b, size, dtype=torch.long, device=device)
        self.tokens[:, 0] = roots
        self.valid = None if sampling.greedy else torch.ones(b, size, dtype=torch.bool, device=device)
        self.draft_probs = None if sampling.greedy else torch.zeros(b, size, vocab_size, device=device)
        if self.dynamic:
            self.parents = torch.full((b, size), -1, dtype=torch.long, device=device)
            self.scores = torch.zeros(b, size, device=device)
            self.anc = torch.zeros(b, size, size, dtype=torch.bool, device=device)
            self.anc[:, 0, 0] = True
        else:
            self.parents = self.layout.parents.expand(b, size)
        self.frontiers: dict[int, torch.Tensor] = {}  # a level never changes once built, nor its frontier

    @property
    def depths(self) -> torch.Tensor:
        """[size] depth of each pool node (the same in every row)."""
        return self.layout.depths

    def ancestors(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[B, u, c]: key node is an ancestor-or-self of query node, for queries [B, u] and keys [B, c]."""
        if not self.dynamic:
            return self.layout.ancestors[queries[0]][:, keys[0]].expand(queries.shape[0], -1, -1)
        rows = self.anc.gather(1, queries[..., None].expand(-1, -1, self.anc.shape[2]))  # [B, u, size]
        return rows.gather(2, keys[:, None, :].expand(-1, queries.shape[1], -1))

    def frontier(self, depth: int) -> torch.Tensor:
        """[B, w] the nodes of `depth` that get children (static: by shape; dynamic: best w by score)."""
        if depth not in self.frontiers:
            self.frontiers[depth] = self._select_frontier(depth)
        return self.frontiers[depth]

    def _select_frontier(self, depth: int) -> torch.Tensor:
        candidates = self.layout.levels[depth].frontier
        if not self.dynamic or depth == 0:
            return candidates.expand(self.tokens.shape[0], -1)
        best = self.scores[:, candidates].topk(min(self.params.topk, candidates.numel()), dim=1).indices
        return candidates[best]

    def expand(self, depth: int, frontier: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the children of frontier nodes [B, w] (at `depth`) given their draft logits [B, w, V]."""
        plan = self.layout.levels[depth]
        greedy_static = self.sampling.greedy and not self.dynamic
        probs = None if greedy_static else self._probs(logits)
        ranked = self._rank_children(logits if probs is None else probs, plan.max_rank)  # [B, w, max_rank]
        tokens = ranked[:, plan.columns, plan.ranks]  # [B, c]
        self.tokens[:, plan.children] = tokens
        if self.draft_probs is not None:
            self.draft_probs.scatter_(1, frontier[..., None].expand(-1, -1, probs.shape[-1]), probs)
        if probs is None:
            return
        q = probs[:, plan.columns].gather(2, tokens[..., None]).squeeze(-1)  # [B, c] draft probability of each child
        if self.valid is not None:
            self.valid[:, plan.children] = q > 0
        if self.dynamic:
            parents = frontier[:, plan.columns]
            self.parents[:, plan.children] = parents
            self.scores[:, plan.children] = self.scores.gather(1, parents) + q.clamp_min(1e-30).log()
            self.anc[:, plan.children] = self.anc.gather(1, parents[..., None].expand(-1, -1, self.anc.shape[2]))
            self.anc[:, plan.children, plan.children] = True

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft distribution: the raw softmax under greedy decoding (scores only), else the sampling one."""
        return logits.softmax(dim=-1) if self.sampling.greedy else logits_to_probs(logits, self.sampling)

    def _rank_children(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k tokens (greedy; logits or probabilities rank alike) or k draws without replacement via
        Gumbel-top-k (sampling)."""
        if self.sampling.greedy:
            return scores.topk(k, dim=-1).indices
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return (scores.log() + gumbel).topk(k, dim=-1).indices

    def finish(self) -> DraftTree:
        """The tree to verify: every node (static), or the best num_draft_tokens nodes (dynamic)."""
        if not self.dynamic:
            b = self.tokens.shape[0]
            return DraftTree(tokens=self.tokens, parents=self.parents, depths=self.depths.expand(b, -1),
                             draft_probs=self.draft_probs, valid=self.valid,
                             chain=self.layout.size == len(self.layout.levels) + 1)
        n = self.layout.size
        keep = torch.arange(n, device=self.tokens.device).expand(self.tokens.shape[0], n)
        if n - 1 > self.params.num_draft_tokens:
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
        size = self.layout.size
        depths = self.depths[keep]  # [B, n']
        order = (depths * (size + 1) + keep).argsort(dim=1)
        keep = keep.gather(1, order)
        depths = depths.gather(1, order)
        position_of = torch.full((b, size), -1, dtype=torch.long, device=keep.device)
        position_of.scatter_(1, keep, torch.arange(n, device=keep.device).expand(b, n))
        parents = self.parents.gather(1, keep)
        new_parents = torch.where(parents < 0, parents, position_of.gather(1, parents.clamp_min(0)))
        probs = None
        if self.draft_probs is not None:
            probs = self.draft_probs.gather(1, keep[..., None].expand(-1, -1, self.draft_probs.shape[-1]))
        valid = None if self.valid is None else self.valid.gather(1, keep)
        return DraftTree(tokens=self.tokens.gather(1, keep), parents=new_parents, depths=depths,
                         draft_probs=probs, valid=valid)
