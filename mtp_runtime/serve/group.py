"""RunningGroup: the sequences that decode together as one batch (equal DecodeSettings), its engine and batch.

Sequences join between steps: their prompts are prefilled as a batch of their own, by an engine sized for
them, and merged into the running batch (batching.combine); rows leave when the engine finds them finished,
or before a step when their client has gone. Every row has its own max_tokens, eos and stop strings: the
engine asks each row's Sequence (its stop checker), so its own limit is the context (never reached first).

A seeded sampled request decodes alone (DecodeSettings.exclusive): one engine, seeded with its seed, prefills
and steps it, exactly as `Runtime.generate` would.
"""

from __future__ import annotations

from ..batching import combine
from ..engine import Engine, StepOutput
from ..runtime import Runtime
from .job import DecodeSettings
from .sequence import Sequence


class RunningGroup:
    """One running batch and the Sequence of each of its rows (by the batch's sequence ids)."""

    def __init__(self, runtime: Runtime, settings: DecodeSettings):
        self.runtime = runtime
        self.settings = settings
        self.engine: Engine | None = None if settings.exclusive else self._engine(
            runtime.config.max_position_embeddings, self._check)
        self.batch = None
        self.sequences: list[Sequence] = []

    @property
    def size(self) -> int:
        """Rows decoding."""
        return 0 if self.batch is None else self.batch.seq_ids.numel()

    def live(self) -> list[Sequence]:
        return [] if self.batch is None else [self.sequences[s] for s in self.batch.seq_ids.tolist()]

    def _engine(self, max_new_tokens: int, stop_checker) -> Engine:
        rt = self.runtime
        return Engine(rt.model, self.settings.request(max_new_tokens), stop_checker,
                      flash_prefill=rt.attention != "sdpa", forwards=rt.forwards, step_costs=rt.step_costs,
                      depth_acceptance=rt.depth_acceptance, cache_layout=rt.cache_layout)

    def _check(self, seq: int, tokens: list[int]) -> int | None:
        return self.sequences[seq].check(tokens)

    def join(self, new: list[Sequence]) -> tuple[StepOutput, list[Sequence]]:
        """Prefill `new` and merge its live rows into the batch; returns the first tokens (by index into `new`)."""
        if self.settings.exclusive:
            if self.batch is not None:
                raise RuntimeError("an exclusive group decodes one request only")
            self.sequences = new
            self.engine = engine = self._engine(max(s.max_tokens for s in new), self._check)
        else:
            engine = self._engine(max(s.max_tokens for s in new), lambda seq, tokens: new[seq].check(tokens))
        batch, first = engine.prefill([s.prompt for s in new])
        for sequence, stats in zip(new, batch.stats):
            sequence.stats = stats
        running = [] if self.batch is None else self.batch.seq_ids.tolist()
        if not running:
            self.batch, self.sequences = batch, new
        else:
            joined = batch.seq_ids.tolist()
            self.batch = combine(self.engine.drafter, [(self.batch, running), (batch, joined)])
            self.sequences = [self.sequences[s] for s in running] + [new[s] for s in joined]
        return first, new

    def step(self) -> tuple[StepOutput, list[Sequence]]:
        """One decoding step; returns its output and the sequences its ids refer to."""
        return self.engine.step(self.batch), self.sequences

    def drop_cancelled(self) -> list[Sequence]:
        """Remove the rows whose client has gone (before a step, so that they cost nothing more)."""
        live = self.batch.seq_ids.tolist()
        keep = [s for s in live if not self.sequences[s].cancelled]
        if len(keep) == len(live):
            return []
        gone = [self.sequences[s] for s in live if self.sequences[s].cancelled]
        self.batch = combine(self.engine.drafter, [(self.batch, keep)])
        self.sequences = [self.sequences[s] for s in keep]
        for sequence in gone:
            sequence.finish_reason = "cancelled"
        return gone
