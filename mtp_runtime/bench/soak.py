"""Soak test: many generate calls on one runtime, sampling the process's resident memory (RSS) as they go.

Calls cycle through the draft configurations and prompts. Every FILL_EVERY-th call generates up to the model's
maximum positions (the whole cache), every ABANDON_EVERY-th is a stream dropped after its first chunk; the rest
generate max_new_tokens. A runtime that keeps nothing between calls shows flat RSS after the first few calls.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from dataclasses import dataclass, field

from .configs import DraftConfig

FILL_EVERY = 10
ABANDON_EVERY = 5
SAMPLES = 8


@dataclass
class SoakReport:
    calls: int
    rss_mb: list[tuple[int, float]] = field(default_factory=list)
    """(calls done, resident memory in MiB) samples; the first after call 1."""
    peak_rss_mb: float = 0.0
    new_tokens: int = 0

    @property
    def growth_mb(self) -> float:
        """RSS at the end minus RSS after the first call that filled the cache (the steady state)."""
        after_fill = next((mb for done, mb in self.rss_mb if done >= FILL_EVERY), self.rss_mb[0][1])
        return self.rss_mb[-1][1] - after_fill

    def to_dict(self) -> dict:
        return {"calls": self.calls, "rss_mb": self.rss_mb, "peak_rss_mb": self.peak_rss_mb,
                "growth_mb_after_first_fill": self.growth_mb, "new_tokens": self.new_tokens}

    def format(self) -> str:
        samples = ", ".join(f"{done}: {mb:.1f}" for done, mb in self.rss_mb)
        return (f"soak: {self.calls} calls, {self.new_tokens} tokens; RSS MiB after calls {{{samples}}}; "
                f"peak {self.peak_rss_mb:.1f} MiB; growth since call {FILL_EVERY}: {self.growth_mb:+.1f} MiB")


def resident_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_mb()


def peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_soak(runtime, prompts: list[list[int]], configs: list[DraftConfig], calls: int, max_new_tokens: int,
             sampling: dict | None = None, progress: bool = False) -> SoakReport:
    """`calls` generate calls on `runtime` (call i seeded with i); RSS sampled SAMPLES times."""
    from tqdm import tqdm

    report = SoakReport(calls)
    every = max(1, calls // SAMPLES)
    limit = runtime.config.max_position_embeddings
    for i in tqdm(range(calls), desc="soak", unit="call", file=sys.stderr, disable=not progress, leave=True):
        prompt, config = prompts[i % len(prompts)], configs[i % len(configs)]
        kwargs = dict(sampling or {}, input_ids=prompt, ignore_eos=True, seed=i, **config.generate_kwargs())
        if i % FILL_EVERY == FILL_EVERY - 1:
            report.new_tokens += len(runtime.generate(max_new_tokens=limit - len(prompt), **kwargs).token_ids)
        elif i % ABANDON_EVERY == ABANDON_EVERY - 1:
            report.new_tokens += len(next(iter(runtime.generate(max_new_tokens=max_new_tokens, stream=True,
                                                                **kwargs))).token_ids)
        else:
            report.new_tokens += len(runtime.generate(max_new_tokens=max_new_tokens, **kwargs).token_ids)
        if i == 0 or (i + 1) % every == 0 or i + 1 == calls:
            gc.collect()
            report.rss_mb.append((i + 1, resident_mb()))
    report.peak_rss_mb = max(peak_mb(), *(mb for _, mb in report.rss_mb))
    return report
