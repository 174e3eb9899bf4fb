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

Appending the slots a step accepted is fused with the next draft: module k's one forward carries its new
committed slots first and its draft nodes after them, so each module runs once per step (plus its reuse beyond
depth D), and the MTP caches are committed when the next tree is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan
from .numerics import ensure_finite
from .params import DraftParams
from .sampling import SamplingParams
from .tree_growth import TreeGrowth
from .verify.tree import DraftTree

EXPANDED_MIN_TOKENS = 32  # forwards over at least this many new tokens use expanded (decompressed) attention


def attention_impl(num_new_tokens: int) -> str:
    """Expanded attention pays off for long prefills; decode and verify use the absorbed path."""
    return "expanded" if num_new_tokens >= EXPANDED_MIN_TOKENS else "absorbed"


def causal_visibility(batch: int, n: int, positions: torch.Tensor, start: int) -> torch.Tensor:
    """[B, n, n]: causal, hiding keys whose position is below `start`; every query always sees itself."""
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=positions.device)
    return (causal & (positions >= start)[:, None, :]) | eye


@dataclass
class MTPState:
    """The MTP modules' state between steps."""

    cache: LatentCache
    """D layers; lengths = L + 1 (slot 0 is never valid)."""
    stash: torch.Tensor
    """[D, B, H] each module's normalised output at slot L."""

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.keep_rows(rows)
        self.stash = self.stash[:, rows]


@dataclass
class _Append:
    """Slots being appended to every module's cache: m new slots per row, counts[b] of them kept."""

    trunk_hidden: torch.Tensor  # [B, m, H] the trunk's hidden at the slot before each new slot
    tokens: torch.Tensor  # [B, m] the token of each new slot
    counts: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, m]
    earlier: torch.Tensor  # [D, B, H] the stash before the append
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # module -> [B, m, H]

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def hidden_in(self, k: int) -> torch.Tensor:
        """Module k's hidden input at the new slots: module k-1's output one slot earlier."""
        if k == 0:
            return self.trunk_hidden
        return torch.cat([self.earlier[k - 1][:, None], self.outputs[k - 1][:, :-1]], dim=1)

    def stash(self, k: int) -> torch.Tensor:
        """Module k's output at its new last committed slot [B, H]."""
        rows = torch.arange(self.counts.shape[0], device=self.counts.device)
        return self.outputs[k][rows, self.counts - 1]


@dataclass
class _ModuleScratch:
    """Uncommitted entries one MTP module computed during the current draft (after `prefix` appended slots)."""

    nodes: torch.Tensor  # [B, c] pool node indices, in scratch-slot order
    outputs: torch.Tensor  # [B, c, H]
    prefix: int = 0

    def output_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """Outputs [B, u, H] for nodes [B, u] (each must have an entry)."""
        match = self.nodes[:, None, :] == nodes[:, :, None]  # [B, u, c]
        index = match.float().argmax(dim=-1)
        return self.outputs.gather(1, index[..., None].expand(-1, -1, self.outputs.shape[-1]))


class Drafter:
    """Runs the MTP modules: `start` fills their caches from the prompt, `advance` appends each step's
    accepted slots; both draft the next tree in the same forwards."""

    def __init__(self, model: DeepseekForCausalLM, draft: DraftParams, sampling: SamplingParams,
                 generator: torch.Generator | None):
        self.model = model
        self.draft_params = draft
        self.sampling = sampling
        self.generator = generator

    @property
    def num_modules(self) -> int:
        """Modules in use: module j drafts depth j, so a draft shallower than D never needs the deeper ones."""
        return min(self.model.num_mtp, self.draft_params.max_depth)

    def start(self, trunk_hidden: torch.Tensor, next_tokens: torch.Tensor, prompt_lens: torch.Tensor,
              capacity: int, roots: torch.Tensor, trunk_lengths: torch.Tensor) -> tuple[MTPState, DraftTree]:
        """Fill every module's cache for slots [j, P] (next_tokens [B, P] holds t_1..t_P per row, padded) and
        draft the first tree from roots [B]."""
        b, p, h = trunk_hidden.shape
        cfg = self.model.config
        cache = LatentCache(self.num_modules, b, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                            trunk_hidden.dtype, trunk_hidden.device)
        cache.lengths.fill_(1)
        no_earlier_output = trunk_hidden.new_zeros(self.num_modules, b, h)  # slot 0 is never valid
        state = MTPState(cache, no_earlier_output)
        return state, self.advance(state, trunk_hidden, next_tokens, prompt_lens, roots, trunk_lengths)

    def advance(self, state: MTPState, trunk_hidden: torch.Tensor, new_tokens: torch.Tensor, counts: torch.Tensor,
                roots: torch.Tensor, trunk_lengths: torch.Tensor) -> DraftTree:
        """Append slots L+1 .. L+counts to every module's cache and draft the next tree, fused.

        trunk_hidden [B, m, H] is the trunk's hidden state at the root and accepted nodes, new_tokens [B, m] the
        accepted drafts then the bonus token (rows padded past counts[b]); roots [B] are the new pending tokens.
        """
        m = new_tokens.shape[1]
        positions = state.cache.lengths[:, None] + torch.arange(m, device=new_tokens.device)
        append = _Append(trunk_hidden, new_tokens, counts, positions, state.stash)
        tree = self._grow(state, roots, trunk_lengths, append)
        for k in range(self.num_modules):
            self._ensure_appended(state, append, {}, k, trunk_lengths)
        state.cache.commit(torch.arange(m, device=new_tokens.device).expand_as(new_tokens), counts)
        state.stash = torch.stack([append.stash(k) for k in range(self.num_modules)])
        return tree

    def _grow(self, state: MTPState, roots: torch.Tensor, trunk_lengths: torch.Tensor, append: _Append) -> DraftTree:
        """Grow one draft tree from the pending tokens roots [B], depth by depth."""
        growth = TreeGrowth(roots, self.draft_params, self.sampling, self.generator, self.model.config.vocab_size)
        scratch: dict[int, _ModuleScratch] = {}
        self._ensure_appended(state, append, scratch, 0, trunk_lengths)
        frontier = torch.zeros(roots.shape[0], 1, dtype=torch.long, device=roots.device)
        frontier_logits = self.model.mtp_logits(0, append.stash(0))[:, None]  # [B, 1, V]
        for depth in range(1, self.draft_params.max_depth + 1):
            self._ensure_finite(frontier_logits, depth)
            growth.expand(depth - 1, frontier, frontier_logits)
            if depth == self.draft_params.max_depth:
                break
            frontier = growth.frontier(depth)
            if frontier.shape[1] == 0:
                break
            frontier_logits = self._frontier_logits(state, growth, scratch, append, depth + 1, trunk_lengths)
        return growth.finish()

    def _ensure_finite(self, logits: torch.Tensor, depth: int) -> None:
        n, k = self.model.config.num_hidden_layers, min(depth, self.num_modules) - 1
        ensure_finite(logits, f"MTP module {k + 1} (checkpoint layer model.layers.{n + k})")

    def _ensure_appended(self, state, append, scratch, k, trunk_lengths) -> None:
        """Run module k over its new slots alone if no draft forward has carried them yet."""
        if k not in append.outputs:
            empty = torch.zeros(append.tokens.shape[0], 0, dtype=torch.long, device=append.tokens.device)
            self._run_module(state, None, scratch, append, k, empty, None, trunk_lengths)

    def _frontier_logits(self, state, growth, scratch, append, depth, trunk_lengths) -> torch.Tensor:
        """Logits [B, w, V] at the expanded nodes of depth-1, from module min(depth, D)."""
        k = min(depth, self.num_modules) - 1
        if depth <= self.num_modules:
            nodes = torch.cat([growth.frontier(d) for d in range(1, depth)], dim=1)
            source = k - 1
        else:
            nodes = growth.frontier(depth - 1)
            source = k
        prev = self._hidden_of_parents(growth, scratch, append, nodes, source)
        out = self._run_module(state, growth, scratch, append, k, nodes, prev, trunk_lengths)
        frontier_out = out[:, -growth.frontier(depth - 1).shape[1]:]
        return self.model.mtp_logits(k, frontier_out)

    def _hidden_of_parents(self, growth, scratch, append, nodes, source) -> torch.Tensor:
        """E(parent(u), source) for nodes [B, u]: the stash for root parents, else the scratch outputs."""
        parents = growth.parents.gather(1, nodes)
        from_stash = append.stash(source)[:, None].expand(-1, nodes.shape[1], -1)
        if source not in scratch or scratch[source].nodes.shape[1] == 0:
            return from_stash
        safe_parents = torch.where(parents == 0, scratch[source].nodes[:, :1], parents)
        from_scratch = scratch[source].output_of(safe_parents)
        return torch.where((parents == 0)[..., None], from_stash, from_scratch)

    def _run_module(self, state, growth, scratch, append, k, nodes, prev, trunk_lengths) -> torch.Tensor:
        """Module k (0-based) on draft nodes [B, u] after its earlier scratch entries; its first forward of a
        step also carries the appended slots, ahead of the nodes. Returns the nodes' outputs [B, u, H]."""
        carry = k not in append.outputs
        m = append.size if carry else 0
        old = scratch.get(k, _ModuleScratch(nodes[:, :0], append.trunk_hidden[:, :0], append.size))
        entries = torch.cat([old.nodes, nodes], dim=1)  # [B, c] draft entries
        visible = self._visibility(growth, append, old, nodes, entries, k, carry, trunk_lengths)
        positions, tokens, hidden = [], [], []
        if carry:
            positions.append(append.positions), tokens.append(append.tokens), hidden.append(append.hidden_in(k))
        if nodes.shape[1]:
            positions.append(trunk_lengths[:, None] + growth.depths[nodes])
            tokens.append(growth.tokens.gather(1, nodes))
            hidden.append(prev)
        plan = AttentionPlan.over_cache(state.cache, torch.cat(positions, 1), visible, start=k + 1,
                                        impl=attention_impl(visible.shape[1]))
        out = self.model.forward_mtp(k, torch.cat(hidden, 1), torch.cat(tokens, 1), plan)
        if carry:
            append.outputs[k] = out[:, :m]
        scratch[k] = _ModuleScratch(entries, torch.cat([old.outputs, out[:, m:]], dim=1), old.prefix)
        return out[:, m:]

    @staticmethod
    def _visibility(growth, append, old, nodes, entries, k, carry, trunk_lengths) -> torch.Tensor:
        """[B, q, prefix + c]: appended slots see each other causally; draft nodes see the kept appended
        slots and their own ancestors; every query sees itself; no key below position k+1 is visible."""
        b, m, u, c = nodes.shape[0], old.prefix, nodes.shape[1], entries.shape[1]
        device = nodes.device
        slot_ok = append.positions >= k + 1  # [B, m]
        kept = (torch.arange(m, device=device) < append.counts[:, None]) & slot_ok  # [B, m]
        rows = []
        if carry:
            causal = causal_visibility(b, m, append.positions, start=k + 1)
            rows.append(torch.cat([causal, causal.new_zeros(b, m, c)], dim=2))
        if u:
            entry_ok = (trunk_lengths[:, None] + growth.depths[entries]) >= k + 1
            draft = growth.ancestors(nodes, entries) & entry_ok[:, None, :]
            draft[:, torch.arange(u), torch.arange(c - u, c)] = True
            rows.append(torch.cat([kept[:, None, :].expand(b, u, m), draft], dim=2))
        return torch.cat(rows, dim=1)
