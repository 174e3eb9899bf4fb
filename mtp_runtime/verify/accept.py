"""Acceptance rules: which root-first path of a verified draft tree is emitted, plus one bonus token.

`accept_greedy` and `accept_sampling` are lossless: the emitted tokens follow exactly the
distribution plain decoding would produce. `accept_typical` is Medusa's lossy shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GenerationSettingsError
from ..sampling import sample
from .tree import DraftTree


@dataclass
class Acceptance:
    """The outcome of one verify step for every row."""

    path: torch.Tensor
    """[B, P] accepted node indices, root first (path[:, 0] == 0), padded with -1; P = max depth + 1."""
    num_accepted: torch.Tensor
    """[B] number of accepted drafted nodes; path has num_accepted + 1 valid entries."""
    bonus: torch.Tensor
    """[B] the token emitted after the path, from the target (or residual) distribution."""


def accept_greedy(tree: DraftTree, target_argmax: torch.Tensor) -> Acceptance:
    """Deepest path on which every node is the trunk's argmax after its parent; bonus: the argmax after it."""
    if tree.chain:
        return _accept_greedy_chain(tree, target_argmax)
    expected = target_argmax.gather(1, tree.parents.clamp(min=0))  # [B, n] the trunk's token at each node's place
    correct = (tree.tokens == expected) & _valid(tree)
    last = _deepest(tree, _on_accepted_path(tree, correct), torch.zeros_like(tree.tokens, dtype=torch.float))
    bonus = target_argmax.gather(1, last[:, None]).squeeze(1)
    return _acceptance(tree, last, bonus)


def _accept_greedy_chain(tree: DraftTree, target_argmax: torch.Tensor) -> Acceptance:
    """The same rule on a chain, where the accepted path is a prefix: the first mismatch ends it (Medusa's
    cumprod)."""
    correct = tree.tokens[:, 1:] == target_argmax[:, :-1]  # [B, n - 1] node i + 1 is the argmax after node i
    if tree.valid is not None:
        correct &= tree.valid[:, 1:]
    num_accepted = correct.long().cumprod(dim=1).sum(dim=1)  # [B]
    nodes = torch.arange(tree.tokens.shape[1], device=tree.tokens.device)
    path = torch.where(nodes <= num_accepted[:, None], nodes, -1)  # [B, n] root first, padded with -1
    bonus = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)
    return Acceptance(path=path, num_accepted=num_accepted, bonus=bonus)


def accept_sampling(tree: DraftTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> Acceptance:
    """Lossless recursive rejection sampling; the children of a node are draws from q without replacement, in order."""
    batch, n = tree.tokens.shape
    if n == 1:  # nothing drafted (plain decoding): the bonus is a plain sample from the target
        return _acceptance(tree, torch.zeros(batch, dtype=torch.long, device=tree.tokens.device),
                           sample(target_probs[:, 0].float(), generator))
    if tree.draft_probs is None:
        raise ValueError("accept_sampling needs tree.draft_probs, the distributions the children were drawn from")
    rows = torch.arange(batch, device=tree.tokens.device)
    valid = _valid(tree)
    node = torch.zeros(batch, dtype=torch.long, device=tree.tokens.device)  # [B] current node u
    p = target_probs[:, 0].float()  # [B, V] target at u, a residual once a child was rejected
    q = tree.draft_probs[:, 0].float()  # [B, V] draft at u without the tokens of rejected children
    # parents come before children, so visiting nodes in index order tries the children of u in order
    for child in range(1, n):
        token = tree.tokens[:, child]
        p_x, q_x = p[rows, token], q[rows, token]
        # only the next child of u is tried; an invalid node, or a draw q could not have made, is skipped
        # (and its token stays in q: it is padding, or has q(x) == 0 anyway)
        tried = (tree.parents[:, child] == node) & valid[:, child] & (q_x > 0)
        if not tried.any():
            continue
        # accept with probability min(1, p(x) / q(x)): always when p(x) >= q(x), never when p(x) == 0
        uniform = torch.rand(batch, generator=generator, device=tree.tokens.device)
        accepted = tried & (uniform * q_x < p_x)
        rejected = tried & ~accepted
        # rejected: the target becomes the residual, and the next sibling was drawn from q without x
        p = torch.where(rejected[:, None], _residual(p, q), p)
        q = torch.where(rejected[:, None], _without(q, token), q)
        # accepted: move to the child, whose own children were drawn from its draft distribution
        node = torch.where(accepted, child, node)
        p = torch.where(accepted[:, None], target_probs[:, child].float(), p)
        q = torch.where(accepted[:, None], tree.draft_probs[:, child].float(), q)
    # no child of u left: the bonus comes from the current (possibly residual) target
    return _acceptance(tree, node, sample(p, generator))


def accept_typical(tree: DraftTree, target_probs: torch.Tensor, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator: torch.Generator | None = None) -> Acceptance:
    """LOSSY (Medusa's typical acceptance): output does NOT follow the target distribution.

    A child with token x is accepted iff p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))),
    p being the target at its parent; the deepest accepted path wins (ties: the likelier path under
    the target), and the bonus is sampled from the target at its last node.
    """
    for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
        if not 0 <= value < float("inf"):
            raise GenerationSettingsError(f"{name}={value!r} is invalid: it must be a finite number >= 0")
    batch, n, vocab = target_probs.shape
    p = target_probs.float()
    entropy = torch.special.entr(p).sum(dim=-1)  # [B, n]
    threshold = (posterior_alpha * torch.exp(-entropy)).clamp(max=posterior_threshold)  # [B, n]
    parent = tree.parents.clamp(min=0)
    prob = p.reshape(batch, n * vocab).gather(1, parent * vocab + tree.tokens)  # [B, n] p_parent(token)
    correct = (prob > threshold.gather(1, parent)) & _valid(tree)
    on_path = _on_accepted_path(tree, correct)
    log_prob = torch.where(on_path & (tree.parents >= 0), prob.clamp(min=1e-30).log(), 0.0)  # [B, n]
    path_log_prob = (tree.ancestor_mask().float() @ log_prob[..., None]).squeeze(-1)  # [B, n]
    last = _deepest(tree, on_path, path_log_prob)
    rows = torch.arange(batch, device=tree.tokens.device)
    return _acceptance(tree, last, sample(p[rows, last], generator))


def _valid(tree: DraftTree) -> torch.Tensor:
    return torch.ones_like(tree.tokens, dtype=torch.bool) if tree.valid is None else tree.valid


def _on_accepted_path(tree: DraftTree, correct: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: every drafted node from the root down to this one is correct (the root always is)."""
    correct = correct | (tree.parents < 0)
    on_path = correct
    # each pass checks one more level of ancestors
    for _ in range(tree.max_depth):
        on_path = correct & on_path.gather(1, tree.parents.clamp(min=0))
    return on_path


def _deepest(tree: DraftTree, on_path: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """[B] the deepest node on an accepted path; among equally deep ones the best score, then the lowest index."""
    depth = torch.where(on_path, tree.depths, -1)  # [B, n]
    deepest = depth == depth.max(dim=1, keepdim=True).values
    return torch.where(deepest, score, float("-inf")).argmax(dim=1)


def _acceptance(tree: DraftTree, last: torch.Tensor, bonus: torch.Tensor) -> Acceptance:
    """Walk up from `last` ([B]) to the root and package the path."""
    batch = last.shape[0]
    width = tree.max_depth + 1
    rows = torch.arange(batch, device=last.device)
    num_accepted = tree.depths[rows, last]
    path = torch.full((batch, width + 1), -1, dtype=torch.long, device=last.device)  # column `width` is scratch
    node, depth = last, num_accepted
    for _ in range(width):
        walking = node >= 0
        path.scatter_(1, torch.where(walking, depth, width)[:, None], node[:, None])
        node = torch.where(walking, tree.parents[rows, node.clamp(min=0)], -1)
        depth = depth - 1
    return Acceptance(path=path[:, :width], num_accepted=num_accepted, bonus=bonus)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(p - q, 0)) per row; p itself where that is all zeros (then p == q)."""
    residual = (p - q).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass, p)


def _without(q: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """q with `token` ([B]) zeroed and renormalised: the law of the next draw without replacement."""
    q = q.scatter(-1, token[:, None], 0.0)
    mass = q.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, q / mass, q)
