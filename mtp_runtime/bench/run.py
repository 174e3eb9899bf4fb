"""Running a benchmark: every configuration on every prompt, interleaved, after one untimed warm-up each."""

from __future__ import annotations

import sys
import time

from ..errors import MTPRuntimeError
from .configs import DraftConfig
from .results import BenchReport, ConfigResult, PromptRun

WARMUP_TOKENS = 8
AUTO_WARMUP_TOKENS = 48
"""auto tries every chain length once before it settles: its warm-up needs enough steps for that."""
RETIMES_AFTER_COMPILE = 2
"""A timed call that built or loaded a compiled step graph (a shape its warm-up did not meet, such as a chain
depth `auto` chose only later) is timed again, up to this many times, so that tokens/s and step times measure
decoding rather than compiling; that compile time is reported on its own (`compile_seconds_timed`)."""


def run_bench(runtime, prompts: list[str], configs: list[DraftConfig], *, max_new_tokens: int = 128,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = True,
              warmup: bool = True, progress: bool = False) -> BenchReport:
    """Run every configuration on every prompt (prompt i sampled with seed + i in each configuration)."""
    from tqdm import tqdm

    if not prompts:
        raise MTPRuntimeError("no prompts to benchmark")
    if not any(c.mode == "none" for c in configs):
        configs = [DraftConfig("none"), *configs]
    ids = [runtime.encode(p) for p in prompts]
    common = dict(temperature=temperature, top_k=top_k, top_p=top_p, ignore_eos=ignore_eos)
    if warmup:
        for config in configs:
            tokens = AUTO_WARMUP_TOKENS if config.mode == "auto" else WARMUP_TOKENS
            runtime.generate(input_ids=ids[0], max_new_tokens=min(tokens, max_new_tokens), seed=seed,
                             **common, **config.generate_kwargs())
    compiled_before = _compile_seconds(runtime)
    results = [ConfigResult(c) for c in configs]
    with tqdm(total=len(ids) * len(configs), desc="bench", unit="run", file=sys.stderr, disable=not progress,
              leave=True) as bar:
        for i, prompt in enumerate(ids):
            for result in results:
                bar.set_postfix_str(f"prompt {i + 1} {result.config.name}")
                result.runs.append(_timed_run(runtime, prompt, result.config, max_new_tokens, seed + i, common))
                bar.update()
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
    return BenchReport(list(prompts), ids, max_new_tokens, sampling, results, machine_info(runtime),
                       compile_seconds=compiled_before, compile_seconds_timed=_compile_seconds(runtime) - compiled_before)


def _compile_seconds(runtime) -> float:
    return getattr(runtime.forwards, "compile_seconds", 0.0)


def _timed_run(runtime, prompt: list[int], config: DraftConfig, max_new_tokens: int, seed: int,
               common: dict) -> PromptRun:
    """One generate call, timed by wall clock (again, up to RETIMES_AFTER_COMPILE times, while it compiled)."""
    for _ in range(1 + RETIMES_AFTER_COMPILE):
        compiled_before = _compile_seconds(runtime)
        start = time.perf_counter()
        out = runtime.generate(input_ids=prompt, max_new_tokens=max_new_tokens, seed=seed, **common,
                               **config.generate_kwargs())
        run = PromptRun(out.stats, time.perf_counter() - start, out.token_ids)
        if _compile_seconds(runtime) == compiled_before:
            break
    return run


def machine_info(runtime) -> dict:
    """Platform, library versions, threads, device and dtype of the run."""
    import os
    import platform

    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": runtime.threads, "compiled": runtime.forwards.compiled, "device": str(runtime.device),
            "dtype": str(runtime.model.lm_head.weight.dtype).removeprefix("torch."),
            "model": str(runtime.path) if runtime.path is not None else None,
            "world_size": runtime.parallel.world_size if runtime.parallel is not None else 1}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info
