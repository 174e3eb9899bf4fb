"""The example scripts run end to end, as a user would run them, on the trained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import shipped_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")  # one thread: the test machine may be shared
    done = subprocess.run([sys.executable, str(EXAMPLES / name), str(shipped_model()), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_stream_example():
    out = run_example("stream.py").stdout
    assert out.startswith("def fibonacci(n):")
    for label in ("mean accepted", "acceptance", "cumulative", "tokens/s"):
        assert label in out


def test_decode_speed_example():
    out = run_example("decode_speed.py", 16).stdout
    assert [part.split(":")[0] for part in out.strip().split("  ")] == ["plain", "chain k=1", "tree 3,2,1"]
    assert all(float(part.split(":")[1].split()[0]) > 0 for part in out.strip().split("  "))


def test_batch_example():
    out = run_example("batch.py").stdout
    assert out.count("--- prompt") == 4
    assert "=== batch of 4" in out and "tau" in out


@pytest.mark.slow
def test_bench_plot_example(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    out = run_example("bench_plot.py", plot).stdout
    assert "plain" in out and "chain k=2" in out and "dynamic n=4" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
