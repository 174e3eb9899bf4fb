"""The benchmark's figure: acceptance per depth per configuration, and speedup bars (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MTPRuntimeError
from .results import BenchReport

RATES_NOTE = ("solid o: conditional, P(depth d accepted | depth d-1 accepted);\n"
              "a deep depth reached rarely can read 1.00 beside a low cumulative rate\n"
              "dashed x: cumulative (vLLM), P(at least d drafts accepted); never rises")
JITTER = 0.05
"""Horizontal offset between configurations' points at one depth."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTPRuntimeError("plotting needs matplotlib; install it with: pip install 'mtp-runtime[plot]'") from None
    return plt


def check_plot_path(path: Path) -> None:
    """Raise MTPRuntimeError unless matplotlib is installed and can write the format `path`'s suffix names."""
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix and suffix not in formats:
        raise MTPRuntimeError(f"--plot {path}: matplotlib cannot write .{suffix} files; use one of "
                              f"{', '.join('.' + f for f in sorted(formats))}")


def plot_report(report: BenchReport, path) -> None:
    """Acceptance per depth per configuration (solid: conditional, dashed: cumulative) and speedup bars labelled
    with speedup, tau and tokens/s."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _plot_acceptance(left, report)
    _plot_speedup(right, report)
    fig.suptitle(f"{len(report.prompts)} prompts x {report.max_new_tokens} new tokens, "
                 f"{'greedy' if report.greedy else 'sampling'}, {report.machine.get('device')} "
                 f"{report.machine.get('dtype')}", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=120)
    except (OSError, ValueError) as exc:
        raise MTPRuntimeError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)


def _plot_acceptance(ax, report: BenchReport) -> None:
    depths = 1
    configs = report.drafting
    for i, r in enumerate(configs):
        s = r.stats
        shift = (i - (len(configs) - 1) / 2) * JITTER  # configurations side by side, so equal rates stay visible
        conditional = [v if n else float("nan") for v, n in zip(s.acceptance_per_depth, s.depth_attempts)]
        line, = ax.plot([d + shift for d in range(1, len(conditional) + 1)], conditional, marker="o", markersize=7,
                        label=f"{r.config.name} (tau {s.tau:.2f})")
        ax.plot([d + shift for d in range(1, len(s.cumulative_acceptance) + 1)], s.cumulative_acceptance,
                linestyle="--", marker="x", markersize=8, color=line.get_color())
        depths = max(depths, len(conditional))
    ax.set(xlabel="draft depth d", ylabel="acceptance rate", ylim=(-0.02, 1.12), xlim=(0.5, depths + 0.5),
           xticks=range(1, depths + 1), title="Acceptance per depth")
    ax.text(0.02, 0.02, RATES_NOTE, transform=ax.transAxes, fontsize=7, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})
    ax.legend(fontsize=8, loc="upper right")


def _plot_speedup(ax, report: BenchReport) -> None:
    import matplotlib.pyplot as plt

    bars = [(r.config.name, report.speedup(r.tokens_per_second), "tab:blue",
             f"{report.speedup(r.tokens_per_second):.2f}x\ntau {r.stats.tau:.2f}\n{r.tokens_per_second:.0f} tok/s")
            for r in report.results]
    bars += [(h.name, report.speedup(h.tokens_per_second), "tab:orange",
              f"{report.speedup(h.tokens_per_second):.2f}x\n{h.tokens_per_second:.0f} tok/s")
             for h in report.hf if not h.error]
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.bar_label(drawn, labels=[b[3] for b in bars], fontsize=7, padding=2)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylim(0, max([b[1] for b in bars] + [1.0]) * 1.3)
    ax.set(ylabel="speedup over plain decoding (tokens/s ratio)",
           title="Speedup, same run (label: speedup, tau, tokens/s)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
