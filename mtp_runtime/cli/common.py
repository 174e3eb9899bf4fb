"""What the commands share: one-line errors, the model, sampling and draft options, and every check that can run
before the (slow) model load."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import click

from ..errors import GenerationSettingsError, MTPRuntimeError

DRAFT_HELP = ("Drafting: auto (each step drafts the chain length, none included, that measured acceptance and step "
              "times say is fastest), none (plain decoding), chain (one MTP guess per depth), tree (static token "
              "tree, see --tree) or dynamic (EAGLE-2-style tree grown by draft probability).")
TREE_SPEC = ("branching per depth as '3,2,1' (3 children of the root, 2 of each, 1 of each), or Medusa-style JSON "
             "paths of child ranks, e.g. '[[0],[1],[0,0]]'.  [default: 3,2,1]")
NUM_DRAFT_TOKENS_HELP = ("chain: tokens drafted per step (default 1); auto: the longest chain it may choose (default "
                         "8); dynamic: draft nodes kept per step (default 8). Not read by tree and none.")
"""Literal defaults (params.py imports torch, which --help should not wait for); a test checks them."""
DEPTH_HELP = "dynamic only: maximum draft depth.  [default: 4]"
DRAFT_TOPK_HELP = ("dynamic only: children drafted per expanded node, and nodes expanded per depth (draft branching; "
                   "not sampling's --top-k).  [default: 4]")
STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
"""Escapes --stop interprets (any other backslash stays as typed)."""


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
                 help="torch CPU threads (at most 4 per core)."),
    click.option("--attention", type=click.Choice(["auto", "flash", "sdpa"]), default="auto", show_default=True,
                 help="Prefill attention kernel: flash-attn where installed and usable (CUDA, bf16/fp16) else SDPA; "
                      "'flash' makes a missing flash-attn an error."),
)
"""--model, --device, --dtype, --threads, --attention."""


def compile_option(default: bool | None, default_text: str | None = None):
    """--compile/--no-compile: batch-1 decoding steps through torch.compile (CPU)."""
    return click.option(
        "--compile/--no-compile", "compile_steps", default=default, show_default=default_text or True,
        help="Run batch-1 decoding steps compiled (torch.compile, CPU): several times faster once each step shape "
             "has compiled, which takes about a minute per shape the first time on a machine; compiled shapes are "
             "saved and load in seconds in later runs. Pays for long runs, not for one short generation.")


sampling_options = _options(
    click.option("--temperature", type=float, default=0.0, show_default=True,
                 help="Softmax temperature; 0 decodes greedily (argmax)."),
    click.option("--top-k", type=int, default=0, show_default=True,
                 help="Sample among the k most likely tokens only; 0 turns it off (sampling only)."),
    click.option("--top-p", type=float, default=1.0, show_default=True,
                 help="Nucleus sampling: the smallest token set holding this much mass; 1 turns it off (sampling "
                      "only)."),
)
"""--temperature, --top-k, --top-p (transformers' generate names)."""


def _renamed_topk(ctx, param, value):
    if value is not None:
        raise click.BadParameter("renamed --draft-topk (draft branching); sampling's option is --top-k")
    return value


def draft_options(sweep: bool):
    """--num-draft-tokens, --tree, --depth, --draft-topk (the same help for generate and bench); with `sweep`,
    --num-draft-tokens takes a comma-separated list and --tree repeats."""
    return _options(
        click.option("--num-draft-tokens", type=str if sweep else int, default=None,
                     metavar="N[,N...]" if sweep else "N",
                     help=NUM_DRAFT_TOKENS_HELP + (" Comma-separated to sweep." if sweep else "")),
        click.option("--tree", "trees" if sweep else "tree", multiple=sweep, default=None,
                     help=("Static tree shape for --draft tree (repeatable to sweep): " if sweep else
                           "Static tree shape (implies --draft tree): ") + TREE_SPEC),
        click.option("--depth", type=int, default=None, help=DEPTH_HELP),
        click.option("--draft-topk", type=int, default=None, help=DRAFT_TOPK_HELP),
        click.option("--topk", type=int, default=None, hidden=True, expose_value=False, callback=_renamed_topk),
    )


def unescape_stop(text: str) -> str:
    """--stop's text with \\n, \\t, \\r and \\\\ made the characters they name, as the shell cannot type them."""
    return re.sub(r"\\(.)", lambda m: STOP_ESCAPES.get(m[1], m[0]), text, flags=re.S)


def check_model_options(model: Path | None, device: str | None, dtype: str | None, threads: int | None):
    """The checks of the model options that need no weights: device, dtype, threads, and the model folder's
    config.json. Returns what the request checks need to know of the model (ModelFacts)."""
    import mtp_runtime
    from ..checkpoint import open_folder
    from ..request import ModelFacts
    from ..runtime import resolve_device, resolve_dtype
    from ..threads import check_threads

    check_threads(threads)
    if device is not None:
        resolve_dtype(dtype, resolve_device(device))
    elif dtype is not None:
        resolve_dtype(dtype, resolve_device(None))
    folder = open_folder(model if model is not None else mtp_runtime.DEFAULT_MODEL)
    config = folder.config
    return ModelFacts(config.num_nextn_predict_layers, config.vocab_size, config.eos_token_ids,
                      (folder.path / "tokenizer.json").is_file())


def load_runtime(model: Path | None, device: str | None, dtype: str | None, threads: int | None,
                 attention: str = "auto", compile: bool = False):
    """The Runtime for --model (or the shipped model).

    Started by torchrun with WORLD_SIZE > 1, joins the process group (left when the command ends) and loads
    this rank's share of the model.
    """
    import mtp_runtime
    from ..parallel import close, init_from_env, launched_world_size

    parallel = None
    if launched_world_size() > 1:
        parallel = init_from_env(device)
        click.get_current_context().call_on_close(close)
        device = parallel.device
    return mtp_runtime.load(model, device=device, dtype=dtype, attention=attention, parallel=parallel, threads=threads,
                            compile=compile)


def check_request(facts, **generate_kwargs):
    """The GenerationRequest generate() will build, built (and so checked) before the model loads."""
    from ..request import build_request

    return build_request(facts, **generate_kwargs)


def int_list(value: str | None, option: str) -> list[int] | None:
    """'1,2,3' as [1, 2, 3] (None stays None); a list of no integers is an error."""
    if value is None:
        return None
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise GenerationSettingsError(
            f"{option} {value!r} is invalid: expected integers separated by commas, e.g. 1,2,3") from None
    if not numbers:
        raise GenerationSettingsError(f"{option} {value!r} lists no integers; give e.g. 1,2,3")
    return numbers
