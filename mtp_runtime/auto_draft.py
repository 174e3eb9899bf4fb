"""`draft="auto"`: choose each step's draft (no draft, or a chain of 1..K tokens) for the most tokens per second.

A chain of k drafts emits E_k = 1 + sum_{i<=k} prod_{j<=i} a_j tokens per step on average, where a_j is the
probability that depth j is accepted given that depth j-1 was (measured online, with exponential forgetting so
that it follows the text being written; a depth seldom drafted leans on the depth above it). Its cost is the
measured wall time of such a step at the current batch size (verify + accept + commit of the chain, and the
drafting that produced it), made non-decreasing in k. Both are kept per runtime, so that later calls start from
what earlier ones measured (the acceptance weighed as a few steps: CARRIED_WEIGHT). Each step takes the k with
the largest E_k / cost_k; k = 0 is plain decoding, with no MTP work at all. Untried depths are tried once first;
after that, every few steps a neighbour of the best depth is tried again to keep its estimate fresh, less and
less often while plain decoding keeps winning. The choice only changes what is proposed, never how it is
verified: output stays exactly plain decoding's (greedy: the same tokens; sampling: the same distribution).
Seeded sampling repeats exactly: it chooses by modelled costs (`ModelledCosts`), not by timings, and from the
acceptance of its own call only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ACCEPTANCE = 0.8
"""Acceptance assumed for depth 1 before it is measured: trained MTP modules accept 0.8-0.9 (DeepSeek-V3:
0.85-0.9), and a pessimistic prior starves auto of the observations that would correct it, since a depth it does
not choose is not measured."""
PRIOR_WEIGHT = 2.0
"""Observations the prior of a depth weighs: depth 1's is PRIOR_ACCEPTANCE, depth d's the estimate of depth d-1
(a deep depth is seldom drafted, and its acceptance given its parent's is seldom lower than its parent's)."""
FORGET = 0.98
"""Each new observation of a depth scales its earlier counts by this (an effective window of ~50 steps)."""
CARRIED_WEIGHT = 16.0
"""A call starts from the acceptance earlier calls of its runtime measured, weighing at most this many
observations per depth (a third of the forgetting window), so that a different text overrides it within a few
steps while a few early rejections no longer sink a depth that has been accepted for hundreds of steps."""
COST_SMOOTHING = 0.2
"""Weight of the newest step time in a cost's moving average."""
RESTART_BELOW = 0.5
"""A step faster than this fraction of a cost's average replaces the average."""
MODELLED_COST_PER_DRAFT = 0.5
"""Seeded sampling: a drafted token is assumed to cost this fraction of a plain step (about what a chain step
measured on the shipped model in eager mode), since measured times would make the draws depend on timing."""
EXPLORE_EVERY = 16
EXPLORE_MAX = 512
"""A neighbour of the best depth is retried every EXPLORE_EVERY steps; while plain decoding keeps winning, the
interval doubles up to EXPLORE_MAX (a probe costs a few plain steps' worth of MTP catch-up)."""


@dataclass
class StepCosts:
    """Measured seconds per decoding step, per (batch size, chain depth); lives as long as its runtime."""

    verify: dict[tuple[int, int], float] = field(default_factory=dict)
    """Verify + accept + commit of a step whose tree was a chain of k drafts (k = 0: plain decoding)."""
    draft: dict[tuple[int, int], float] = field(default_factory=dict)
    """Drafting a chain of k drafts (module passes, tree growth), the previous step's appends included."""

    def record(self, table: dict, key: tuple[int, int], seconds: float) -> None:
        """A moving average, restarted by a step under half of it: a shape first measured on a slow step (a first
        call) is chosen rarely after, so such a high estimate must not linger. (Following every faster step at
        once would favour the shapes chosen most: the more samples, the luckier the fastest one.)"""
        old = table.get(key)
        restart = old is None or seconds < RESTART_BELOW * old
        table[key] = seconds if restart else (1 - COST_SMOOTHING) * old + COST_SMOOTHING * seconds

    def step(self, batch: int, k: int) -> float | None:
        """Seconds of one step with a chain of k drafts, or None while unmeasured."""
        verify = self.verify.get((batch, k))
        if k == 0:
            return verify
        draft = self.draft.get((batch, k))
        return None if verify is None or draft is None else verify + draft


class ModelledCosts(StepCosts):
    """Step costs that depend on nothing measured: a chain of k drafts costs 1 + per_draft * k plain steps.

    With a seed, sampled output must repeat exactly; which tokens are drawn depends on the draft shapes, so auto
    then chooses from the acceptance it measures (the same on every run) and these modelled costs, never timings.
    """

    def __init__(self, per_draft: float = MODELLED_COST_PER_DRAFT):
        super().__init__()
        self.per_draft = per_draft

    def record(self, table: dict, key: tuple[int, int], seconds: float) -> None:
        pass

    def step(self, batch: int, k: int) -> float:
        return 1.0 + self.per_draft * k


class DepthAcceptance:
    """Per-depth counts of drafts tried and kept (depth d counted where depth d-1 was kept), with forgetting."""

    def __init__(self, attempts: list[float] | None = None, accepts: list[float] | None = None):
        self.attempts = list(attempts or [])
        self.accepts = list(accepts or [])

    def rates(self, depths: int) -> list[float]:
        """Estimated P(depth d accepted | depth d-1 accepted), d = 1..depths, each shrunk towards the one above."""
        rates, above = [], PRIOR_ACCEPTANCE
        for d in range(depths):
            tried, kept = (self.attempts[d], self.accepts[d]) if d < len(self.attempts) else (0.0, 0.0)
            above = (kept + PRIOR_WEIGHT * above) / (tried + PRIOR_WEIGHT)
            rates.append(above)
        return rates

    def observe(self, depth: int, accepted: list[int]) -> None:
        """One verified chain of `depth` drafts; accepted[b] drafts were kept in row b."""
        missing = depth - len(self.attempts)
        if missing > 0:
            self.attempts += [0.0] * missing
            self.accepts += [0.0] * missing
        for d in range(1, depth + 1):
            tried = sum(1 for a in accepted if a >= d - 1)
            if tried:
                kept = sum(1 for a in accepted if a >= d)
                self.attempts[d - 1] = FORGET * self.attempts[d - 1] + tried
                self.accepts[d - 1] = FORGET * self.accepts[d - 1] + kept

    def carried(self) -> DepthAcceptance:
        """A copy for a new call: the same rates, each depth weighing at most CARRIED_WEIGHT observations."""
        scales = [min(1.0, CARRIED_WEIGHT / tried) if tried else 1.0 for tried in self.attempts]
        return DepthAcceptance([t * s for t, s in zip(self.attempts, scales)],
                               [k * s for k, s in zip(self.accepts, scales)])


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a deeper chain never costs
    less than a shallower one, whatever the noise in their separately measured averages."""
    blocks: list[tuple[float, int]] = []  # (mean, length)
    for value in values:
        mean, length = value, 1
        while blocks and blocks[-1][0] > mean:
            prev_mean, prev_length = blocks.pop()
            mean = (prev_mean * prev_length + mean * length) / (prev_length + length)
            length += prev_length
        blocks.append((mean, length))
    return [mean for mean, length in blocks for _ in range(length)]


class AutoDraft:
    """The per-step choice of chain depth (0 = no draft) of one generate call."""

    def __init__(self, max_depth: int, costs: StepCosts, history: DepthAcceptance | None = None):
        """history: the runtime's acceptance across calls (updated here too); None: this call's alone."""
        self.max_depth = max_depth
        self.costs = costs
        self.history = history
        self.estimate = history.carried() if history is not None else DepthAcceptance()
        self.steps = 0
        self.explore_every = EXPLORE_EVERY
        self.next_probe = EXPLORE_EVERY
        self.chosen: list[int] = []
        """Depth chosen at each step (for reports)."""

    def acceptance(self) -> list[float]:
        """Estimated P(depth d accepted | depth d-1 accepted), d = 1..K."""
        return self.estimate.rates(self.max_depth)

    def expected_tokens(self, k: int) -> float:
        """Tokens one step of a k-draft chain emits on average (the bonus token included)."""
        return self._expected_tokens()[k]

    def _expected_tokens(self) -> list[float]:
        """expected_tokens(k) for k = 0..K, from one estimate of the acceptance."""
        totals, alive = [1.0], 1.0
        for rate in self.acceptance():
            alive *= rate
            totals.append(totals[-1] + alive)
        return totals

    def choose(self, batch: int) -> int:
        """The chain depth of the next step."""
        self.steps += 1
        untried = [k for k in (*range(1, self.max_depth + 1), 0) if self.costs.step(batch, k) is None]
        if untried:
            k = untried[0]
        else:
            costs = non_decreasing([self.costs.step(batch, k) for k in range(self.max_depth + 1)])
            expected = self._expected_tokens()
            rates = {k: expected[k] / cost for k, cost in enumerate(costs)}
            k = max(rates, key=rates.get)
            if self.steps >= self.next_probe:
                k = self._probe(k, rates)
        self.chosen.append(k)
        return k

    def _probe(self, best: int, rates: dict[int, float]) -> int:
        """The better neighbour of the best depth; the next probe comes later and later while plain decoding wins."""
        self.explore_every = min(2 * self.explore_every, EXPLORE_MAX) if best == 0 else EXPLORE_EVERY
        self.next_probe = self.steps + self.explore_every
        neighbours = [k for k in (best - 1, best + 1) if 0 <= k <= self.max_depth]
        return max(neighbours, key=rates.get)

    def observe(self, depth: int, accepted: list[int]) -> None:
        """One verified step whose tree was a chain of `depth` drafts; accepted[b] drafts were kept in row b."""
        self.estimate.observe(depth, accepted)
        if self.history is not None:
            self.history.observe(depth, accepted)
