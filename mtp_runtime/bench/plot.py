"""The benchmark's figure: acceptance per depth per configuration, and speedup bars (needs matplotlib)."""

from __future__ import annotations

from ..errors import MTPRuntimeError
from .results import BenchReport


def plot_report(report: BenchReport, path) -> None:
    """Acceptance per depth per configuration (solid: conditional, dashed: cumulative) and speedup bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTPRuntimeError("plotting needs matplotlib; install it with: pip install 'mtp-runtime[plot]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_acceptance(left, report)
    _plot_speedup(right, report)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=120)
    except OSError as exc:
        raise MTPRuntimeError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)


def _plot_acceptance(ax, report: BenchReport) -> None:
    depths = 1
    for r in report.drafting:
        s = r.stats
        conditional = [v if n else float("nan") for v, n in zip(s.acceptance_per_depth, s.depth_attempts)]
        line, = ax.plot(range(1, len(conditional) + 1), conditional, marker="o", label=r.config.name)
        ax.plot(range(1, len(s.cumulative_acceptance) + 1), s.cumulative_acceptance, linestyle="--",
                color=line.get_color())
        depths = max(depths, len(conditional))
    ax.set(xlabel="draft depth", ylabel="acceptance rate", ylim=(-0.02, 1.02), xticks=range(1, depths + 1),
           title="Acceptance per depth\n(solid: given the parent was accepted; dashed: cumulative, vLLM-style)")
    ax.legend(fontsize=8)


def _plot_speedup(ax, report: BenchReport) -> None:
    import matplotlib.pyplot as plt

    bars = [(r.config.name, report.speedup(r.tokens_per_second), "tab:blue") for r in report.results]
    bars += [(h.name, report.speedup(h.tokens_per_second), "tab:orange") for h in report.hf if not h.error]
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(ylabel="speedup over plain decoding", title="Speedup (tokens/s ratio, same run)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
