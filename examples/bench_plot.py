"""A small acceptance benchmark through the Python API, printed as a table and drawn to a PNG (needs matplotlib).

    python examples/bench_plot.py [MODEL_FOLDER] [OUT.png]     # defaults: the shipped model, bench.png
"""

import sys
from pathlib import Path

import mtp_runtime
from mtp_runtime import bench
from mtp_runtime.prompts import default_prompts, training_corpus


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("bench.png")
    runtime = mtp_runtime.load(model)
    roots, percent = training_corpus(runtime.path)  # prompts from files the model never trained on
    prompts = default_prompts(2, roots=roots, percent=percent)
    configs = bench.sweep(["chain", "dynamic"], num_draft_tokens=[2, 4])
    report = bench.run_bench(runtime, prompts, configs, max_new_tokens=32, progress=True)
    print(bench.format_report(report))
    bench.plot_report(report, out)
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
