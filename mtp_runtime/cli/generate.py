"""`mtp-runtime generate`: stream a continuation of a prompt (or print it as JSON), with optional stats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import MTPRuntimeError
from ..params import DEFAULT_DRAFT_MODE
from .common import (check_request, compile_option, draft_options, friendly_errors, load_runtime, model_options,
                     sampling_options)


@click.command()
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read the prompt from this file ('-' for stdin). Without PROMPT or this, stdin is read.")
@model_options
@compile_option(default=False)
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@sampling_options
@click.option("--seed", type=int, default=None, show_default="random", help="Seed of the sampling generator.")
@draft_options
@click.option("--stop", multiple=True, help="Stop when the text contains this string (repeatable); it is cut off.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--stats", is_flag=True, help="Print an acceptance summary to stderr after the text.")
@click.option("--json", "json_out", is_flag=True,
              help="Print one JSON object (text, token_ids, prompt_token_ids, finish_reason, stats) instead of "
                   "streaming text.")
@friendly_errors
def generate(prompt, prompt_file, model, device, dtype, threads, attention, compile_steps, max_new_tokens, temperature, top_k, top_p,
             seed, draft, num_draft_tokens, tree, depth, topk, stop, ignore_eos, stats, json_out):
    """Generate a continuation of PROMPT, streaming text to stdout as drafted tokens are accepted.

    The prompt comes from PROMPT, --prompt-file, or stdin (when neither is given). Greedy output is the same
    with or without drafting; drafting only changes how many tokens each trunk forward emits.

    Scale-out: started by torchrun with WORLD_SIZE > 1 (`torchrun --nproc-per-node 2 -m mtp_runtime.cli
    generate ...`), the model is split over the ranks by attention head and routed expert (gloo on cpu, NCCL
    on cuda:LOCAL_RANK); every rank computes the same tokens and only rank 0 prints.
    """
    from ..bench import format_stats

    text = _read_prompt(prompt, prompt_file)
    if tree is not None and draft is None:
        draft = "tree"
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, num_draft_tokens=num_draft_tokens,
                  tree=tree, depth=depth, topk=topk)
    check_request(max_new_tokens, draft, kwargs, tuple(stop))
    try:
        runtime = load_runtime(model, device, dtype, threads, attention, compile_steps)
        kwargs.update(draft=draft, max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos)
        echo = click.echo if runtime.is_main_process else _quiet
        result = (_print_json if json_out else _stream_text)(runtime, text, kwargs, echo)
    except KeyboardInterrupt:
        click.echo()
        sys.exit(130)
    except BrokenPipeError:  # e.g. `mtp-runtime generate ... | head -1`
        _silence_stdout()
        sys.exit(141)
    if stats:
        echo(format_stats(result.stats, result.finish_reason), err=True)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """PROMPT, the --prompt-file contents ('-': stdin), or piped stdin; a usage error when there is none."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give the prompt either as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        stream = click.get_text_stream("stdin") if str(prompt_file) == "-" else None
        try:
            return stream.read() if stream else prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MTPRuntimeError(f"cannot read the prompt file {prompt_file}: {exc}") from None
    if prompt is not None:
        return prompt
    stdin = click.get_text_stream("stdin")
    if stdin.isatty():
        raise click.UsageError("no prompt: give PROMPT, --prompt-file FILE, or pipe text on stdin")
    return stdin.read()


def _quiet(*args, **kwargs) -> None:
    """click.echo on the ranks other than 0: print nothing."""


def _print_json(runtime, text: str, kwargs: dict, echo=click.echo):
    """Generate, then print the result (and the draft mode that ran) as one JSON object."""
    result = runtime.generate(text, **kwargs)
    mode = kwargs["draft"] or (DEFAULT_DRAFT_MODE if runtime.num_mtp_modules else "none")
    echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                     "prompt_token_ids": result.prompt_token_ids, "finish_reason": result.finish_reason,
                     "draft": mode, "stats": result.stats.to_dict()}))
    return result


def _stream_text(runtime, text: str, kwargs: dict, echo=click.echo):
    """Print text as each step's tokens are accepted, ending with a newline."""
    stream = runtime.generate(text, stream=True, **kwargs)
    last = ""
    for chunk in stream:
        if chunk.text:
            echo(chunk.text, nl=False)  # click.echo flushes
            last = chunk.text
    if not last.endswith("\n"):
        echo()
    return stream.results[0]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises no second BrokenPipeError."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
