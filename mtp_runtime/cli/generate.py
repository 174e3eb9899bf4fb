"""`mtp-runtime generate`: stream a continuation of a prompt (or print it as JSON), with optional stats; several
prompts run as one batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import MTPRuntimeError
from .common import (DRAFT_HELP, check_model_options, check_request, compile_option, draft_options, friendly_errors,
                     load_runtime, model_options, sampling_options, unescape_stop)


@click.command()
@click.argument("prompts", nargs=-1, metavar="[PROMPT]...")
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read one prompt, the whole file, from this file ('-' for stdin).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read a batch of prompts: .jsonl with a \"prompt\" field per line, or text with one prompt per "
                   "blank-line-separated block.")
@model_options
@compile_option(default=False)
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@sampling_options
@click.option("--seed", type=int, default=None, show_default="random",
              help="Seed of the sampling generator, 0..2**64-1.")
@click.option("--draft", default=None, metavar="[auto|none|chain|tree|dynamic]",
              show_default="tree with --tree, else auto if the model has MTP modules, else none", help=DRAFT_HELP)
@draft_options(sweep=False)
@click.option("--stop", multiple=True,
              help="Stop when the text contains this string (repeatable); it is cut off. \\n, \\t, \\r and \\\\ "
                   "are read as newline, tab, carriage return and backslash.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--stats", is_flag=True, help="Print an acceptance summary to stderr after the text.")
@click.option("--json", "json_out", is_flag=True,
              help="Print one JSON object per prompt, one per line (text, token_ids, prompt_token_ids, "
                   "finish_reason, draft, stats), instead of streaming text.")
@friendly_errors
def generate(prompts, prompt_file, prompts_file, model, device, dtype, threads, attention, compile_steps,
             max_new_tokens, temperature, top_k, top_p, seed, draft, num_draft_tokens, tree, depth, draft_topk, stop,
             ignore_eos, stats, json_out):
    """Generate a continuation of PROMPT, streaming text to stdout as drafted tokens are accepted.

    The prompt comes from PROMPT, --prompt-file, or stdin (when neither is given). Several PROMPTs, or --prompts
    FILE, run as one batch: each continuation is printed under a '==> prompt N <==' line (with --json: one JSON
    line per prompt, in order). Greedy output is the same with or without drafting; drafting only changes how many
    tokens each trunk forward emits. Every option is checked before the model loads.

    Scale-out: started by torchrun with WORLD_SIZE > 1 (`torchrun --nproc-per-node 2 -m mtp_runtime.cli
    generate ...`), the model is split over the ranks by attention head and routed expert (gloo on cpu, NCCL
    on cuda:LOCAL_RANK); every rank computes the same tokens and only rank 0 prints.
    """
    from ..bench import format_stats
    from ..request import prompt_texts

    texts, batched = prompt_texts(_read_prompts(prompts, prompt_file, prompts_file))
    facts = check_model_options(model, device, dtype, threads)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  draft=draft, num_draft_tokens=num_draft_tokens, tree=tree, depth=depth, draft_topk=draft_topk,
                  stop=[unescape_stop(s) for s in stop], ignore_eos=ignore_eos)
    mode = check_request(facts, **kwargs).draft.mode
    try:
        runtime = load_runtime(model, device, dtype, threads, attention, compile_steps)
        echo = click.echo if runtime.is_main_process else _quiet
        if json_out:
            results = _print_json(runtime, texts if batched else texts[0], kwargs, mode, echo)
        elif batched:
            results = _print_batch(runtime, texts, kwargs, echo)
        else:
            results = [_stream_text(runtime, texts[0], kwargs, echo)]
    except KeyboardInterrupt:
        click.echo()
        sys.exit(130)
    except BrokenPipeError:  # e.g. `mtp-runtime generate ... | head -1`
        _silence_stdout()
        sys.exit(141)
    if stats:
        for i, result in enumerate(results):
            echo((f"==> prompt {i} <==\n" if batched else "") + format_stats(result.stats, result.finish_reason),
                 err=True)


def _read_prompts(prompts: tuple[str, ...], prompt_file: Path | None, prompts_file: Path | None) -> str | list[str]:
    """The PROMPTs, the --prompt-file contents ('-': stdin), the --prompts file's prompts, or piped stdin: one str,
    or a list for a batch; a usage error when there is none or more than one source."""
    from ..prompts import load_prompts

    given = [name for name, value in (("PROMPT", prompts), ("--prompt-file", prompt_file),
                                      ("--prompts", prompts_file)) if value]
    if len(given) > 1:
        raise click.UsageError(f"give the prompt in one way: {' or '.join(given)}, not both")
    if prompts_file is not None:
        return load_prompts(prompts_file)
    if prompt_file is not None:
        stream = click.get_text_stream("stdin") if str(prompt_file) == "-" else None
        try:
            return stream.read() if stream else prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MTPRuntimeError(f"cannot read the prompt file {prompt_file}: {exc}") from None
    if prompts:
        return list(prompts) if len(prompts) > 1 else prompts[0]
    stdin = click.get_text_stream("stdin")
    if stdin.isatty():
        raise click.UsageError("no prompt: give PROMPT, --prompt-file FILE, --prompts FILE, or pipe text on stdin")
    try:
        return stdin.read()
    except UnicodeDecodeError as exc:
        raise MTPRuntimeError(f"cannot read the prompt from stdin: {exc}") from None


def _quiet(*args, **kwargs) -> None:
    """click.echo on the ranks other than 0: print nothing."""


def _print_json(runtime, prompt: str | list[str], kwargs: dict, mode: str, echo=click.echo):
    """Generate, then print each result (and the draft mode that ran) as one JSON object per line."""
    out = runtime.generate(prompt, **kwargs)
    results = out if isinstance(out, list) else [out]
    for result in results:
        echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                         "prompt_token_ids": result.prompt_token_ids, "finish_reason": result.finish_reason,
                         "draft": mode, "stats": result.stats.to_dict()}))
    return results


def _print_batch(runtime, prompts: list[str], kwargs: dict, echo=click.echo):
    """Generate the batch, then print each continuation under a '==> prompt N <==' line."""
    results = runtime.generate(prompts, **kwargs)
    for i, result in enumerate(results):
        echo(f"==> prompt {i} <==")
        echo(result.text, nl=not result.text.endswith("\n"))
    return results


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
