"""Acceptance-rate benchmark: plain decoding and each draft configuration on the same prompts, in one run.

    rt = mtp_runtime.load()
    report = run_bench(rt, default_prompts(8), sweep(["chain", "dynamic"], [1, 2, 3]), max_new_tokens=128)
    print(format_report(report))

Figures per configuration (all from the same run, prompts interleaved so that machine noise hits every
configuration alike, after one untimed warm-up generate per configuration):
  tau            1 + sum of the cumulative rates: tokens per verify forward that carried drafts (bonus included)
  tok/fwd        mean_accepted_length: new tokens / trunk forwards, the prefill counted as the first forward
  speedup        tokens/s of the configuration / tokens/s of plain decoding (wall time of generate calls)
  bound (free)   tau: the speedup if drafting and verification cost nothing beyond one plain step
  tau*step ratio tau * plain decode-step time / this configuration's decode-step time: the speedup that the
                 measured acceptance and measured step cost imply (prefill and per-call overhead excluded)

Modules: `configs` (what to run), `run` (running it), `hf` (transformers' generate on the same prompts),
`results` (the figures), `report` (text tables), `plot` (the figure image).
"""

from .configs import DEFAULT_DRAFTS, QUICK_DRAFTS, DraftConfig, sweep
from .hf import HF_MODES, compare_hf, load_hf_model
from .plot import plot_report
from .report import format_report, format_stats
from .results import BenchReport, ConfigResult, HFResult, PromptRun
from .run import WARMUP_TOKENS, machine_info, run_bench

__all__ = ["DEFAULT_DRAFTS", "QUICK_DRAFTS", "DraftConfig", "sweep", "HF_MODES", "compare_hf", "load_hf_model",
           "plot_report", "format_report", "format_stats", "BenchReport", "ConfigResult", "HFResult", "PromptRun",
           "WARMUP_TOKENS", "machine_info", "run_bench"]
