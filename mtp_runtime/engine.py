"""The speculative loop: prefill, then draft -> verify -> accept -> commit until every sequence stops.

Plain decoding is the same loop with an empty draft (the tree is the root alone), so the baseline measures
only what drafting changes. The model never advances a cache; `_commit` is the only place lengths grow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .cache import LatentCache
from .cache_layout import CacheLayout
from .drafter import Drafter, MTPState
from .errors import CacheCapacityError, NoMTPModulesError
from .auto_draft import AutoDraft, DepthAcceptance, ModelledCosts, StepCosts
from .forwards import Forwards
from .memory import ensure_request_fits
from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan, attention_impl, causal_visibility
from .numerics import ensure_finite, first_nonfinite_module
from .params import GenerationRequest, chain_params
from .sampling import logits_to_probs, sample
from .stats import GenerationStats
from .verify.accept import Acceptance, accept_greedy, accept_sampling, accept_typical
from .verify.tree import DraftTree

StopChecker = Callable[[int, list[int]], "int | None"]
"""(sequence index, all tokens generated so far) -> number of tokens to keep if a stop string ended it."""


@dataclass
class StepOutput:
    """Tokens that one step emitted, per sequence index (only sequences that emitted something)."""

    new_tokens: dict[int, list[int]]
    finished: dict[int, str]
    """Sequences this step ended, each with why: 'eos', 'stop' (a stop string) or 'length' (max_new_tokens)."""


@dataclass
class _Batch:
    """Live decoding state of the sequences still running."""

    seq_ids: torch.Tensor  # [B] original index of each live row
    trunk: LatentCache
    mtp: MTPState | None
    pending: torch.Tensor  # [B] last emitted token, not yet in the trunk cache
    generated: list[list[int]]  # per original index
    stats: list[GenerationStats]  # per original index
    next_tree: DraftTree | None = None  # drafted while the previous step's MTP slots were appended


class Engine:
    """Runs one generate request over a batch of token-id prompts."""

    def __init__(self, model: DeepseekForCausalLM, request: GenerationRequest,
                 stop_checker: StopChecker | None = None, flash_prefill: bool = True, forwards: Forwards | None = None,
                 step_costs: StepCosts | None = None, depth_acceptance: DepthAcceptance | None = None,
                 cache_layout: CacheLayout | None = None):
        self.model = model
        self.cache_layout = cache_layout if cache_layout is not None else CacheLayout.for_config(model.config)
        self.forwards = forwards if forwards is not None else Forwards(model)
        self.flash_prefill = flash_prefill  # False keeps the prefill on SDPA even where flash-attn could run
        self.request = request
        self.stop_checker = stop_checker
        seed = request.sampling.seed
        self.generator = torch.Generator(device=next(model.parameters()).device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.drafting = request.draft.mode != "none"
        if self.drafting and model.num_mtp == 0:
            raise NoMTPModulesError()
        self.drafter = Drafter(self.forwards, request.draft, request.sampling, self.generator,
                               self.cache_layout) if self.drafting else None
        self.chain = request.draft.chains_only  # a commit never moves entries
        self.auto = None
        if request.draft.mode == "auto":
            seeded = not request.sampling.greedy and seed is not None  # its draws must not depend on timing
            costs = ModelledCosts() if seeded else step_costs if step_costs is not None else StepCosts()
            self.auto = AutoDraft(request.draft.max_depth, costs, None if seeded else depth_acceptance)

    def run(self, prompts: list[list[int]]) -> Iterator[StepOutput]:
        """Yield each step's emitted tokens until all sequences stop; stats are in `self.stats`."""
        with torch.inference_mode():
            batch, first = self.prefill(prompts)
            self.batch, self.stats = batch, batch.stats  # exposed read-only for inspection and tests
            yield first
            while batch.seq_ids.numel():
                yield self.step(batch)

    def prefill(self, prompts: list[list[int]]) -> tuple[_Batch, StepOutput]:
        """A new batch of `prompts` and the first token of each (what `run` starts with). For callers that drive
        the steps themselves, under torch.inference_mode (continuous batching: batching.py, serve/)."""
        start = time.perf_counter()
        batch = self._prefill(prompts)
        return batch, self._emit(batch, [[token] for token in batch.pending.tolist()], start)

    def step(self, batch: _Batch) -> StepOutput:
        """One decoding step of `batch` (what `run` repeats while rows are live)."""
        start = time.perf_counter()
        return self._emit(batch, self._step(batch), start)

    def _capacity(self, prompts: list[list[int]]) -> int:
        longest = max(len(p) for p in prompts)
        limit = self.model.config.max_position_embeddings
        if longest + self.request.max_new_tokens > limit:
            raise CacheCapacityError(
                f"prompt ({longest} tokens) + max_new_tokens ({self.request.max_new_tokens}) exceeds the model's "
                f"maximum of {limit} positions; shorten the prompt or lower max_new_tokens")
        capacity = longest + self.request.max_new_tokens + self.request.draft.max_nodes + 2
        ensure_request_fits(self.model, len(prompts), longest, capacity, self.request.draft)
        return capacity

    def _prefill(self, prompts: list[list[int]]) -> _Batch:
        """One trunk forward over the right-padded prompts; the first token comes from its last position."""
        capacity = self._capacity(prompts)
        device = next(self.model.parameters()).device
        b, p = len(prompts), max(len(x) for x in prompts)
        ids = torch.zeros(b, p, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        lens = torch.tensor([len(x) for x in prompts], dtype=torch.long, device=device)
        cfg = self.model.config
        dtype = self.model.lm_head.weight.dtype
        trunk = self.cache_layout.allocate(cfg.num_hidden_layers, b, capacity, dtype, device)
        positions = torch.arange(p, device=device).expand(b, p)
        plan = AttentionPlan.over_cache(trunk, positions, causal_visibility(b, p, positions, 0),
                                        impl=attention_impl(p), causal_only=self.flash_prefill)
        hidden = self.model.forward_trunk(ids, plan)
        rows = torch.arange(b, device=device)
        logits = self.model.logits(hidden[rows, lens - 1])
        self._ensure_finite(logits, ids, plan)
        first = self._pick(logits)
        trunk.commit(None, lens)
        mtp, tree = None, None
        if self.drafting:
            next_tokens = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
            next_tokens[rows, lens - 1] = first
            mtp_capacity = capacity + self.request.draft.max_depth + 2  # + the slots appended while drafting
            depth = self.auto.choose(_batch_bucket(b)) if self.auto is not None else None
            mtp, tree = self.drafter.start(hidden, next_tokens, lens, mtp_capacity, first, trunk.lengths,
                                           chain_params(depth) if depth else None)
        stats = [GenerationStats() for _ in prompts]
        for s in stats:
            s.record_step(drafted=0, tree_depth=0, accepted=0, leaf_reached=True)
        return _Batch(seq_ids=rows.clone(), trunk=trunk, mtp=mtp, pending=first,
                      generated=[[] for _ in prompts], stats=stats, next_tree=tree)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token from target logits [B, V] (argmax, or a sample)."""
        if self.request.sampling.greedy:
            return logits.argmax(dim=-1)
        return sample(logits_to_probs(logits, self.request.sampling), self.generator)

    def _step(self, batch: _Batch) -> list[list[int]]:
        """Verify (one trunk forward over the whole tree), accept, commit, and draft the next tree; returns the
        tokens each live row emitted (read from the device once per step)."""
        t0, compiled_before = time.perf_counter(), self.forwards.compile_seconds
        tree = batch.next_tree if batch.next_tree is not None else self._root_only(batch)
        hidden, logits = self._verify(batch, tree)
        acceptance = self._accept(tree, logits)
        t1 = time.perf_counter()
        emitted, counts, host = self._commit(batch, tree, acceptance)
        t2 = time.perf_counter()
        batch.next_tree = None
        next_depth = None
        if self.drafting and not self._length_reached_by_all(batch, host):
            path = acceptance.path.clamp_min(0)  # root + accepted nodes, padded
            path_hidden = hidden.gather(1, path[..., None].expand(-1, -1, hidden.shape[-1]))
            next_depth = self._draft_next(batch, path_hidden, emitted, counts)
        t3 = time.perf_counter()
        self._record(batch, tree, host, (t3 - t2, t1 - t0, t2 - t1))
        if self.auto is not None:
            timed = self.forwards.compile_seconds == compiled_before  # a step that compiled says nothing of cost
            self._learn(batch, tree, host, next_depth, (t2 - t0, t3 - t2) if timed else None)
        return [row[3: 3 + row[0]] for row in host]

    def _draft_next(self, batch: _Batch, path_hidden, emitted, counts) -> int | None:
        """Draft the next tree (auto: of the depth it chooses, or nothing); returns auto's depth."""
        if self.auto is None:
            batch.next_tree = self.drafter.advance(batch.mtp, path_hidden, emitted, counts, batch.pending,
                                                   batch.trunk.lengths)
            return None
        depth = self.auto.choose(_batch_bucket(batch.seq_ids.numel()))
        if depth == 0:
            self.drafter.skip(batch.mtp, path_hidden, emitted, counts)
        else:
            # whatever the last chain was, every module pass appends K + 1 slots: one shape per module
            pad = self.request.draft.max_depth + 1 - emitted.shape[1]
            emitted = torch.nn.functional.pad(emitted, (0, pad))
            path_hidden = torch.nn.functional.pad(path_hidden, (0, 0, 0, pad))
            batch.next_tree = self.drafter.advance(batch.mtp, path_hidden, emitted, counts, batch.pending,
                                                   batch.trunk.lengths, chain_params(depth))
        return depth

    def _learn(self, batch: _Batch, tree: DraftTree, host: list[list[int]], next_depth: int | None,
               seconds: tuple[float, float] | None) -> None:
        """Feed auto this step's acceptance and, unless `seconds` is None (the step compiled a graph), the measured
        (verify, draft) cost of the shapes involved."""
        bucket = _batch_bucket(len(host))
        depth = tree.tokens.shape[1] - 1  # auto drafts chains: nodes = depth
        self.auto.observe(depth, [row[0] - 1 for row in host])
        if seconds is None:
            return
        costs = self.auto.costs
        costs.record(costs.verify, (bucket, depth), seconds[0])
        if next_depth:
            costs.record(costs.draft, (bucket, next_depth), seconds[1])

    def _length_reached_by_all(self, batch: _Batch, host: list[list[int]]) -> bool:
        """Every live sequence ends at max_new_tokens with this step, so no next tree is needed."""
        return all(len(batch.generated[seq]) + row[0] >= self.request.max_new_tokens
                   for seq, row in zip(batch.seq_ids.tolist(), host))

    @staticmethod
    def _root_only(batch: _Batch) -> DraftTree:
        """Plain decoding: the tree is the pending token alone."""
        zeros = torch.zeros(batch.pending.shape[0], 1, dtype=torch.long, device=batch.pending.device)
        return DraftTree(tokens=batch.pending[:, None], parents=zeros - 1, depths=zeros, chain=True)

    def _verify(self, batch: _Batch, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk forward over all n tree nodes at positions L + depth, each seeing the prefix and its ancestors."""
        positions = batch.trunk.lengths[:, None] + tree.depths
        plan = AttentionPlan.over_cache(batch.trunk, positions, tree.ancestor_mask())
        hidden, logits = self.forwards.trunk(tree.tokens, plan)
        self._ensure_finite(logits, tree.tokens, plan)
        return hidden, logits

    def _ensure_finite(self, logits: torch.Tensor, ids: torch.Tensor, plan: AttentionPlan) -> None:
        """NaN/Inf in trunk logits is an error naming the first module that produced it (found by re-running the
        forward eagerly, which rewrites the same uncommitted cache slots)."""
        ensure_finite(logits, "trunk", lambda: first_nonfinite_module(
            self.model, lambda: self.model.forward_trunk(ids, plan)))

    def _accept(self, tree: DraftTree, logits: torch.Tensor) -> Acceptance:
        request = self.request
        if request.sampling.greedy:
            return accept_greedy(tree, logits.argmax(dim=-1))
        probs = logits_to_probs(logits, request.sampling)
        if request.acceptance == "typical":
            return accept_typical(tree, probs, request.typical_threshold, request.typical_alpha, self.generator)
        return accept_sampling(tree, probs, self.generator)

    def _commit(self, batch: _Batch, tree: DraftTree, acceptance: Acceptance):
        """Keep the accepted path's cache entries; the bonus token becomes the next pending token.

        Returns emitted [B, P] (the accepted drafts then the bonus, padded to the tree depth + 1), counts [B], and
        per row the host list [count, leaf reached, tree depth, *emitted]: the one read from the device a step
        makes."""
        counts = acceptance.num_accepted + 1  # root + accepted drafts enter the trunk cache
        path = acceptance.path.clamp_min(0)
        batch.trunk.commit(None if self.chain else path, counts)
        path_tokens = tree.tokens.gather(1, path)
        emitted = torch.cat([path_tokens[:, 1:], acceptance.bonus[:, None]], dim=1)  # [B, P]
        emitted.scatter_(1, (counts - 1)[:, None], acceptance.bonus[:, None])
        batch.pending = acceptance.bonus
        facts = [counts, self._leaf_reached(tree, acceptance), tree.depths.max(dim=1).values]
        host = torch.cat([torch.stack(facts, dim=1), emitted], dim=1).tolist()
        return emitted, counts, host

    @staticmethod
    def _leaf_reached(tree: DraftTree, acceptance: Acceptance) -> torch.Tensor:
        """[B] 1 where the last accepted node has no child in the tree (every draft below it was accepted)."""
        last = acceptance.path.gather(1, acceptance.num_accepted[:, None])  # [B, 1]
        return (tree.parents != last).all(dim=1).long()

    def _record(self, batch: _Batch, tree: DraftTree, host: list[list[int]], times) -> None:
        drafted = tree.tokens.shape[1] - 1
        for row, seq in enumerate(batch.seq_ids.tolist()):
            count, leaf, depth = host[row][:3]
            stats = batch.stats[seq]
            stats.record_step(drafted, depth, count - 1, bool(leaf))
            stats.time_draft += times[0]
            stats.time_verify += times[1]
            stats.time_commit += times[2]

    def _emit(self, batch: _Batch, emitted: list[list[int]], start: float) -> StepOutput:
        """Apply stop conditions to this step's tokens, drop finished rows, and report what was emitted."""
        out, finished, keep = {}, {}, []
        eos = set(self.request.eos_token_ids)
        for row, seq in enumerate(batch.seq_ids.tolist()):
            tokens, stop = self._cut(batch.generated[seq], emitted[row], eos, seq)
            batch.generated[seq].extend(tokens)
            stats = batch.stats[seq]
            stats.new_tokens += len(tokens)
            stats.time_total += time.perf_counter() - start
            if tokens:
                out[seq] = tokens
            if stop:
                finished[seq] = stop
            else:
                keep.append(row)
        if finished:
            self._drop_finished(batch, keep)
        return StepOutput(out, finished)

    def _cut(self, before: list[int], tokens: list[int], eos: set[int], seq: int) -> tuple[list[int], str | None]:
        """Tokens kept from this step and why the sequence stops: 'stop' (a stop string), 'eos', 'length'
        (max_new_tokens), or None while it goes on. The earliest cut wins; a stop string ending on an eos or the
        last allowed token counts as 'stop', an eos that is the last allowed token as 'eos'."""
        room = self.request.max_new_tokens - len(before)
        stop = "length" if len(tokens) >= room else None
        tokens = tokens[:room]
        for i, token in enumerate(tokens):
            if token in eos:
                tokens, stop = tokens[: i + 1], "eos"
                break
        if self.stop_checker is not None:
            keep = self.stop_checker(seq, before + tokens)
            if keep is not None:
                tokens, stop = (before + tokens)[len(before): keep], "stop"
        return tokens, stop

    def _drop_finished(self, batch: _Batch, keep: list[int]) -> None:
        rows = torch.tensor(keep, dtype=torch.long, device=batch.pending.device)
        batch.seq_ids = batch.seq_ids[rows]
        batch.pending = batch.pending[rows]
        batch.trunk.keep_rows(rows)
        if batch.mtp is not None:
            batch.mtp.keep_rows(rows)
        if batch.next_tree is not None:
            batch.next_tree = batch.next_tree.select_rows(rows)


def _batch_bucket(batch_size: int) -> int:
    """Step costs are kept per power-of-two batch size (a batch shrinks one row at a time)."""
    return 1 << (batch_size - 1).bit_length()
