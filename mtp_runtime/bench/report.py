"""Text reports: the benchmark's acceptance and speed tables, and one generation's acceptance summary."""

from __future__ import annotations

from ..stats import GenerationStats
from .results import BenchReport, ConfigResult

LEGEND = [
    "tau: tokens per verify forward that carried drafts (bonus token included) = 1 + the sum of the cumulative",
    "rates; tok/fwd: mean accepted length = new tokens / trunk forwards, the prefill counted; bound(free) = tau:",
    "the speedup if drafting and verification were free; tau*step = tau x plain step time / this step time;",
    "speedup: measured tokens/s over plain in this run; =plain: greedy token ids equal plain decoding's on every",
    "prompt.",
]


def format_report(report: BenchReport) -> str:
    """Two aligned tables: acceptance, then speed."""
    mode = "greedy" if report.greedy else f"sampling T={report.sampling['temperature']}"
    m = report.machine
    head = (f"{len(report.prompts)} prompts x {report.max_new_tokens} new tokens, {mode}, "
            f"{m['device']} {m['dtype']}, torch threads: {m['torch_threads']}"
            f"{'' if m.get('world_size', 1) == 1 else ', ranks: ' + str(m['world_size'])}")
    speed, notes = _speed_table(report)
    timed = report.compile_seconds_timed
    compiled = [f"compiled batch-1 steps: {report.compile_seconds:.1f} s compiling during warm-up"
                f"{f', {timed:.1f} s in timed calls (timed again)' if timed else ''}"] if m.get("compiled") else []
    auto = [f"{r.config.name} drafted per step: {_shares(r.stats.draft_sizes)}"
            for r in report.drafting if r.config.mode == "auto"]
    return "\n".join([head, *compiled, "", _table(_acceptance_table(report), left=6), "", _table(speed), *notes,
                      *auto, "", *LEGEND])


def _shares(counts) -> str:
    total = sum(counts.values())
    return "  ".join(f"{k}: {v / total:.0%}" for k, v in sorted(counts.items())) if total else "-"


def _acceptance_table(report: BenchReport) -> list[list[str]]:
    rows = [["config", "tau", "tok/fwd", "acceptance per depth", "cumulative (vLLM)",
             "accepted drafts/step histogram"]]
    for r in report.drafting:
        s = r.stats
        rows.append([r.config.name, f"{s.tau:.2f}", f"{s.mean_accepted_length:.2f}",
                     _rates(s.acceptance_per_depth, s.depth_attempts), _rates(s.cumulative_acceptance),
                     _histogram(s)])
    return rows


def _speed_table(report: BenchReport) -> tuple[list[list[str]], list[str]]:
    """Rows for our configurations then transformers' modes, and a note per failed transformers mode."""
    rows = [["config", "tok/s", "speedup", "step ms", "bound(free)", "tau*step", "draft", "verify", "commit",
             "other", "=plain"]]
    rows += [_speed_row(report, r) for r in report.results]
    notes = []
    for h in report.hf:
        if h.error:
            notes.append(f"{h.name} failed: {h.error}")
            rows.append([h.name, "failed", "-", "", "", "", "", "", "", "", "-"])
        else:
            rows.append([h.name, f"{h.tokens_per_second:.1f}", f"{report.speedup(h.tokens_per_second):.2f}x",
                         "", "", "", "", "", "", "", _yes_no(h.matches_ours)])
    return rows, notes


def _speed_row(report: BenchReport, r: ConfigResult) -> list[str]:
    shares = r.time_shares()
    return [r.config.name, f"{r.tokens_per_second:.1f}", f"{report.speedup(r.tokens_per_second):.2f}x",
            f"{r.step_time_s * 1e3:.1f}", f"{r.stats.tau:.2f}x", f"{report.implied_speedup(r):.2f}x",
            *(f"{shares[k]:.0%}" for k in shares), _yes_no(report.matches_plain(r))]


def format_stats(stats: GenerationStats, finish_reason: str | None = None) -> str:
    """A short human-readable acceptance summary of one generation (what `generate --stats` prints)."""
    s = stats
    verify = s.steps - 1 if s.steps else 0
    split = ", ".join(f"{k} {v / s.time_total:.0%}" if s.time_total > 0 else f"{k} -" for k, v in
                      (("draft", s.time_draft), ("verify", s.time_verify), ("commit", s.time_commit),
                       ("other", s.time_other)))
    finish = f" (finish: {finish_reason})" if finish_reason else ""
    if not s.draft_steps:  # plain decoding: no drafts, so no acceptance figures
        return "\n".join(f"{name:<14} {value}" for name, value in [
            ("steps", f"{s.steps} trunk forwards (1 prefill + {verify} plain decoding steps), nothing drafted"),
            ("new tokens", f"{s.new_tokens}{finish}"),
            ("mean accepted", f"{s.mean_accepted_length:.2f} tokens per trunk forward"),
            ("speed", f"{s.tokens_per_second:.1f} tokens/s over {s.time_total:.2f} s: {split}")])
    drafted = "" if s.draft_steps == verify else f", {s.draft_steps} of them with drafts"
    rows = [
        ("steps", f"{s.steps} trunk forwards (1 prefill + {verify} verify{drafted}), {s.drafted_tokens} drafted "
                  "tokens"),
        ("new tokens", f"{s.new_tokens}{finish}"),
        ("mean accepted", f"{s.mean_accepted_length:.2f} tokens per trunk forward (new tokens / steps, prefill "
                          "counted)"),
        ("tau", f"{s.tau:.2f} tokens per verify forward that drafted (bonus included) = 1 + sum(cumulative)"),
        ("acceptance", _counted_rates(s.acceptance_per_depth, s.depth_attempts)
         + "   P(depth d accepted | parent accepted), over n steps that drafted depth d under an accepted parent"),
        ("cumulative", _rates(s.cumulative_acceptance, label=True) + "   vLLM-style: P(at least d drafts accepted)"),
        ("accepted/step", _histogram(s) or "-"),
        ("speed", f"{s.tokens_per_second:.1f} tokens/s over {s.time_total:.2f} s: {split}"),
    ]
    return "\n".join(f"{name:<14} {value}" for name, value in rows)


def _counted_rates(values: list[float], attempts: list[int]) -> str:
    """Conditional rates with the attempts behind each: 'd1 0.50 (n=8)  d2 1.00 (n=2)'."""
    return "  ".join(f"d{i} {v:.2f} (n={n})" if n else f"d{i} - (n=0)"
                     for i, (v, n) in enumerate(zip(values, attempts), start=1)) or "-"


def _rates(values: list[float], attempts: list[int] | None = None, label: bool = False) -> str:
    """Rates to two decimals ('d1 0.50  d2 0.25' with label); '-' marks depths that were never attempted."""
    attempts = attempts if attempts is not None else [1] * len(values)
    cells = [(f"d{i} " if label else "") + (f"{v:.2f}" if n else "-")
             for i, (v, n) in enumerate(zip(values, attempts), start=1)]
    return ("  " if label else " ").join(cells) if cells else "-"


def _histogram(stats: GenerationStats) -> str:
    return " ".join(f"{k}:{v}" for k, v in stats.accepted_length_histogram.items())


def _yes_no(same: bool | None) -> str:
    return "-" if same is None else ("yes" if same else "NO")


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
