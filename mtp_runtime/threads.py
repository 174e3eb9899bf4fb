"""The torch CPU thread count a runtime decodes with: the fastest one measured for its model on this machine.

Small models gain nothing from intra-op threads, and on a busy machine extra threads spin waiting for cores that
are not free: with torch's default of one thread per core, the shipped model decoded 10-120x slower on a shared
2-core machine than with one thread. So unless told otherwise, a CPU runtime decodes a small model with one thread,
times a few one-token trunk steps of a mid-sized one with one thread and with one per core and keeps the faster,
and gives a large model (whose matmuls are compute-bound) every core.
"""

from __future__ import annotations

import os
import time

import torch

from .cache_layout import CacheLayout
from .errors import GenerationSettingsError
from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan
from .validate import is_int, show, wrong_type

ONE_THREAD_MAX_PARAMETERS = 20_000_000
"""Models up to this size decode with one thread without measuring (the shipped models: 1 thread was 1.2-2x faster
than 2 on an idle 2-core machine, and 10-120x faster on a busy one)."""
MEASURED_MAX_PARAMETERS = 200_000_000
"""Models up to this size are timed; larger ones use one thread per core."""
TIMED_STEPS = 6


THREADS_PER_CORE_MAX = 4
"""More torch threads than this per core only oversubscribe the machine; asking for more is refused."""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    return THREADS_PER_CORE_MAX * cores()


def check_threads(threads) -> int | None:
    """The thread count asked for (None: choose), or GenerationSettingsError."""
    if threads is None:
        return None
    if not is_int(threads):
        raise wrong_type("threads", threads, f"an integer in 1..{max_threads()}, or None (choose)")
    if not 1 <= threads <= max_threads():
        raise GenerationSettingsError(f"threads={show(threads)} is out of range: use 1..{max_threads()} "
                                      f"({THREADS_PER_CORE_MAX} per core of the {cores()} this process may use)")
    return int(threads)


def choose_threads(model: DeepseekForCausalLM) -> int:
    """One thread, or one per core, whichever decodes `model` faster here (CPU models only)."""
    available = cores()
    parameters = sum(p.numel() for p in model.parameters())
    if available == 1 or parameters <= ONE_THREAD_MAX_PARAMETERS:
        return 1
    if parameters > MEASURED_MAX_PARAMETERS:
        return available
    timings = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, available):
            torch.set_num_threads(threads)
            timings[threads] = _step_seconds(model)
    finally:
        torch.set_num_threads(previous)
    return min(timings, key=timings.get)


def _step_seconds(model: DeepseekForCausalLM) -> float:
    """The fastest of a few one-token trunk steps over a short cache."""
    cfg = model.config
    device = model.lm_head.weight.device
    cache = CacheLayout.for_config(cfg).allocate(cfg.num_hidden_layers, 1, 64, model.lm_head.weight.dtype, device,
                                                 initial_length=32)
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    plan = AttentionPlan.over_cache(cache, cache.lengths[:, None], torch.ones(1, 1, 1, dtype=torch.bool, device=device))
    best = float("inf")
    with torch.inference_mode():
        for step in range(TIMED_STEPS + 1):
            start = time.perf_counter()
            model.logits(model.forward_trunk(tokens, plan))
            if step:  # the first call warms up
                best = min(best, time.perf_counter() - start)
    return best
