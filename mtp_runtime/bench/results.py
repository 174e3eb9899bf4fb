"""A benchmark's measurements and the figures derived from them: speedup, bounds, time shares, JSON."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..stats import GenerationStats, tokens_per_second
from .configs import DraftConfig


@dataclass
class PromptRun:
    """One generate call of one configuration on one prompt."""

    stats: GenerationStats
    wall_s: float
    token_ids: list[int]


@dataclass
class ConfigResult:
    """Every prompt's run of one configuration."""

    config: DraftConfig
    runs: list[PromptRun] = field(default_factory=list)

    @property
    def stats(self) -> GenerationStats:
        return functools.reduce(GenerationStats.merge, (r.stats for r in self.runs), GenerationStats())

    @property
    def wall_s(self) -> float:
        return sum(r.wall_s for r in self.runs)

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(sum(len(r.token_ids) for r in self.runs), self.wall_s)

    @property
    def step_time_s(self) -> float:
        """Mean time of one decode step (draft + verify + commit), prefill excluded."""
        s = self.stats
        steps = s.steps - len(self.runs)
        return (s.time_draft + s.time_verify + s.time_commit) / steps if steps > 0 else 0.0

    def time_shares(self) -> dict[str, float]:
        s = self.stats
        parts = {"draft": s.time_draft, "verify": s.time_verify, "commit": s.time_commit, "other": s.time_other}
        return {k: v / s.time_total if s.time_total > 0 else 0.0 for k, v in parts.items()}


@dataclass
class HFResult:
    """transformers' own generate on the same weights and prompts."""

    name: str
    wall_s: float = 0.0
    new_tokens: int = 0
    matches_ours: bool | None = None
    """Greedy token ids equal our plain greedy ids on every prompt (None under sampling or on error)."""
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.wall_s)


@dataclass
class BenchReport:
    """Every configuration's results on the same prompts, with the machine they ran on."""

    prompts: list[str]
    prompt_token_ids: list[list[int]]
    max_new_tokens: int
    sampling: dict
    results: list[ConfigResult]
    machine: dict
    hf: list[HFResult] = field(default_factory=list)
    compile_seconds: float = 0.0
    """Compiling step shapes during the warm-up (compiled runs only); not part of any timing."""
    compile_seconds_timed: float = 0.0
    """Compiling that still happened inside timed runs (a shape the warm-up missed): it is in their times."""

    @property
    def plain(self) -> ConfigResult:
        return next(r for r in self.results if r.config.mode == "none")

    @property
    def drafting(self) -> list[ConfigResult]:
        """The configurations other than plain decoding."""
        return [r for r in self.results if r.config.mode != "none"]

    @property
    def greedy(self) -> bool:
        return self.sampling.get("temperature", 0.0) == 0

    def speedup(self, tokens_per_second: float) -> float:
        base = self.plain.tokens_per_second
        return tokens_per_second / base if base > 0 else 0.0

    def implied_speedup(self, result: ConfigResult) -> float:
        """tau * plain decode-step time / this configuration's decode-step time."""
        step = result.step_time_s
        return result.stats.tau * self.plain.step_time_s / step if step > 0 else 0.0

    def matches_plain(self, result: ConfigResult) -> bool | None:
        if not self.greedy:
            return None
        return all(a.token_ids == b.token_ids for a, b in zip(result.runs, self.plain.runs))

    def to_dict(self) -> dict:
        prompts = [{"text": t, "num_tokens": len(ids)} for t, ids in zip(self.prompts, self.prompt_token_ids)]
        return {"machine": self.machine, "max_new_tokens": self.max_new_tokens, "sampling": self.sampling,
                "compile_seconds": self.compile_seconds, "compile_seconds_timed": self.compile_seconds_timed,
                "prompts": prompts, "configs": [self._config_dict(r) for r in self.results],
                "hf": [self._hf_dict(h) for h in self.hf]}

    def _config_dict(self, r: ConfigResult) -> dict:
        return {
            "name": r.config.name, "draft": r.config.mode, **r.config.knobs(),
            "stats": r.stats.to_dict(), "wall_s": r.wall_s, "tokens_per_second": r.tokens_per_second,
            "speedup": self.speedup(r.tokens_per_second), "bound_free_drafting": r.stats.tau,
            "implied_speedup": self.implied_speedup(r), "decode_step_s": r.step_time_s,
            "time_shares": r.time_shares(), "matches_plain": self.matches_plain(r),
            "per_prompt": [dict(run.stats.to_dict(), prompt=i, wall_s=run.wall_s, token_ids=run.token_ids)
                           for i, run in enumerate(r.runs)],
        }

    def _hf_dict(self, h: HFResult) -> dict:
        return {"name": h.name, "wall_s": h.wall_s, "new_tokens": h.new_tokens,
                "tokens_per_second": h.tokens_per_second, "speedup": self.speedup(h.tokens_per_second),
                "matches_ours": h.matches_ours, "error": h.error}
