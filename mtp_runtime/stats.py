"""Acceptance statistics: per-depth acceptance, mean accepted length and tau, histogram and the time split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def tokens_per_second(tokens: int, seconds: float) -> float:
    """tokens / seconds; 0.0 when no time was measured."""
    return tokens / seconds if seconds > 0 else 0.0


@dataclass
class GenerationStats:
    """Figures for one sequence (or summed over several with `merge`)."""

    steps: int = 0
    """Trunk forwards that emitted tokens (the prefill counts as one; each verify is one)."""
    new_tokens: int = 0
    drafted_tokens: int = 0
    """Draft nodes sent to verification, summed over steps."""
    depth_attempts: list[int] = field(default_factory=list)
    """[d-1]: steps in which a depth-d node was drafted under an accepted parent."""
    depth_accepts: list[int] = field(default_factory=list)
    """[d-1]: steps in which a depth-d node was accepted."""
    draft_steps: int = 0
    """Verify steps that carried at least one drafted token."""
    accepted_lengths: Counter = field(default_factory=Counter)
    """Histogram: drafted tokens accepted per step (0..depth); prefill excluded."""
    draft_sizes: Counter = field(default_factory=Counter)
    """Histogram: tokens drafted per verify step (0: a plain step); what draft='auto' chose."""
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_commit: float = 0.0
    time_total: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """new_tokens / steps: tokens per trunk forward, the prefill counted as the first step.

        Plain decoding gives exactly 1.0; with drafting the prefill pulls it below `tau`.
        """
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tau(self) -> float:
        """1 + sum(cumulative_acceptance): tokens per verify forward that carried drafts, bonus included.

        docs/architecture.md's tau; 1.0 when nothing was drafted.
        """
        return 1.0 + sum(self.cumulative_acceptance)

    @property
    def acceptance_per_depth(self) -> list[float]:
        """P(depth-d draft accepted | its parent accepted), depth 1 first."""
        return [a / t if t else 0.0 for a, t in zip(self.depth_accepts, self.depth_attempts)]

    @property
    def cumulative_acceptance(self) -> list[float]:
        """vLLM's per-position rate: P(at least d drafted tokens accepted) over drafting steps."""
        if not self.draft_steps:
            return []
        return [a / self.draft_steps for a in self.depth_accepts]

    @property
    def accepted_length_histogram(self) -> dict[int, int]:
        return dict(sorted(self.accepted_lengths.items()))

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.time_total)

    @property
    def time_other(self) -> float:
        return max(self.time_total - self.time_draft - self.time_verify - self.time_commit, 0.0)

    def record_step(self, drafted: int, tree_depth: int, accepted: int, leaf_reached: bool) -> None:
        """One verify step: `accepted` drafts kept out of a tree of `drafted` nodes and `tree_depth` levels."""
        self.steps += 1
        if self.steps > 1:
            self.draft_sizes[drafted] += 1
        if drafted == 0:
            return
        self.draft_steps += 1
        self.drafted_tokens += drafted
        self.accepted_lengths[accepted] += 1
        self._grow(tree_depth)
        for d in range(1, min(accepted + 1, tree_depth) + 1):
            attempted = d <= accepted or not leaf_reached
            self.depth_attempts[d - 1] += attempted
            self.depth_accepts[d - 1] += d <= accepted

    def _grow(self, depth: int) -> None:
        while len(self.depth_attempts) < depth:
            self.depth_attempts.append(0)
            self.depth_accepts.append(0)

    def merge(self, other: "GenerationStats") -> "GenerationStats":
        out = GenerationStats()
        for name in ("steps", "new_tokens", "drafted_tokens", "draft_steps", "time_draft", "time_verify",
                     "time_commit", "time_total"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out._grow(max(len(self.depth_attempts), len(other.depth_attempts)))
        for src in (self, other):
            for i, (t, a) in enumerate(zip(src.depth_attempts, src.depth_accepts)):
                out.depth_attempts[i] += t
                out.depth_accepts[i] += a
        out.accepted_lengths = self.accepted_lengths + other.accepted_lengths
        out.draft_sizes = self.draft_sizes + other.draft_sizes
        return out

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "drafted_tokens": self.drafted_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "tau": self.tau,
            "acceptance_per_depth": self.acceptance_per_depth,
            "cumulative_acceptance": self.cumulative_acceptance,
            "accepted_length_histogram": {str(k): v for k, v in self.accepted_length_histogram.items()},
            "draft_size_histogram": {str(k): v for k, v in sorted(self.draft_sizes.items())},
            "tokens_per_second": self.tokens_per_second,
            "time_s": {"draft": self.time_draft, "verify": self.time_verify, "commit": self.time_commit,
                       "other": self.time_other, "total": self.time_total},
        }
