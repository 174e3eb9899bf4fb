"""Scheduler: the one thread that owns the model and runs every decoding step (continuous batching).

Requests reach it through a bounded queue (`submit`; a request that does not fit is answered 429) and get their
tokens back through their Submission's events. Each turn of its loop:

  1. drop the rows of requests whose client has gone;
  2. admit queued requests, first come first served, while the running sequences stay within --max-batch:
     each group of requests with equal DecodeSettings is prefilled together and merged into the running batch
     of those settings (a seeded sampled request gets a batch of its own);
  3. run one decoding step of every running batch, and send what it emitted.

Requests in one batch may differ in prompts, max_tokens, stop strings, eos handling and arrival time. A failure
inside a step fails that batch's requests with a 500 and the server goes on. After `drain` (SIGINT/SIGTERM),
new requests are answered 503 while the running and queued ones finish, until the drain's deadline, when those
still unfinished get a 503 error too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from ..engine import StepOutput
from ..runtime import Runtime
from .errors import ApiError
from .group import RunningGroup
from .metrics import ServeMetrics
from .sequence import Sequence, Submission

log = logging.getLogger("mtp_runtime.serve")
IDLE_WAIT_S = 0.5
"""Longest sleep of an idle loop (it wakes at once on a submit, cancel or drain)."""


class Scheduler:
    """Continuous batching over one runtime, in a thread of its own."""

    def __init__(self, runtime: Runtime, max_batch: int, max_queue: int, metrics: ServeMetrics):
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._wake = threading.Condition()
        self._waiting: deque[Submission] = deque()
        self._waiting_rows = 0
        self._groups: dict[object, RunningGroup] = {}
        self._deadline: float | None = None  # set by drain: time.monotonic() when the unfinished get a 503
        self._stop = False
        self._idle = True  # the loop waits with nothing running, queued or being admitted
        self._thread = threading.Thread(target=self._run, name="mtp-runtime-scheduler", daemon=True)

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def idle(self) -> bool:
        """Nothing is running, queued or being admitted."""
        return self._idle

    @property
    def running_rows(self) -> int:
        return sum(group.size for group in list(self._groups.values()))

    @property
    def waiting_rows(self) -> int:
        return self._waiting_rows

    def start(self) -> None:
        self._thread.start()

    def submit(self, submission: Submission) -> None:
        """Queue a request (raises ApiError 503 while draining, 429 when the queue has no room for it)."""
        rows = len(submission.sequences)
        with self._wake:
            if self.draining:
                raise ApiError(503, "the server is shutting down and takes no new requests; retry once it is back",
                               code="shutting_down")
            if self._waiting_rows + rows > self.max_queue:
                raise ApiError(429, f"the queue is full ({self._waiting_rows} of {self.max_queue} sequences "
                               "waiting); retry later, or start the server with a larger --max-queue",
                               code="queue_full")
            self._waiting.append(submission)
            self._waiting_rows += rows
            self._idle = False
            self.metrics.waiting.set(self._waiting_rows)
            self._wake.notify()

    def cancel(self, submission: Submission) -> None:
        """The client has gone: its sequences leave the queue or the batch before the next step."""
        submission.cancelled = True
        with self._wake:
            self._wake.notify()

    def drain(self, timeout: float) -> None:
        """Take no new requests; those running or queued get `timeout` seconds to finish."""
        with self._wake:
            if self._deadline is None:
                self._deadline = time.monotonic() + timeout
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop (whatever is unfinished gets a 503) and wait for the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        if self.runtime.device.type == "cpu" and torch.get_num_threads() != self.runtime.threads:
            torch.set_num_threads(self.runtime.threads)
        with torch.inference_mode():
            while True:
                admitted = self._next_turn()
                if admitted is None:
                    break
                self._admit(admitted)
                self._step_all()
                self.metrics.running.set(self.running_rows)
        with self._wake:
            self._fail_everything(ApiError(503, "the server stopped before this request finished; retry once it "
                                           "is back", code="shutting_down"))

    def _next_turn(self) -> list[Submission] | None:
        """Wait until there is work; returns the requests to admit now, or None when the loop must end."""
        with self._wake:
            while True:
                self._forget_cancelled()
                if self._stop:
                    return None
                if self.draining and time.monotonic() >= self._deadline:
                    self._fail_everything(ApiError(503, "the server shut down before this request finished; "
                                                   "retry once it is back", code="shutting_down"))
                admitted = self._take_admissible()
                self._idle = not (admitted or self.running_rows)
                if not self._idle:
                    return admitted
                self._wake.wait(IDLE_WAIT_S)

    def _forget_cancelled(self) -> None:
        kept = [s for s in self._waiting if not s.cancelled]
        for submission in self._waiting:
            if submission.cancelled:
                for sequence in submission.sequences:
                    sequence.finish_reason = "cancelled"
                    self.metrics.finished(sequence)
        self._set_waiting(kept)

    def _take_admissible(self) -> list[Submission]:
        """Queued requests, oldest first, while their sequences fit in the running batch."""
        room = self.max_batch - self.running_rows
        admitted = []
        while self._waiting and len(self._waiting[0].sequences) <= room:
            submission = self._waiting.popleft()
            room -= len(submission.sequences)
            admitted.append(submission)
        self._set_waiting(list(self._waiting))
        return admitted

    def _set_waiting(self, submissions: list[Submission]) -> None:
        self._waiting = deque(submissions)
        self._waiting_rows = sum(len(s.sequences) for s in submissions)
        self.metrics.waiting.set(self._waiting_rows)

    def _admit(self, submissions: list[Submission]) -> None:
        """Prefill the admitted requests, one prefill per group of equal settings, into their running batches."""
        by_key: dict[object, list[Submission]] = {}
        for submission in submissions:
            settings = submission.job.decode
            key = ("exclusive", id(submission)) if settings.exclusive else settings.group_key()
            by_key.setdefault(key, []).append(submission)
        for key, group_submissions in by_key.items():
            group = self._groups.get(key) or RunningGroup(self.runtime, group_submissions[0].job.decode)
            new = [seq for submission in group_submissions for seq in submission.sequences]
            try:
                first, sequences = group.join(new)
            except Exception as error:
                log.exception("prefill failed")
                for submission in group_submissions:
                    self._fail(submission, error)
                continue
            self._groups[key] = group
            self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in new))
            self._deliver(first, sequences)
            self._forget_if_empty(key)

    def _step_all(self) -> None:
        for key, group in list(self._groups.items()):
            for sequence in group.drop_cancelled():
                self.metrics.finished(sequence)
            if group.size:
                stepped = group.live()
                self.metrics.batch_size.observe(len(stepped))
                try:
                    out, sequences = group.step()
                except Exception as error:
                    log.exception("decoding step failed")
                    for submission in {id(s.submission): s.submission for s in stepped}.values():
                        self._fail(submission, error)
                    del self._groups[key]
                    continue
                for sequence in stepped:
                    self.metrics.progress(sequence)
                self._deliver(out, sequences)
            self._forget_if_empty(key)

    def _forget_if_empty(self, key) -> None:
        if not self._groups[key].size:
            del self._groups[key]

    def _deliver(self, out: StepOutput, sequences: list[Sequence]) -> None:
        """Send a step's tokens, and each finished sequence, to their requests."""
        now = time.perf_counter()
        for seq, tokens in out.new_tokens.items():
            sequence = sequences[seq]
            first = sequence.first_token_at is None
            sequence.on_tokens(tokens, now)
            self.metrics.tokens(sequence, len(tokens), first)
        for seq in out.finished:
            sequences[seq].on_finish()
            self.metrics.finished(sequences[seq])

    def _fail(self, submission: Submission, error: Exception) -> None:
        error = ApiError(500, f"decoding this request failed ({type(error).__name__}: {error}); it was dropped "
                         "and the server goes on", code="decoding_failed")
        for sequence in submission.fail(error):
            self.metrics.finished(sequence)

    def _fail_everything(self, error: ApiError) -> None:
        """Answer every unfinished request with `error` (shutdown)."""
        submissions = {id(s): s for s in self._waiting}
        for group in self._groups.values():
            submissions.update({id(seq.submission): seq.submission for seq in group.live()})
        for submission in submissions.values():
            for sequence in submission.fail(error):
                self.metrics.finished(sequence)
        self._groups.clear()
        self._set_waiting([])
