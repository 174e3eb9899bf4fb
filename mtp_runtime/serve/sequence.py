"""Submission and Sequence: one API request on its way through the scheduler, and each of its prompts.

The HTTP handler (event loop thread) creates a Submission and reads its events; the scheduler thread decodes
its sequences and sends the events (text as it becomes final, then each choice as it finishes) through the
event loop's queue, the only thing the two threads share besides the `cancelled` flag.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..stats import GenerationStats
from ..text import StopStrings, TextStream
from .errors import ApiError
from .job import Job
from .responses import Choice


@dataclass
class Tokens:
    """New tokens of choice `index` and the text they made final (possibly empty: held back)."""

    index: int
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    choice: Choice


@dataclass
class Failed:
    """The request cannot finish: the answer is this error (a stream sends it as its last event)."""

    error: ApiError


class Submission:
    """A request's sequences and the queue their events reach the handler by."""

    def __init__(self, job: Job, tokenizer, eos_token_ids: tuple[int, ...], loop: asyncio.AbstractEventLoop):
        self.job = job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.cancelled = False
        """Set by the handler when its client has gone; the scheduler then drops the sequences."""
        eos = frozenset() if job.ignore_eos else frozenset(eos_token_ids)
        self.sequences = [Sequence(self, i, list(prompt), job.max_tokens, eos, TextStream(tokenizer, job.stop))
                          for i, prompt in enumerate(job.prompts)]

    def send(self, event) -> None:
        """From the scheduler thread: hand an event to the handler (dropped if the event loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass

    async def stream(self):
        """The events of this request, in order, until every choice has finished or the request has failed."""
        unfinished = len(self.sequences)
        while unfinished:
            event = await self.events.get()
            yield event
            if isinstance(event, Failed):
                return
            unfinished -= isinstance(event, Finished)

    def fail(self, error: ApiError) -> list["Sequence"]:
        """End the request with `error`; returns the sequences that were still unfinished."""
        unfinished = [s for s in self.sequences if s.finish_reason is None]
        for sequence in unfinished:
            sequence.finish_reason = "error"
        self.send(Failed(error))
        return unfinished


class Sequence:
    """One prompt of a submission: its stop rules (the engine's stop checker for its row), text and timings."""

    def __init__(self, submission: Submission, index: int, prompt: list[int], max_tokens: int,
                 eos: frozenset[int], text: TextStream):
        self.submission = submission
        self.index = index
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.eos = eos
        self.text = text
        self.stop_strings = StopStrings([text]) if text.stop_strings else None
        self.tokens: list[int] = []
        self.checked = 0
        """Tokens already checked for a stop (the engine passes every token generated so far)."""
        self.finish_reason: str | None = None
        """'stop' (eos or a stop string), 'length' (max_tokens), 'cancelled' or 'error'; None while running."""
        self.stats: GenerationStats | None = None
        """The engine's figures for this row, once prefilled."""
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.exported: dict[str, int] = {}
        """Speculative counters already added to /metrics (see ServeMetrics.progress)."""

    @property
    def cancelled(self) -> bool:
        return self.submission.cancelled

    def check(self, tokens: list[int]) -> int | None:
        """All tokens generated so far -> how many to keep if the sequence ends here (eos, a stop string,
        max_tokens, or its client gone), else None."""
        if self.cancelled:
            self.finish_reason = "cancelled"
            return self.checked
        end = len(tokens)
        cut, reason = (self.max_tokens, "length") if end >= self.max_tokens else (None, None)
        limit = end if cut is None else cut
        eos_at = next((i for i in range(self.checked, limit) if tokens[i] in self.eos), None)
        if eos_at is not None:
            cut, reason = eos_at + 1, "stop"
        if self.stop_strings is not None:
            keep = self.stop_strings(0, tokens[: end if cut is None else cut])
            if keep is not None:
                cut, reason = keep, "stop"
        self.checked = end
        if reason is not None:
            self.finish_reason = reason
        return cut

    def on_tokens(self, tokens: list[int], now: float) -> None:
        """Tokens the engine emitted for this row (already cut at its stop)."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.tokens += tokens
        self.submission.send(Tokens(self.index, self.text.push(self.tokens), tokens))

    def on_finish(self) -> None:
        """The row left the batch: send the rest of its text and the finished choice."""
        if self.finish_reason is None:  # the engine's own limit (the request's max_tokens) ended it
            self.finish_reason = "length"
        if self.finish_reason == "cancelled":
            return
        final = self.text.final(self.tokens)
        if len(final) > self.text.released:
            self.submission.send(Tokens(self.index, final[self.text.released:], []))
            self.text.released = len(final)
        self.submission.send(Finished(Choice(self.index, final, self.finish_reason, list(self.tokens),
                                             len(self.prompt), self.stats or GenerationStats())))
