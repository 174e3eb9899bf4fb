"""What the commands share: one-line errors, the model and sampling options, loading and request checks."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from ..errors import GenerationSettingsError, MTPRuntimeError

DRAFT_HELP = ("Drafting: auto (each step drafts the chain length, none included, that measured acceptance and step "
              "times say is fastest), none (plain decoding), chain (one MTP guess per depth), tree (static token "
              "tree, see --tree) or dynamic (EAGLE-2-style tree grown by draft probability).")
TREE_SPEC = ("branching per depth as '3,2,1' (3 children of the root, 2 of each, 1 of each), or Medusa-style JSON "
             "paths of child ranks, e.g. '[[0],[1],[0,0]]'.  [default: 3,2,1]")


def friendly_errors(command):
    """Turn MTPRuntimeError into a one-line message and exit code 1 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return command(*args, **kwargs)
        except MTPRuntimeError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def _options(*decorators):
    """One decorator applying several click options, listed in the order they appear in --help."""

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


model_options = _options(
    click.option("--model", type=click.Path(path_type=Path), default=None, show_default="the shipped model",
                 help="HF-format DeepSeek-V2/V3/V3.2 folder (config.json, *.safetensors, tokenizer.json)."),
    click.option("--device", default=None, show_default="cuda if available, else cpu",
                 help="torch device, e.g. cpu, cuda, cuda:1."),
    click.option("--dtype", default=None, show_default="bfloat16 on cuda, float32 on cpu",
                 help="Weights and activations: float32, bfloat16 or float16."),
    click.option("--threads", type=int, default=None, show_default="1 for small models, else the fastest measured",
                 help="torch CPU threads."),
    click.option("--attention", type=click.Choice(["auto", "flash", "sdpa"]), default="auto", show_default=True,
                 help="Prefill attention kernel: flash-attn where installed and usable (CUDA, bf16/fp16) else SDPA; "
                      "'flash' makes a missing flash-attn an error."),
)
"""--model, --device, --dtype, --threads, --attention."""


def compile_option(default: bool):
    """--compile/--no-compile: batch-1 decoding steps through torch.compile (CPU)."""
    return click.option(
        "--compile/--no-compile", "compile_steps", default=default, show_default=True,
        help="Run batch-1 decoding steps compiled (torch.compile, CPU): several times faster once each step shape "
             "has compiled, which takes tens of seconds the first time and a few seconds once inductor's on-disk "
             "cache holds it. Pays for long runs, not for one short generation.")

sampling_options = _options(
    click.option("--temperature", type=float, default=0.0, show_default=True,
                 help="Softmax temperature; 0 decodes greedily (argmax)."),
    click.option("--top-k", type=int, default=0, show_default=True,
                 help="Sample among the k most likely tokens only; 0 turns it off."),
    click.option("--top-p", type=float, default=1.0, show_default=True,
                 help="Nucleus sampling: the smallest token set holding this much mass; 1 turns it off."),
)
"""--temperature, --top-k, --top-p (transformers' generate names)."""


def load_runtime(model: Path | None, device: str | None, dtype: str | None, threads: int | None,
                 attention: str = "auto", compile: bool = False):
    """The Runtime for --model (or the shipped model).

    Started by torchrun with WORLD_SIZE > 1, joins the process group (left when the command ends) and loads
    this rank's share of the model.
    """
    import mtp_runtime
    from ..parallel import close, init_from_env, launched_world_size

    if threads is not None and threads < 1:
        raise GenerationSettingsError(f"--threads={threads} must be at least 1")
    parallel = None
    if launched_world_size() > 1:
        parallel = init_from_env(device)
        click.get_current_context().call_on_close(close)
        device = parallel.device
    return mtp_runtime.load(model, device=device, dtype=dtype, attention=attention, parallel=parallel, threads=threads,
                            compile=compile)


def check_request(max_new_tokens: int, draft: str | None, kwargs: dict, stop: tuple[str, ...]) -> None:
    """Validate every generation setting before the (slow) model load."""
    from ..params import DEFAULT_DRAFT_MODE, DraftParams, GenerationRequest
    from ..sampling import SamplingParams

    GenerationRequest(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["seed"]),
        draft=DraftParams.build(draft or DEFAULT_DRAFT_MODE, kwargs["num_draft_tokens"], kwargs["tree"], kwargs["depth"],
                                kwargs["topk"]),
        stop_strings=stop).validate()
