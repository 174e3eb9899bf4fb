"""Best-of-5 decoding speed of plain, chain and tree drafting on one prompt of the shipped model.

Timing minima resist the noise of a shared machine better than means, so this is the script for comparing two
checkouts of mtp-runtime (before/after a change), run alternately:

    for tree in old new; do PYTHONPATH=$tree python examples/decode_speed.py; done

Arguments (optional): a model folder (default: the shipped model) and the tokens per call (default 128).
"""

import sys
import time

import torch

import mtp_runtime

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
DRAFTS = {"plain": dict(draft="none"), "chain k=1": dict(draft="chain"), "tree 3,2,1": dict(draft="tree", tree="3,2,1")}


def best_tokens_per_second(runtime, ids, kwargs, new_tokens=128, repeats=5) -> float:
    runtime.generate(input_ids=ids, max_new_tokens=8, **kwargs)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.generate(input_ids=ids, max_new_tokens=new_tokens, ignore_eos=True, **kwargs)
        best = max(best, new_tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    torch.set_num_threads(1)
    runtime = mtp_runtime.load(sys.argv[1] if len(sys.argv) > 1 else None)
    new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    ids = runtime.encode(PROMPT)
    print("  ".join(f"{name}: {best_tokens_per_second(runtime, ids, kw, new_tokens):.1f} tok/s"
                    for name, kw in DRAFTS.items()))


if __name__ == "__main__":
    main()
