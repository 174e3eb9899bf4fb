"""mtp-runtime: speculative decoding with DeepSeek multi-token-prediction (MTP) modules.

    import mtp_runtime
    rt = mtp_runtime.load()                 # the shipped default model, or load("path/to/hf-folder")
    out = rt.generate("def fib(n):", max_new_tokens=64)     # draft="auto": the fastest chain length per step
    print(out.text, out.stats.mean_accepted_length)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import MTPRuntimeError
from .validate import wrong_type
from .runtime import GenerationResult, GenerationStream, Runtime, StreamChunk

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"

try:
    __version__ = version("mtp-runtime")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load", "generate", "Runtime", "GenerationResult", "GenerationStream", "StreamChunk",
           "MTPRuntimeError", "DEFAULT_MODEL"]


def load(path: str | Path | None = None, device=None, dtype=None, attention: str = "auto",
         parallel=None, threads: int | None = None, compile: bool = False, index_keys_fp8: bool = False) -> Runtime:
    """Load an HF-format DeepSeek-V2/V3/V3.2 folder; path=None loads the shipped default model.

    attention: the prefill kernel, 'auto' (flash-attn where installed and usable, else SDPA), 'flash' (an error
    if flash-attn cannot run here) or 'sdpa'.
    parallel: a `mtp_runtime.parallel.ParallelGroup` to split the model over (e.g. `init_from_env()` under
    torchrun); None keeps the whole model in this process.
    threads: torch CPU threads for this runtime's calls; None picks the fastest for the model (threads.py).
    compile: run batch-1 decoding steps compiled (`Runtime.compile`): faster once each step shape has compiled.
    index_keys_fp8: store a DeepSeek-V3.2 model's indexer key cache in FP8 (a float32 scale per 128 values).
    """
    if not isinstance(compile, bool):
        raise wrong_type("compile", compile, "True or False")
    if path is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise MTPRuntimeError(
                f"the shipped default model is missing at {DEFAULT_MODEL}; pass a model folder or reinstall")
        path = DEFAULT_MODEL
    runtime = Runtime.from_folder(path, device=device, dtype=dtype, attention=attention, parallel=parallel,
                                  threads=threads, index_keys_fp8=index_keys_fp8)
    if compile:
        runtime.compile()
    return runtime


def generate(prompt, model: Runtime | str | Path | None = None, **kwargs):
    """One-liner: load `model` (a Runtime, a folder, or None for the default) and generate from prompt."""
    runtime = model if isinstance(model, Runtime) else load(model)
    return runtime.generate(prompt, **kwargs)
