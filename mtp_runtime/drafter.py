"""MTP drafting: the MTP modules' latent caches (prefill, commit) and growing a draft tree depth by depth.

Cache layout (module j is 1-based, D modules): module j's entry at slot s (= its RoPE position) has input token
t_s and hidden input = module j-1's normalised output at slot s-1 (module 0 is the trunk, whose hidden at
position s-1 predicts t_s). It predicts t_{s+1}. With L committed trunk tokens and the pending token t_L, module
j holds the slots [j, L] (the slots whose inputs are all known tokens), and `stash[j]` is its output at slot L.

Drafting: the children of the root (depth 1) come from stash[1]. A node u at depth d-1 gets its children from
module j = d: entry E(u, j) at slot L + depth(u), fed with E(parent(u), j - 1). Before that, module j also
computes E(v, j) for u's drafted ancestors v, so that its attention sees the slots between L and u exactly as
in training (transformers' MtpModel fills them the same way for a chain). Deeper than D, module D is reused
on its own outputs (EAGLE style). Draft entries go to scratch slots after the cache length and are never kept.

Appending the slots a step accepted is fused with the next draft: module k's one forward (a "pass") carries its
new committed slots first and its draft nodes after them, so each module runs once per step (plus its reuse
beyond depth D), and the MTP caches are committed when the next tree is complete. Every step appends the same
number of slots (the draft depth + 1, the rows keeping `counts` of them), so each pass has one shape per draft
shape. A step that drafts nothing (auto choosing plain decoding) runs no module: its slot is deferred and
appended by the next pass that drafts (`skip`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .cache_layout import CacheLayout
from .forwards import Forwards
from .model.plan import AttentionPlan, attention_impl
from .numerics import ensure_finite
from .params import DraftParams
from .sampling import SamplingParams
from .tree_growth import TreeGrowth
from .verify.tree import DraftTree


@dataclass
class MTPState:
    """The MTP modules' state between steps."""

    cache: LatentCache
    """D layers; lengths = L + 1 - deferred slots (slot 0 is never valid)."""
    stash: torch.Tensor
    """[D, B, H] each module's normalised output at its last slot."""
    deferred_hidden: torch.Tensor | None = None
    """[B, b, H] the trunk's hidden before each committed slot that no module has appended yet."""
    deferred_tokens: torch.Tensor | None = None
    """[B, b] the tokens of those slots."""

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.keep_rows(rows)
        self.stash = self.stash[:, rows]
        if self.deferred_tokens is not None:
            self.deferred_hidden, self.deferred_tokens = self.deferred_hidden[rows], self.deferred_tokens[rows]

    def defer(self, trunk_hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """Remember one committed slot per row ([B, 1, H], [B, 1]) for the next pass to append."""
        if self.deferred_tokens is None:
            self.deferred_hidden, self.deferred_tokens = trunk_hidden, tokens
        else:
            self.deferred_hidden = torch.cat([self.deferred_hidden, trunk_hidden], dim=1)
            self.deferred_tokens = torch.cat([self.deferred_tokens, tokens], dim=1)

    def take_deferred(self, trunk_hidden: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor):
        """(hidden, tokens, counts) of the deferred slots followed by these new ones; nothing stays deferred."""
        if self.deferred_tokens is None:
            return trunk_hidden, tokens, counts
        deferred = self.deferred_tokens.shape[1]
        hidden = torch.cat([self.deferred_hidden, trunk_hidden], dim=1)
        tokens = torch.cat([self.deferred_tokens, tokens], dim=1)
        self.deferred_hidden = self.deferred_tokens = None
        return hidden, tokens, counts + deferred


@dataclass
class _Append:
    """Slots being appended to every module's cache: m new slots per row, counts[b] of them kept."""

    trunk_hidden: torch.Tensor  # [B, m, H] the trunk's hidden at the slot before each new slot
    tokens: torch.Tensor  # [B, m] the token of each new slot
    counts: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, m]
    earlier: torch.Tensor  # [D, B, H] the stash before the append
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # module -> [B, m, H]
    stashes: dict[int, torch.Tensor] = field(default_factory=dict)  # module -> [B, H] output at the new last slot

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def hidden_in(self, k: int) -> torch.Tensor:
        """Module k's hidden input at the new slots: module k-1's output one slot earlier."""
        if k == 0:
            return self.trunk_hidden
        return torch.cat([self.earlier[k - 1][:, None], self.outputs[k - 1][:, :-1]], dim=1)

    def finish(self, k: int, outputs: torch.Tensor) -> None:
        self.outputs[k] = outputs
        rows = torch.arange(self.counts.shape[0], device=self.counts.device)
        self.stashes[k] = outputs[rows, self.counts - 1]


@dataclass
class _Scratch:
    """Uncommitted draft entries one MTP module computed during the current step, in scratch-slot order."""

    nodes: torch.Tensor  # [B, c] pool node of each entry
    outputs: torch.Tensor  # [B, c, H]


@dataclass
class _Step:
    """One draft step: the append, the tree growing, and each module's scratch entries."""

    state: MTPState
    append: _Append
    growth: TreeGrowth | None
    trunk_lengths: torch.Tensor | None  # [B] L, the trunk length the tree hangs from
    params: DraftParams
    fixed_shape: bool = True  # False when the append is the prompt or has deferred slots: its size is the data's
    scratch: dict[int, _Scratch] = field(default_factory=dict)

    def hidden_of_parents(self, nodes: torch.Tensor, source: int) -> torch.Tensor:
        """E(parent(u), source) for nodes [B, u]: module `source`'s stash for children of the root, else its
        scratch output of the parent (every parent was computed by that module earlier in this step)."""
        parents = self.growth.parents.gather(1, nodes)
        stash = self.append.stashes[source][:, None]  # [B, 1, H]
        entries = self.scratch.get(source)
        if entries is None:
            return stash.expand(-1, nodes.shape[1], -1)
        candidates = torch.cat([stash, entries.outputs], dim=1)  # [B, 1 + c, H]: the root's, then each entry's
        match = entries.nodes[:, None, :] == parents[:, :, None]  # [B, u, c]
        index = torch.where(parents > 0, match.int().argmax(dim=-1) + 1, 0)
        return candidates.gather(1, index[..., None].expand(-1, -1, candidates.shape[-1]))


class Drafter:
    """Runs the MTP modules: `start` fills their caches from the prompt, `advance` appends each step's
    accepted slots; both draft the next tree in the same forwards."""

    def __init__(self, forwards: Forwards, draft: DraftParams, sampling: SamplingParams,
                 generator: torch.Generator | None, cache_layout: CacheLayout | None = None):
        self.forwards = forwards
        self.model = forwards.model
        self.cache_layout = cache_layout if cache_layout is not None else CacheLayout.for_config(self.model.config)
        self.draft_params = draft
        self.sampling = sampling
        self.generator = generator

    @property
    def num_modules(self) -> int:
        """Modules in use: module j drafts depth j, so a draft shallower than D never needs the deeper ones."""
        return min(self.model.num_mtp, self.draft_params.max_depth)

    def start(self, trunk_hidden: torch.Tensor, next_tokens: torch.Tensor, prompt_lens: torch.Tensor,
              capacity: int, roots: torch.Tensor, trunk_lengths: torch.Tensor,
              params: DraftParams | None = None) -> tuple[MTPState, DraftTree | None]:
        """Fill every module's cache for slots [j, P] (next_tokens [B, P] holds t_1..t_P per row, padded) and
        draft the first tree from roots [B] (of `params`, the drafter's own by default; None: no tree)."""
        b, _, h = trunk_hidden.shape
        cache = self.cache_layout.allocate(self.num_modules, b, capacity, trunk_hidden.dtype, trunk_hidden.device,
                                           initial_length=1)
        no_earlier_output = trunk_hidden.new_zeros(self.num_modules, b, h)  # slot 0 is never valid
        state = MTPState(cache, no_earlier_output)
        if params is None and self.draft_params.mode == "auto":
            self.skip(state, trunk_hidden, next_tokens, prompt_lens)
            return state, None
        return state, self.advance(state, trunk_hidden, next_tokens, prompt_lens, roots, trunk_lengths, params,
                                   fixed_shape=False)

    def advance(self, state: MTPState, trunk_hidden: torch.Tensor, new_tokens: torch.Tensor, counts: torch.Tensor,
                roots: torch.Tensor, trunk_lengths: torch.Tensor, params: DraftParams | None = None,
                fixed_shape: bool = True) -> DraftTree:
        """Append slots L+1 .. L+counts to every module's cache and draft the next tree (of `params`, by default
        the drafter's own), fused.

        trunk_hidden [B, m, H] is the trunk's hidden state at the root and accepted nodes, new_tokens [B, m] the
        accepted drafts then the bonus token (rows padded past counts[b]); roots [B] are the new pending tokens.
        """
        fixed_shape = fixed_shape and state.deferred_tokens is None
        trunk_hidden, new_tokens, counts = state.take_deferred(trunk_hidden, new_tokens, counts)
        m = new_tokens.shape[1]
        positions = state.cache.lengths[:, None] + torch.arange(m, device=new_tokens.device)
        params = params or self.draft_params
        step = _Step(state, _Append(trunk_hidden, new_tokens, counts, positions, state.stash),
                     TreeGrowth(roots, params, self.sampling, self.generator, self.model.config.vocab_size),
                     trunk_lengths, params, fixed_shape)
        tree = self._grow(step)
        for k in range(self.num_modules):
            if k not in step.append.outputs:  # a module no draft depth needed still keeps its cache
                self._pass(step, k, step.growth.frontier(0)[:, :0])
        self._commit(step)
        return tree

    def skip(self, state: MTPState, trunk_hidden: torch.Tensor, new_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """The next step drafts nothing: defer a lone committed slot; append a longer run now, without drafting."""
        if new_tokens.shape[1] == 1:
            state.defer(trunk_hidden, new_tokens)
            return
        trunk_hidden, new_tokens, counts = state.take_deferred(trunk_hidden, new_tokens, counts)
        positions = state.cache.lengths[:, None] + torch.arange(new_tokens.shape[1], device=new_tokens.device)
        step = _Step(state, _Append(trunk_hidden, new_tokens, counts, positions, state.stash), None, None,
                     self.draft_params, fixed_shape=False)
        for k in range(self.num_modules):
            self._pass(step, k, new_tokens[:, :0])
        self._commit(step)

    def _commit(self, step: _Step) -> None:
        """Every module keeps its appended slots (the first counts[b] scratch slots) and its new stash."""
        step.state.cache.commit(None, step.append.counts)
        step.state.stash = torch.stack([step.append.stashes[k] for k in range(self.num_modules)])

    def _grow(self, step: _Step) -> DraftTree:
        """Grow one draft tree from the pending tokens, depth by depth."""
        growth = step.growth
        self._pass(step, 0, growth.frontier(0)[:, :0])  # module 1 appends; its new stash drafts depth 1
        logits = self.model.mtp_logits(0, step.append.stashes[0])[:, None]  # [B, 1, V]
        max_depth = step.params.max_depth
        for depth in range(1, max_depth + 1):
            self._ensure_finite(logits, depth)
            growth.expand(depth - 1, growth.frontier(depth - 1), logits)
            if depth == max_depth:
                break
            logits = self._frontier_logits(step, depth + 1)
        return growth.finish()

    def _ensure_finite(self, logits: torch.Tensor, depth: int) -> None:
        n, k = self.model.config.num_hidden_layers, min(depth, self.num_modules) - 1
        ensure_finite(logits, f"MTP module {k + 1} (checkpoint layer model.layers.{n + k})")

    def _frontier_logits(self, step: _Step, depth: int) -> torch.Tensor:
        """Logits [B, w, V] at the frontier nodes of depth-1 (their children's distribution), from module
        min(depth, D): module j's first pass carries every frontier node of depths 1..j-1, later reuse passes of
        module D the new frontier only."""
        growth = step.growth
        k = min(depth, self.num_modules) - 1
        if depth <= self.num_modules:  # module k's first pass, fed by module k - 1
            nodes, source = torch.cat([growth.frontier(d) for d in range(1, depth)], dim=1), k - 1
        else:  # module D reused on its own outputs
            nodes, source = growth.frontier(depth - 1), k
        out = self._pass(step, k, nodes, source)
        return self.model.mtp_logits(k, out[:, -growth.frontier(depth - 1).shape[1]:])

    def _pass(self, step: _Step, k: int, nodes: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Module k (0-based) on draft nodes [B, u] (fed by module `source`'s outputs at their parents) after its
        earlier scratch entries; its first pass of a step also carries the appended slots, ahead of the nodes.
        Returns the nodes' outputs [B, u, H]."""
        append, growth = step.append, step.growth
        carry = k not in append.outputs
        old = step.scratch.get(k)
        positions, tokens, hidden = [], [], []
        if carry:
            positions.append(append.positions), tokens.append(append.tokens), hidden.append(append.hidden_in(k))
        if nodes.shape[1]:
            positions.append(step.trunk_lengths[:, None] + growth.depths[nodes])
            tokens.append(growth.tokens.gather(1, nodes))
            hidden.append(step.hidden_of_parents(nodes, source))
        visible = self._visibility(step, k, nodes, carry)
        plan = AttentionPlan.over_cache(step.state.cache, torch.cat(positions, 1), visible, start=k + 1,
                                        impl=attention_impl(visible.shape[1]))
        out = self.forwards.mtp(k, torch.cat(hidden, 1), torch.cat(tokens, 1), plan, step=step.fixed_shape)
        m = append.size if carry else 0
        if carry:
            append.finish(k, out[:, :m])
        if nodes.shape[1]:
            new = _Scratch(nodes, out[:, m:])
            step.scratch[k] = new if old is None else _Scratch(torch.cat([old.nodes, nodes], 1),
                                                               torch.cat([old.outputs, new.outputs], 1))
        return out[:, m:]

    @staticmethod
    def _visibility(step: _Step, k: int, nodes: torch.Tensor, carry: bool) -> torch.Tensor:
        """[B, q, m + c]: appended slots see each other causally; draft nodes see the kept appended slots, their
        own ancestors among this module's entries, and themselves; no key below position k+1 is visible."""
        append, growth = step.append, step.growth
        old = step.scratch.get(k)
        entries = nodes if old is None else torch.cat([old.nodes, nodes], dim=1)  # [B, c] this module's entries
        b, m, u, c = nodes.shape[0], append.size, nodes.shape[1], entries.shape[1]
        device = nodes.device
        slot_ok = append.positions >= k + 1  # [B, m]
        rows = []
        if carry:
            causal = torch.ones(m, m, dtype=torch.bool, device=device).tril() & slot_ok[:, None, :]
            causal = causal | torch.eye(m, dtype=torch.bool, device=device)
            rows.append(torch.cat([causal, causal.new_zeros(b, m, c)], dim=2))
        if u:
            kept = (torch.arange(m, device=device) < append.counts[:, None]) & slot_ok  # [B, m]
            entry_ok = (step.trunk_lengths[:, None] + growth.depths[entries]) >= k + 1  # [B, c]
            draft = growth.ancestors(nodes, entries) & entry_ok[:, None, :]
            draft[:, torch.arange(u), torch.arange(c - u, c)] = True
            rows.append(torch.cat([kept[:, None, :].expand(b, u, m), draft], dim=2))
        return torch.cat(rows, dim=1)
