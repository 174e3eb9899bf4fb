"""Batched throughput: tokens/s of plain decoding and each draft configuration at several batch sizes.

Each batch size B runs one generate call over B prompts (the prompt list cycled) per configuration, after an
untimed warm-up call at that size; the configurations alternate within each size, so that machine noise hits
them alike. Speedup = the configuration's tokens/s over plain decoding's at the same B.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ..stats import tokens_per_second
from .configs import DraftConfig


@dataclass
class BatchPoint:
    """One configuration at one batch size."""

    config: str
    batch_size: int
    new_tokens: int
    wall_s: float
    mean_accepted_length: float

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.wall_s)


@dataclass
class BatchReport:
    max_new_tokens: int
    points: list[BatchPoint] = field(default_factory=list)

    def point(self, config: str, batch_size: int) -> BatchPoint:
        return next(p for p in self.points if p.config == config and p.batch_size == batch_size)

    def speedup(self, point: BatchPoint) -> float:
        plain = self.point("plain", point.batch_size).tokens_per_second
        return point.tokens_per_second / plain if plain > 0 else 0.0

    def to_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens,
                "points": [dict(config=p.config, batch_size=p.batch_size, new_tokens=p.new_tokens, wall_s=p.wall_s,
                                tokens_per_second=p.tokens_per_second, tok_per_forward=p.mean_accepted_length,
                                speedup=self.speedup(p)) for p in self.points]}

    def format(self) -> str:
        lines = [f"batched throughput ({self.max_new_tokens} new tokens per sequence)",
                 f"{'config':<22}{'batch':>6}{'tok/s':>10}{'tok/fwd':>9}{'speedup':>9}"]
        for p in self.points:
            lines.append(f"{p.config:<22}{p.batch_size:>6}{p.tokens_per_second:>10.1f}{p.mean_accepted_length:>9.2f}"
                         f"{self.speedup(p):>8.2f}x")
        return "\n".join(lines)


def run_batch_sweep(runtime, prompts: list[list[int]], configs: list[DraftConfig], batch_sizes: list[int],
                    max_new_tokens: int, sampling: dict | None = None, progress: bool = False) -> BatchReport:
    """Plain decoding and every configuration at every batch size, eos ignored; sampling holds temperature, top_k,
    top_p and seed (greedy when absent)."""
    from tqdm import tqdm

    configs = [DraftConfig("none"), *(c for c in configs if c.mode != "none")]
    report = BatchReport(max_new_tokens)
    with tqdm(total=len(batch_sizes) * len(configs), desc="batch", unit="run", file=sys.stderr,
              disable=not progress, leave=True) as bar:
        for size in batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(size)]
            for config in configs:
                kwargs = dict(ignore_eos=True, **(sampling or {}), **config.generate_kwargs())
                runtime.generate(input_ids=batch, max_new_tokens=4, **kwargs)
                start = time.perf_counter()
                results = runtime.generate(input_ids=batch, max_new_tokens=max_new_tokens, **kwargs)
                wall = time.perf_counter() - start
                tokens = sum(len(r.token_ids) for r in results)
                steps = sum(r.stats.steps for r in results)  # forwards each row took part in, prefill included
                report.points.append(BatchPoint(config.name, size, tokens, wall, tokens / steps))
                bar.update()
    return report
