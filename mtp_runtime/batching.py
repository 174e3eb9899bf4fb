"""Continuous batching: build one running batch from the live rows of others, between decoding steps.

A server keeps one batch decoding and, between two steps, lets new requests join (their prompts prefilled as a
batch of their own by `Engine.prefill`, then merged in) and lets finished or cancelled ones leave. `combine`
is that merge: it keeps the listed sequences of each part, in order, renumbers them 0..B-1, and returns a batch
that `Engine.step` continues as if it had been prefilled that way. What a batch holds, and how parts agree:

- the trunk LatentCache and the MTP modules' caches: each part's rows, their capacities padded to the largest
  (slots at or past a row's length are never read, so the padding is never seen);
- the MTP deferred slots (draft='auto' defers the append of a plain step until the next step that drafts):
  every row of a batch defers the same number, so when the parts differ, each part that has deferred slots
  appends them now, without drafting (what its next drafting pass would have done first);
- the next draft tree: kept when every part has one of the same size; chains of different depths (auto
  chooses the depth per batch) are cut to the shallowest, and when some part has none the next step drafts
  nothing. Dropping drafted nodes changes what is proposed, never what is emitted: the MTP caches hold
  committed slots only, and the step after drafts afresh from them.

Parts must come from engines with the same sampling and draft settings (one tree shape per step).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch

from .cache import LatentCache
from .drafter import Drafter, MTPState
from .verify.tree import DraftTree

if TYPE_CHECKING:
    from .engine import _Batch


def combine(drafter: Drafter | None, parts: list[tuple["_Batch", list[int]]]) -> "_Batch":
    """One batch holding, per part, the listed live sequence ids (in that order), renumbered 0..B-1.

    drafter: the engine's drafter (None for plain decoding), which appends deferred MTP slots where needed.
    Parts are left as they were; at least one part must be given (its rows may be empty).
    """
    selected = [_select(batch, seqs) for batch, seqs in parts if seqs] or [_select(parts[0][0], [])]
    if selected[0].mtp is not None:
        _agree_on_deferred(drafter, [b.mtp for b in selected])
    device = selected[0].pending.device
    generated = [tokens for b in selected for tokens in b.generated]
    return dataclasses.replace(
        selected[0],
        seq_ids=torch.arange(len(generated), device=device),
        trunk=concat_caches([b.trunk for b in selected]),
        mtp=None if selected[0].mtp is None else _concat_states([b.mtp for b in selected]),
        pending=torch.cat([b.pending for b in selected]),
        generated=generated,
        stats=[s for b in selected for s in b.stats],
        next_tree=merge_trees([b.next_tree for b in selected]),
    )


def _select(batch: "_Batch", seqs: list[int]) -> "_Batch":
    """A copy of `batch` holding only sequences `seqs` (ids of live rows), in that order, numbered 0..n-1."""
    live = batch.seq_ids.tolist()
    missing = [s for s in seqs if s not in live]
    if missing:
        raise ValueError(f"sequences {missing} are not live rows of this batch (live: {live})")
    rows = torch.tensor([live.index(s) for s in seqs], dtype=torch.long, device=batch.pending.device)
    trunk = copy.copy(batch.trunk)
    trunk.keep_rows(rows)  # keep_rows replaces the copy's tensors; the original's stay
    mtp = None
    if batch.mtp is not None:
        mtp = dataclasses.replace(batch.mtp, cache=copy.copy(batch.mtp.cache))
        mtp.keep_rows(rows)
    return dataclasses.replace(
        batch, seq_ids=torch.arange(len(seqs), device=rows.device), trunk=trunk, mtp=mtp, pending=batch.pending[rows],
        generated=[batch.generated[s] for s in seqs], stats=[batch.stats[s] for s in seqs],
        next_tree=None if batch.next_tree is None else batch.next_tree.select_rows(rows))


def concat_caches(caches: list[LatentCache]) -> LatentCache:
    """The rows of every cache, in order, in one cache as large as the largest (zeros past each one's slots)."""
    first = caches[0]
    width = first.latent.shape[-1]
    out = LatentCache(first.num_layers, sum(c.batch_size for c in caches), max(c.capacity for c in caches),
                      first.kv_lora_rank, width - first.kv_lora_rank, first.latent.dtype, first.latent.device)
    row = 0
    for cache in caches:
        out.latent[:, row: row + cache.batch_size, : cache.capacity] = cache.latent
        row += cache.batch_size
    out.lengths = torch.cat([c.lengths for c in caches])
    return out


def _concat_states(states: list[MTPState]) -> MTPState:
    """The MTP states' rows in one state (their deferred slots already agree)."""
    deferred = states[0].deferred_tokens is not None
    return MTPState(
        cache=concat_caches([s.cache for s in states]),
        stash=torch.cat([s.stash for s in states], dim=1),  # [D, B, H]
        deferred_hidden=torch.cat([s.deferred_hidden for s in states]) if deferred else None,
        deferred_tokens=torch.cat([s.deferred_tokens for s in states]) if deferred else None)


def _deferred_count(state: MTPState) -> int:
    return 0 if state.deferred_tokens is None else state.deferred_tokens.shape[1]


def _agree_on_deferred(drafter: Drafter, states: list[MTPState]) -> None:
    """Make every state defer the same number of slots: when they differ, append each one's deferred slots."""
    if len({_deferred_count(s) for s in states}) == 1:
        return
    for state in states:
        if _deferred_count(state):
            append_deferred(drafter, state)


def append_deferred(drafter: Drafter, state: MTPState) -> None:
    """Append a state's deferred slots to every module's cache now, drafting nothing (the drafter's `skip` with
    no new slot of its own: it takes the deferred ones and runs each module's append pass over them)."""
    hidden, tokens = state.deferred_hidden[:, :0], state.deferred_tokens[:, :0]  # [B, 0, H], [B, 0]
    drafter.skip(state, hidden, tokens, torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device))


def merge_trees(trees: list[DraftTree | None]) -> DraftTree | None:
    """The parts' next trees as one; chains of different depths cut to the shallowest; None if any part has none
    (or if trees of different sizes are not all chains, which no single draft setting produces)."""
    if any(tree is None for tree in trees):
        return None
    sizes = {tree.tokens.shape[1] for tree in trees}
    if len(sizes) > 1:
        if not all(_is_chain(tree) for tree in trees):
            return None
        trees = [_first_nodes(tree, min(sizes)) for tree in trees]
    probs = None if trees[0].draft_probs is None else torch.cat([t.draft_probs for t in trees])
    valid = None if trees[0].valid is None else torch.cat([t.valid for t in trees])
    return DraftTree(tokens=torch.cat([t.tokens for t in trees]), parents=torch.cat([t.parents for t in trees]),
                     depths=torch.cat([t.depths for t in trees]), draft_probs=probs, valid=valid)


def _is_chain(tree: DraftTree) -> bool:
    """Every node's parent is the node before it."""
    n = tree.tokens.shape[1]
    return bool((tree.parents == torch.arange(-1, n - 1, device=tree.parents.device)).all())


def _first_nodes(tree: DraftTree, n: int) -> DraftTree:
    """A chain's first n nodes (the root and its n - 1 shallowest drafts)."""
    return DraftTree(tokens=tree.tokens[:, :n], parents=tree.parents[:, :n], depths=tree.depths[:, :n],
                     draft_probs=None if tree.draft_probs is None else tree.draft_probs[:, :n],
                     valid=None if tree.valid is None else tree.valid[:, :n])
