"""Self-distillation data: the trunk's own continuations of corpus prompts, greedy and sampled.

At inference the MTP modules draft on text the trunk itself writes. Distilling them on corpus text shows them a
different distribution (the old shipped model: 0.79 top-1 agreement on corpus windows, 0.61 acceptance on held-out
prompts). `generate_continuations` cuts prompts from the training split and lets the trunk continue each one, half
of them greedily and half by sampling, so that distillation trains on what drafting will see.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm


def generate_continuations(runtime, ids: np.ndarray, count: int, prompt_tokens: int, window: int, *, seed: int,
                           temperature: float, top_p: float = 0.95, batch_size: int = 32) -> np.ndarray:
    """[count, window] token windows: prompt_tokens corpus tokens, then the trunk's own continuation.

    Batches alternate between greedy decoding and sampling at `temperature` (nucleus `top_p`); plain decoding
    (no drafting) is used, so the windows are exactly the trunk's output.
    """
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - prompt_tokens, size=count)
    windows = np.zeros((count, window), dtype=np.int64)
    new_tokens = window - prompt_tokens
    with tqdm(total=count, desc="continuations", unit="window", leave=False) as bar:
        for first in range(0, count, batch_size):
            rows = range(first, min(first + batch_size, count))
            prompts = [ids[starts[r]: starts[r] + prompt_tokens].astype(np.int64).tolist() for r in rows]
            sampled = (first // batch_size) % 2 == 1
            results = runtime.generate(input_ids=prompts, max_new_tokens=new_tokens, draft="none", ignore_eos=True,
                                       temperature=temperature if sampled else 0.0, top_p=top_p if sampled else 1.0,
                                       seed=seed + first)
            for r, prompt, result in zip(rows, prompts, results):
                windows[r] = prompt + result.token_ids
            bar.update(len(prompts))
    return windows
