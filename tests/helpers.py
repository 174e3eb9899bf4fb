"""What several test files share (fixtures built from these live in conftest.py): the tiny tokenized checkpoint, the
shipped model's folder, running the CLI, and the consistency checks of one generation's statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import mtp_runtime
from builders import build_mostly_right
from mtp_runtime.cli import main
from mtp_runtime.stats import GenerationStats
from mtp_runtime.train.corpus import train_tokenizer

SNIPPETS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
            "class Point:\n    def __init__(self, x, y):\n        self.x = x\n", "import os\nimport sys\n"]


def shipped_model() -> Path:
    """The shipped default model's folder."""
    return mtp_runtime.DEFAULT_MODEL


def make_tiny(folder: Path) -> Path:
    """A tiny DeepSeek-V3 folder (512 positions) with 2 mostly-accepted MTP modules and a byte-level BPE tokenizer
    trained on SNIPPETS."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "snippets.txt"
    text.write_text("\n".join(SNIPPETS * 4), encoding="utf-8")
    tokenizer = train_tokenizer([text], 300, folder / "tokenizer.json")
    text.unlink()
    return build_mostly_right(folder, vocab=tokenizer.get_vocab_size(), num_mtp=2, seed=3)


def run_cli(*args, input=None):
    """`mtp-runtime ARGS...` in this process (click's test runner); stdout and stderr kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input, prog_name="mtp-runtime")


def assert_one_line_error(result, *fragments, exit_code: int = 1) -> str:
    """The command failed with one 'error: ...' line on stderr holding every fragment, and no traceback."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def check_stats(stats: GenerationStats | dict, *, prefills: int = 1, drafted: bool = True,
                nodes_per_step: int | None = None) -> None:
    """The figures of one generation's statistics (or of `prefills` sequences merged) agree with one another.

    drafted: every verify step carried drafts (False: plain decoding, or auto steps that drafted nothing);
    nodes_per_step: the drafted nodes every verify step carried."""
    s = stats.to_dict() if isinstance(stats, GenerationStats) else stats
    assert s["steps"] > 0
    assert s["mean_accepted_length"] == pytest.approx(s["new_tokens"] / s["steps"])
    assert all(0.0 <= r <= 1.0 for r in s["acceptance_per_depth"] + s["cumulative_acceptance"])
    cumulative = s["cumulative_acceptance"]
    assert all(a >= b for a, b in zip(cumulative, cumulative[1:]))  # P(at least d accepted) never rises
    assert s["tau"] == pytest.approx(1 + sum(cumulative))
    hist = {int(k): v for k, v in s["accepted_length_histogram"].items()}
    if drafted:
        draft_steps = sum(hist.values())
        assert draft_steps == s["steps"] - prefills  # every verify step drafted
        # each prefill emits one token, each verify step its accepted drafts and a bonus; a last step may be cut
        emitted = prefills + sum((k + 1) * v for k, v in hist.items())
        assert s["new_tokens"] <= emitted <= s["new_tokens"] + prefills * max(hist, default=0)
        if draft_steps:
            # tau = 1 + the sum of the cumulative rates, over the verify steps
            assert sum((k + 1) * v for k, v in hist.items()) / draft_steps == pytest.approx(1 + sum(cumulative))
            assert cumulative == pytest.approx([sum(c for k, c in hist.items() if k >= d) / draft_steps
                                                for d in range(1, len(cumulative) + 1)])
        if nodes_per_step is not None:
            assert s["drafted_tokens"] == nodes_per_step * draft_steps
    times = s["time_s"]
    assert times["draft"] + times["verify"] + times["commit"] + times["other"] == pytest.approx(times["total"])
