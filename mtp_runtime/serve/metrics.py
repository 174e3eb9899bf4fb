"""ServeMetrics: what GET /metrics exports (Prometheus text format, through prometheus_client).

Names carry the prefix `mtp_runtime:`; the speculative-decoding counters are named as vLLM names the same
figures (`vllm:spec_decode_num_drafts`, ...), so dashboards built for one read the other:

  spec_decode_num_drafts_total             verify steps of a sequence that carried drafted tokens
  spec_decode_num_draft_tokens_total       drafted tokens sent to verification (tree nodes)
  spec_decode_num_accepted_tokens_total    drafted tokens accepted
  spec_decode_num_accepted_tokens_per_pos_total{position="i"}   steps whose draft at depth i + 1 was accepted

Besides: requests finished (by finish reason) and refused (by status), prompt and generation tokens, time to
first token, time per output token and end-to-end latency histograms, the waiting queue and the running batch
(gauges), the batch size of every decoding step (histogram), and the process's memory and CPU (the standard
process collector).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from .sequence import Sequence

PREFIX = "mtp_runtime:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        self.request_success = counter("request_success", "Sequences finished, by finish reason (each prompt of "
                                       "a request is one sequence).", ["finished_reason"])
        self.request_refused = counter("request_refused", "API requests answered with an error, by HTTP status.",
                                       ["status"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated and sent.")
        self.num_drafts = counter("spec_decode_num_drafts", "Verify steps of a sequence that carried drafts.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens sent to verification.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Verify steps whose draft at depth position + 1 was accepted.", ["position"])
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its sequence's first token.")
        self.time_per_output_token = histogram("time_per_output_token_seconds",
                                               "Seconds per token after the first, per finished sequence.")
        self.e2e_latency = histogram("e2e_request_latency_seconds",
                                     "Seconds from a request's arrival to its sequence's last token.")
        self.batch_size = histogram("iteration_batch_size", "Sequences in each decoding step (prefills "
                                    "excluded).", BATCH_BUCKETS)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences queued, not yet decoding.",
                             registry=self.registry)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch.",
                             registry=self.registry)

    def tokens(self, sequence: Sequence, count: int, first: bool) -> None:
        self.generation_tokens.inc(count)
        if first:
            self.time_to_first_token.observe(sequence.first_token_at - sequence.submission.arrived)

    def finished(self, sequence: Sequence) -> None:
        self.request_success.labels(sequence.finish_reason).inc()
        if sequence.last_token_at is None:
            return
        self.e2e_latency.observe(sequence.last_token_at - sequence.submission.arrived)
        if len(sequence.tokens) > 1:
            span = sequence.last_token_at - sequence.first_token_at
            self.time_per_output_token.observe(span / (len(sequence.tokens) - 1))

    def progress(self, sequence: Sequence) -> None:
        """Add what the sequence's stats gained since the last call to the speculative counters."""
        stats = sequence.stats
        now = {"drafts": stats.draft_steps, "draft_tokens": stats.drafted_tokens,
               **{str(pos): accepted for pos, accepted in enumerate(stats.depth_accepts)}}
        before = sequence.exported
        gain = {key: value - before.get(key, 0) for key, value in now.items()}
        sequence.exported = now
        self.num_drafts.inc(gain.pop("drafts"))
        self.num_draft_tokens.inc(gain.pop("draft_tokens"))
        self.num_accepted_tokens.inc(sum(gain.values()))
        for position, accepted in gain.items():
            if accepted:
                self.accepted_per_pos.labels(position).inc(accepted)
