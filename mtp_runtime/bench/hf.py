"""transformers' generate on the benchmark's weights and prompts: plain greedy, prompt lookup and its MTP mode."""

from __future__ import annotations

import sys
import time

from ..errors import MTPRuntimeError
from .results import BenchReport, HFResult
from .run import WARMUP_TOKENS

# transformers' generate: plain greedy, prompt-lookup speculation, and its own MTP speculation
HF_MODES = (("hf greedy", {}), ("hf prompt-lookup 3", {"prompt_lookup_num_tokens": 3}), ("hf mtp", {"use_mtp": True}))


def compare_hf(runtime, report: BenchReport, progress: bool = False) -> list[HFResult]:
    """Time transformers' generate modes on the report's prompts, each producing as many tokens as ours did."""
    from tqdm import tqdm

    model = load_hf_model(runtime.path, runtime.device)
    ours = [run.token_ids for run in report.plain.runs]
    results = []
    with tqdm(total=len(HF_MODES) * len(ours), desc="transformers", unit="run", file=sys.stderr,
              disable=not progress, leave=True) as bar:
        for name, kwargs in HF_MODES:
            results.append(_time_mode(model, name, kwargs, report, ours, bar))
    report.hf = results
    return results


def _time_mode(model, name: str, kwargs: dict, report: BenchReport, ours: list[list[int]], bar) -> HFResult:
    """One transformers mode on every prompt after a warm-up, generating as many tokens as ours on each."""
    result = HFResult(name)
    try:
        _hf_generate(model, report.prompt_token_ids[0], min(WARMUP_TOKENS, len(ours[0]) or 1), kwargs)
        matches = True
        for prompt, target in zip(report.prompt_token_ids, ours):
            start = time.perf_counter()
            tokens = _hf_generate(model, prompt, len(target), kwargs) if target else []
            result.wall_s += time.perf_counter() - start
            result.new_tokens += len(tokens)
            matches = matches and tokens == target
            bar.update()
        result.matches_ours = matches if report.greedy else None
    except Exception as exc:  # report transformers' failure in the table instead of crashing the benchmark
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return result


def load_hf_model(folder, device):
    """transformers' DeepseekV3ForCausalLM (float32) with its MTP layer patterns pointed at this checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if folder is None:
        raise MTPRuntimeError("--compare-hf needs a runtime loaded from a folder")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    n = model.config.num_hidden_layers
    depth = getattr(model.config, "num_mtp_layers", 0) or 0
    if depth:
        model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n + k}\..*" for k in range(depth)]
    model.generation_config.eos_token_id = None  # fixed-length runs, like ours with ignore_eos
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model


def _hf_generate(model, prompt: list[int], new_tokens: int, kwargs: dict) -> list[int]:
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()
