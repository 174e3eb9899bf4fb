"""Acceptance-rate benchmark: plain decoding and each draft configuration on the same prompts, in one run.

    rt = mtp_runtime.load()
    report = run_bench(rt, default_prompts(8), sweep(["chain", "dynamic"], [1, 2, 3]), max_new_tokens=128)
    print(format_report(report))

Figures per configuration (all from the same run, prompts interleaved so that machine noise hits every
configuration alike, after one untimed warm-up generate per configuration):
  tau            mean accepted length: tokens emitted per trunk forward (bonus token included, prefill counted)
  speedup        tokens/s of the configuration / tokens/s of plain decoding (wall time of generate calls)
  bound (free)   tau: the speedup if drafting and verification cost nothing beyond one plain step
  tau*step ratio tau * plain decode-step time / this configuration's decode-step time: the speedup that the
                 measured acceptance and measured step cost imply (prefill and per-call overhead excluded)
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field

from .errors import GenerationSettingsError, MTPRuntimeError
from .params import DraftParams
from .stats import GenerationStats

DEFAULT_DRAFTS = ("chain", "tree", "dynamic")
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class DraftConfig:
    """One configuration of a sweep; mode 'none' is the plain-decoding baseline."""

    mode: str
    num_draft_tokens: int | None = None
    tree: str | None = None
    depth: int | None = None
    topk: int | None = None

    @functools.cached_property
    def params(self) -> DraftParams:
        return DraftParams.build(self.mode, self.num_draft_tokens, self.tree, self.depth, self.topk)

    @property
    def name(self) -> str:
        p = self.params
        if p.mode == "none":
            return "plain"
        if p.mode == "chain":
            return f"chain k={p.num_draft_tokens}"
        if p.mode == "tree":
            spec = self.tree if self.tree and not self.tree.lstrip().startswith("[") else None
            return f"tree {spec}" if spec else f"tree {p.tree.num_nodes - 1} nodes"
        return f"dynamic n={p.num_draft_tokens} d={p.depth} k={p.topk}"

    def generate_kwargs(self) -> dict:
        return {"draft": self.mode, "num_draft_tokens": self.num_draft_tokens, "tree": self.tree,
                "depth": self.depth, "topk": self.topk}


def sweep(drafts=DEFAULT_DRAFTS, num_draft_tokens: list[int] | None = None, trees: list[str] | None = None,
          depth: int | None = None, topk: int | None = None) -> list[DraftConfig]:
    """Plain decoding first, then every requested mode x num_draft_tokens (chain, dynamic) or tree shape."""
    drafts = list(dict.fromkeys(drafts))
    if trees and "tree" not in drafts:
        raise GenerationSettingsError("a tree shape was given but no --draft tree is benchmarked; add --draft tree")
    configs = [DraftConfig("none")]
    for mode in drafts:
        if mode == "none":
            continue
        if mode == "tree":
            configs += [DraftConfig("tree", tree=spec) for spec in trees or ["3,2,1"]]
        elif mode == "dynamic":
            configs += [DraftConfig(mode, n, depth=depth, topk=topk) for n in num_draft_tokens or [None]]
        else:
            configs += [DraftConfig(mode, n) for n in num_draft_tokens or [None]]
    for config in configs:
        config.params  # validate every configuration before anything runs
    return configs


@dataclass
class PromptRun:
    """One generate call of one configuration on one prompt."""

    stats: GenerationStats
    wall_s: float
    token_ids: list[int]


@dataclass
class ConfigResult:
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
        wall = self.wall_s
        return sum(len(r.token_ids) for r in self.runs) / wall if wall > 0 else 0.0

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
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class BenchReport:
    prompts: list[str]
    prompt_token_ids: list[list[int]]
    max_new_tokens: int
    sampling: dict
    results: list[ConfigResult]
    machine: dict
    hf: list[HFResult] = field(default_factory=list)

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
        return result.stats.mean_accepted_length * self.plain.step_time_s / step if step > 0 else 0.0

    def matches_plain(self, result: ConfigResult) -> bool | None:
        if not self.greedy:
            return None
        return all(a.token_ids == b.token_ids for a, b in zip(result.runs, self.plain.runs))

    def to_dict(self) -> dict:
        configs = []
        for r in self.results:
            p = r.config.params
            configs.append({
                "name": r.config.name, "draft": p.mode, "num_draft_tokens": p.num_draft_tokens,
                "tree": r.config.tree, "depth": p.depth, "topk": p.topk,
                "stats": r.stats.to_dict(), "wall_s": r.wall_s, "tokens_per_second": r.tokens_per_second,
                "speedup": self.speedup(r.tokens_per_second), "bound_free_drafting": r.stats.mean_accepted_length,
                "implied_speedup": self.implied_speedup(r), "decode_step_s": r.step_time_s,
                "time_shares": r.time_shares(), "matches_plain": self.matches_plain(r),
                "per_prompt": [dict(run.stats.to_dict(), prompt=i, wall_s=run.wall_s, token_ids=run.token_ids)
                               for i, run in enumerate(r.runs)],
            })
        hf = [{"name": h.name, "wall_s": h.wall_s, "new_tokens": h.new_tokens,
               "tokens_per_second": h.tokens_per_second, "speedup": self.speedup(h.tokens_per_second),
               "matches_ours": h.matches_ours, "error": h.error} for h in self.hf]
        prompts = [{"text": t, "num_tokens": len(ids)} for t, ids in zip(self.prompts, self.prompt_token_ids)]
        return {"machine": self.machine, "max_new_tokens": self.max_new_tokens, "sampling": self.sampling,
                "prompts": prompts, "configs": configs, "hf": hf}


def run_bench(runtime, prompts: list[str], configs: list[DraftConfig], *, max_new_tokens: int = 128,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = True,
              warmup: bool = True, progress: bool = False) -> BenchReport:
    """Run every configuration on every prompt (prompt i sampled with seed + i in each configuration)."""
    from tqdm import tqdm

    if not prompts:
        raise MTPRuntimeError("no prompts to benchmark")
    if not any(c.mode == "none" for c in configs):
        configs = [DraftConfig("none"), *configs]
    ids = [runtime.encode(p) for p in prompts]
    common = dict(temperature=temperature, top_k=top_k, top_p=top_p, ignore_eos=ignore_eos)
    if warmup:
        for config in configs:
            runtime.generate(input_ids=ids[0], max_new_tokens=min(WARMUP_TOKENS, max_new_tokens), seed=seed,
                             **common, **config.generate_kwargs())
    results = [ConfigResult(c) for c in configs]
    with tqdm(total=len(ids) * len(configs), desc="bench", unit="run", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for i, prompt in enumerate(ids):
            for result in results:
                bar.set_postfix_str(f"prompt {i + 1} {result.config.name}")
                start = time.perf_counter()
                out = runtime.generate(input_ids=prompt, max_new_tokens=max_new_tokens, seed=seed + i, **common,
                                       **result.config.generate_kwargs())
                result.runs.append(PromptRun(out.stats, time.perf_counter() - start, out.token_ids))
                bar.update()
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
    return BenchReport(list(prompts), ids, max_new_tokens, sampling, results, machine_info(runtime))


def machine_info(runtime) -> dict:
    import os
    import platform

    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(runtime.device),
            "dtype": str(runtime.model.lm_head.weight.dtype).removeprefix("torch."),
            "model": str(runtime.path) if runtime.path is not None else None}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


# transformers' generate: plain greedy, prompt-lookup speculation, and its own MTP speculation
HF_MODES = (("hf greedy", {}), ("hf prompt-lookup 3", {"prompt_lookup_num_tokens": 3}), ("hf mtp", {"use_mtp": True}))


def compare_hf(runtime, report: BenchReport, progress: bool = False) -> list[HFResult]:
    """Time transformers' generate modes on the report's prompts, each producing as many tokens as ours did."""
    from tqdm import tqdm

    model = load_hf_model(runtime.path, runtime.device)
    ours = [run.token_ids for run in report.plain.runs]
    results = []
    with tqdm(total=len(HF_MODES) * len(ours), desc="transformers", unit="run", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for name, kwargs in HF_MODES:
            result = HFResult(name)
            try:
                _hf_generate(model, report.prompt_token_ids[0], min(WARMUP_TOKENS, len(ours[0]) or 1), kwargs)
                matches = True
                for prompt, target in zip(report.prompt_token_ids, ours):
                    start = time.perf_counter()
                    tokens = _hf_generate(model, prompt, len(target), kwargs) if target else []
                    result.wall_s += time.perf_counter() - start
                    result.new_tokens += len(tokens)
                    matches = matches and tokens == target
                    bar.update()
                result.matches_ours = matches if report.greedy else None
            except Exception as exc:  # report transformers' failure in the table instead of crashing the benchmark
                result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            results.append(result)
    report.hf = results
    return results


def load_hf_model(folder, device):
    """transformers' DeepseekV3ForCausalLM (float32) with its MTP layer patterns pointed at this checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if folder is None:
        raise MTPRuntimeError("--compare-hf needs a runtime loaded from a folder")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    n = model.config.num_hidden_layers
    depth = getattr(model.config, "num_mtp_layers", 0) or 0
    if depth:
        model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n + k}\..*" for k in range(depth)]
    model.generation_config.eos_token_id = None  # fixed-length runs, like ours with ignore_eos
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model


def _hf_generate(model, prompt: list[int], new_tokens: int, kwargs: dict) -> list[int]:
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


def format_report(report: BenchReport) -> str:
    """Two aligned tables: acceptance, then speed."""
    mode = "greedy" if report.greedy else f"sampling T={report.sampling['temperature']}"
    m = report.machine
    head = (f"{len(report.prompts)} prompts x {report.max_new_tokens} new tokens, {mode}, "
            f"{m['device']} {m['dtype']}, torch threads: {m['torch_threads']}")
    acceptance = [["config", "tau", "acceptance per depth", "cumulative (vLLM)", "accepted drafts/step histogram"]]
    for r in report.drafting:
        s = r.stats
        hist = " ".join(f"{k}:{v}" for k, v in s.accepted_length_histogram.items())
        acceptance.append([r.config.name, f"{s.mean_accepted_length:.2f}", _rates(s.acceptance_per_depth, s),
                           _rates(s.cumulative_acceptance), hist])
    speed = [["config", "tok/s", "speedup", "step ms", "bound(free)", "tau*step", "draft", "verify", "commit",
              "other", "=plain"]]
    for r in report.results:
        shares = r.time_shares()
        same = report.matches_plain(r)
        speed.append([r.config.name, f"{r.tokens_per_second:.1f}", f"{report.speedup(r.tokens_per_second):.2f}x",
                      f"{r.step_time_s * 1e3:.1f}", f"{r.stats.mean_accepted_length:.2f}x",
                      f"{report.implied_speedup(r):.2f}x", *(f"{shares[k]:.0%}" for k in shares),
                      "-" if same is None else ("yes" if same else "NO")])
    notes = []
    for h in report.hf:
        same = "-" if h.matches_ours is None else ("yes" if h.matches_ours else "NO")
        if h.error:
            notes.append(f"{h.name} failed: {h.error}")
            speed.append([h.name, "failed", "-", "", "", "", "", "", "", "", "-"])
        else:
            speed.append([h.name, f"{h.tokens_per_second:.1f}", f"{report.speedup(h.tokens_per_second):.2f}x",
                          "", "", "", "", "", "", "", same])
    legend = ["tau: tokens per trunk forward (bonus token included); bound(free) = tau: the speedup if drafting and",
              "verification were free; tau*step = tau x plain step time / this step time; speedup: measured tokens/s",
              "over plain in this run; =plain: greedy token ids equal plain decoding's on every prompt."]
    return "\n".join([head, "", _table(acceptance, left=5), "", _table(speed), *notes, "", *legend])


def format_stats(stats: GenerationStats, finish_reason: str | None = None) -> str:
    """A short human-readable acceptance summary of one generation (what `generate --stats` prints)."""
    s = stats
    verify = s.steps - 1 if s.steps else 0
    split = ", ".join(f"{k} {v / s.time_total:.0%}" if s.time_total > 0 else f"{k} -" for k, v in
                      (("draft", s.time_draft), ("verify", s.time_verify), ("commit", s.time_commit),
                       ("other", s.time_other)))
    finish = f" (finish: {finish_reason})" if finish_reason else ""
    rows = [
        ("steps", f"{s.steps} trunk forwards (1 prefill + {verify} verify), {s.drafted_tokens} drafted tokens"),
        ("new tokens", f"{s.new_tokens}{finish}"),
        ("mean accepted", f"{s.mean_accepted_length:.2f} tokens per trunk forward (tau)"),
        ("acceptance", _depths(s.acceptance_per_depth, s.depth_attempts) + "   P(depth d accepted | parent accepted)"),
        ("cumulative", _depths(s.cumulative_acceptance) + "   vLLM-style: P(at least d drafts accepted)"),
        ("accepted/step", " ".join(f"{k}:{v}" for k, v in s.accepted_length_histogram.items()) or "-"),
        ("speed", f"{s.tokens_per_second:.1f} tokens/s over {s.time_total:.2f} s: {split}"),
    ]
    return "\n".join(f"{name:<14} {value}" for name, value in rows)


def _depths(values: list[float], attempts: list[int] | None = None) -> str:
    attempts = attempts if attempts is not None else [1] * len(values)
    cells = [f"d{i} {v:.2f}" if n else f"d{i} -" for i, (v, n) in enumerate(zip(values, attempts), start=1)]
    return "  ".join(cells) if cells else "-"


def _rates(values: list[float], stats: GenerationStats | None = None) -> str:
    """Rates to two decimals; with stats, '-' marks per-depth rates whose depth was never attempted."""
    attempts = stats.depth_attempts if stats is not None else [1] * len(values)
    return " ".join(f"{v:.2f}" if n else "-" for v, n in zip(values, attempts)) if values else "-"


def _table(rows: list[list[str]], left: int = 1) -> str:
    """Aligned columns: the first `left` columns left-aligned, the others right-aligned; a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_report(report: BenchReport, path) -> None:
    """Acceptance per depth per configuration (solid: conditional, dashed: cumulative) and speedup bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTPRuntimeError("plotting needs matplotlib; install it with: pip install 'mtp-runtime[plot]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    depths = 1
    for r in report.drafting:
        s = r.stats
        conditional = [v if n else float("nan") for v, n in zip(s.acceptance_per_depth, s.depth_attempts)]
        line, = left.plot(range(1, len(conditional) + 1), conditional, marker="o", label=r.config.name)
        left.plot(range(1, len(s.cumulative_acceptance) + 1), s.cumulative_acceptance, linestyle="--",
                  color=line.get_color())
        depths = max(depths, len(conditional))
    left.set(xlabel="draft depth", ylabel="acceptance rate", ylim=(-0.02, 1.02), xticks=range(1, depths + 1),
             title="Acceptance per depth\n(solid: given the parent was accepted; dashed: cumulative, vLLM-style)")
    left.legend(fontsize=8)
    bars = [(r.config.name, report.speedup(r.tokens_per_second), "tab:blue") for r in report.results]
    bars += [(h.name, report.speedup(h.tokens_per_second), "tab:orange") for h in report.hf if not h.error]
    right.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(ylabel="speedup over plain decoding", title="Speedup (tokens/s ratio, same run)")
    plt.setp(right.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=120)
    except OSError as exc:
        raise MTPRuntimeError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)
