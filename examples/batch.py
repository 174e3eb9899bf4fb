"""Generate for a batch of prompts in one call and print each prompt's acceptance statistics.

    python examples/batch.py [MODEL_FOLDER]       # default: the shipped model
"""

import functools
import sys

import mtp_runtime
from mtp_runtime.stats import GenerationStats

PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "for i in range(10):\n",
]


def main() -> None:
    runtime = mtp_runtime.load(sys.argv[1] if len(sys.argv) > 1 else None)
    draft = "chain" if runtime.num_mtp_modules else "none"
    results = runtime.generate(PROMPTS, max_new_tokens=48, draft=draft, num_draft_tokens=3 if draft == "chain" else None)
    for i, (prompt, result) in enumerate(zip(PROMPTS, results)):
        s = result.stats
        depths = " ".join(f"{rate:.2f}" for rate in s.acceptance_per_depth) or "-"
        print(f"--- prompt {i}: {s.new_tokens} tokens in {s.steps} trunk forwards ({s.mean_accepted_length:.2f} per "
              f"forward, tau {s.tau:.2f} per verify), acceptance per depth {depths}, finish {result.finish_reason}")
        print(prompt + result.text)
    total = functools.reduce(GenerationStats.merge, (r.stats for r in results))
    print(f"=== batch of {len(PROMPTS)}, {draft} drafting: tau {total.tau:.2f}, cumulative "
          f"acceptance {[round(x, 2) for x in total.cumulative_acceptance]}, "
          f"histogram {total.accepted_length_histogram}")


if __name__ == "__main__":
    main()
