"""Held-out next-token loss of a checkpoint on the training corpus's held-out files, on fixed windows.

    python benchmarks/held_out_loss.py [--model FOLDER] [--context 256] [--depth 3] [--windows 64]

The windows are drawn exactly as `mtp-runtime train` draws its evaluation windows (seed 12345, windows of
context + depth + 1 tokens from the held-out split tokenized with the model's tokenizer, the loss over the first
context + depth positions), so a model trained with other settings can be scored on the very windows another was
scored on: the old shipped model's 3.431 nats/token was measured with context 256 and depth 3 (its 3 MTP modules).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

import mtp_runtime
from mtp_runtime.model.plan import AttentionPlan
from mtp_runtime.prompts import training_corpus
from mtp_runtime.train import corpus


def held_out_ids(runtime) -> np.ndarray:
    roots, percent = training_corpus(runtime.path)
    roots = roots or corpus.default_corpus_roots()
    split = corpus.split_files(corpus.list_files(roots), roots, percent)
    return corpus.encode_files(runtime.tokenizer.backend_tokenizer, split.held_out)


def loss(runtime, ids: np.ndarray, context: int, depth: int, windows: int) -> float:
    length = context + depth + 1
    starts = np.random.default_rng(12345).integers(0, len(ids) - length, size=windows)
    batch = torch.from_numpy(np.stack([ids[s: s + length].astype(np.int64) for s in starts]))
    losses = []
    with torch.inference_mode():
        for chunk in batch.split(16):
            inputs = chunk[:, : context + depth]
            hidden = runtime.model.forward_trunk(inputs, AttentionPlan.causal(*inputs.shape))
            logits = runtime.model.logits(hidden)
            losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1: context + depth + 1].flatten()).item())
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()
    runtime = mtp_runtime.load(args.model, threads=1)
    torch.set_num_threads(1)
    value = loss(runtime, held_out_ids(runtime), args.context, args.depth, args.windows)
    print(f"{runtime.path}: held-out loss {value:.4f} nats/token (perplexity {math.exp(value):.2f}) on "
          f"{args.windows} windows of {args.context} + {args.depth} + 1 tokens")


if __name__ == "__main__":
    main()
