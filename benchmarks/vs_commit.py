"""Plain (or any fixed-draft) decoding speed of this checkout against an older checkout of mtp-runtime, same model.

    git worktree add ../old f13e93c
    python benchmarks/vs_commit.py ../old [--model FOLDER] [--prompts FILE] [--num-prompts 4] [--tokens 128] \
        [--draft MODE] [--compile [--compile-old]]

Both checkouts run in child processes of the same interpreter (PYTHONPATH selects the code), one torch thread
each, alternating for `--rounds` rounds so that both see the same load on a shared machine; each round decodes
every prompt once after one untimed warm-up call (with --compile, this checkout's steps are compiled; the
warm-up, which compiles, is reported apart). Reports tokens/s per round, the best round of each, their ratio,
and whether the two produced the same token ids (greedy decoding must).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import mtp_runtime
args = json.loads(sys.argv[1])
rt = mtp_runtime.load(args["model"], **({"compile": True} if args["compile"] else {}))
kwargs = dict(max_new_tokens=args["tokens"], ignore_eos=True, draft=args["draft"])
start = time.perf_counter()
rt.generate(input_ids=args["prompts"][0], **kwargs)
warmup, start, tokens = time.perf_counter() - start, time.perf_counter(), []
for ids in args["prompts"]:
    tokens.append(rt.generate(input_ids=ids, **kwargs).token_ids)
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": sum(map(len, tokens)) / seconds, "warmup_s": warmup, "tokens": tokens}))
"""


def prompt_ids(model: Path | None, prompts_file: Path | None, count: int) -> list[list[int]]:
    """Token ids of the bench's default prompts (or a --prompts file), tokenized by this checkout."""
    import mtp_runtime
    from mtp_runtime.prompts import default_prompts, load_prompts, training_corpus

    folder = model if model is not None else mtp_runtime.DEFAULT_MODEL
    if prompts_file is not None:
        texts = load_prompts(prompts_file)[:count]
    else:
        roots, percent = training_corpus(folder)
        texts = default_prompts(count, roots=roots, percent=percent)
    tokenizer = mtp_runtime.load(folder).tokenizer
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def run(checkout: Path, payload: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the older checkout (a git worktree)")
    parser.add_argument("--model", type=Path, help="model folder (default: this checkout's shipped model)")
    parser.add_argument("--prompts", type=Path, help="a prompts file (default: held-out corpus prompts)")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draft", default="none", help="a draft mode both checkouts know (default: none)")
    parser.add_argument("--compile", action="store_true", help="compile this checkout's steps (the old one: eager)")
    parser.add_argument("--compile-old", action="store_true", help="compile the old checkout's steps too (it must "
                        "have compiled steps: load(compile=True))")
    args = parser.parse_args(argv)
    import mtp_runtime

    model = str((args.model or mtp_runtime.DEFAULT_MODEL).resolve())
    payload = {"model": model, "prompts": prompt_ids(args.model, args.prompts, args.num_prompts),
               "tokens": args.tokens, "draft": args.draft, "compile": False}
    new_checkout = Path(__file__).resolve().parent.parent
    best = {"new": 0.0, "old": 0.0}
    outputs = {}
    for round_ in range(args.rounds):
        for name, checkout in (("old", args.old), ("new", new_checkout)):
            result = run(checkout, dict(payload, compile=args.compile and (name == "new" or args.compile_old)))
            best[name] = max(best[name], result["tokens_per_s"])
            outputs[name] = result["tokens"]
            print(f"round {round_ + 1}  {name:3s}  {result['tokens_per_s']:8.1f} tok/s  (warm-up call "
                  f"{result['warmup_s']:.1f} s)", flush=True)
    print(f"best: new {best['new']:.1f} tok/s, old {best['old']:.1f} tok/s, new / old {best['new'] / best['old']:.2f}x; "
          f"token ids identical: {outputs['new'] == outputs['old']}")


if __name__ == "__main__":
    main()
