"""Stream a continuation as drafted tokens are accepted, then print the acceptance summary.

    python examples/stream.py [MODEL_FOLDER]      # default: the shipped model
"""

import sys

import mtp_runtime
from mtp_runtime.bench import format_stats

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def main() -> None:
    runtime = mtp_runtime.load(sys.argv[1] if len(sys.argv) > 1 else None)
    draft = "dynamic" if runtime.num_mtp_modules else "none"
    stream = runtime.generate(PROMPT, max_new_tokens=64, draft=draft, stream=True)
    print(PROMPT, end="", flush=True)
    for chunk in stream:  # one chunk per verify step: every token the step accepted, plus the bonus token
        print(chunk.text, end="", flush=True)
    result = stream.results[0]
    print(f"\n\n[{draft} drafting, {runtime.num_mtp_modules} MTP modules]")
    print(format_stats(result.stats, result.finish_reason))


if __name__ == "__main__":
    main()
