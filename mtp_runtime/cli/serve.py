"""`mtp-runtime serve`: the OpenAI-compatible HTTP server (mtp_runtime.serve) over one loaded model."""

from __future__ import annotations

import dataclasses

import click

from ..errors import MTPRuntimeError, NoMTPModulesError, ParallelError
from .common import DRAFT_HELP, compile_option, draft_options, friendly_errors, load_runtime, model_options

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@click.command()
@model_options
@compile_option(default=False)
@click.option("--draft", default=None, metavar="[auto|none|chain|tree|dynamic]",
              show_default="tree with --tree, else auto if the model has MTP modules, else none", help=DRAFT_HELP)
@draft_options(sweep=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves every interface (then set --api-key).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port; 0 picks a free one.")
@click.option("--max-batch", type=int, default=16, show_default=True,
              help="Sequences decoding at once (each prompt of a request is one); the rest wait in the queue.")
@click.option("--max-queue", type=int, default=256, show_default=True,
              help="Sequences waiting at most; a request that does not fit is answered 429.")
@click.option("--api-key", default=None, envvar="MTP_RUNTIME_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/ routes (the openai client's api_key).")
@click.option("--served-model-name", default=None, show_default="the model folder's name",
              help="The model name requests give and /v1/models lists.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds in-flight and queued requests get to finish after SIGINT/SIGTERM (new ones get 503); "
                   "then they get an error. A second signal stops at once.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True,
              help="Server log (debug adds one line per HTTP request).")
@friendly_errors
def serve(model, device, dtype, threads, attention, compile_steps, draft, num_draft_tokens, tree, depth, draft_topk,
          host, port, max_batch, max_queue, api_key, served_model_name, max_body_bytes, shutdown_timeout, log_level):
    """Serve the model over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions, /v1/models, plus
    /health and Prometheus /metrics.

    \b
    Continuous batching: requests join the running batch at the next step and
    leave it when they finish or their client disconnects; greedy output for a
    prompt is what `generate` gives for it alone, whatever else is in the batch.
    Requests may set top_k, ignore_eos, return_token_ids, acceptance and the draft
    options (draft, num_draft_tokens, tree, depth, draft_topk) as extra fields;
    the draft options here are their defaults. A seeded sampled request decodes
    in a batch of its own, so that its output is reproducible.

    \b
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "default", "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'
    """
    from ..parallel import launched_world_size

    try:
        from ..serve import DraftDefaults, ServeSettings, serve as run_server
    except ImportError as error:
        raise MTPRuntimeError(f"serve needs the serve extra ({error.name} is missing): "
                              "pip install 'mtp-runtime[serve]'") from None
    if launched_world_size() > 1:
        raise ParallelError("serve runs in one process; start it without torchrun")
    if tree is not None and draft is None:
        draft = "tree"
    defaults = DraftDefaults(draft or "auto", num_draft_tokens, tree, depth, draft_topk)
    settings = ServeSettings(host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                             max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout, draft=defaults)
    settings.validate()  # before the (slow) model load
    runtime = load_runtime(model, device, dtype, threads, attention, compile_steps)
    if draft is None and not runtime.num_mtp_modules:
        defaults = DraftDefaults("none")
    elif defaults.mode != "none" and not runtime.num_mtp_modules:
        raise NoMTPModulesError("this checkpoint has no MTP modules, so it cannot draft; use --draft none, or add "
                                "modules with `mtp-runtime train --mtp-only`")
    name = served_model_name or (runtime.path.name if runtime.path is not None else "default")
    settings = dataclasses.replace(settings, draft=defaults, model_name=name)
    run_server(runtime, settings, announce=lambda line: click.echo(line), log_level=log_level)
