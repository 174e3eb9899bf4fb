"""`mtp-runtime bench`: draft acceptance and speedup over plain decoding, as tables, JSON and a plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from ..bench.configs import DEFAULT_DRAFTS, QUICK_DRAFTS
from ..errors import GenerationSettingsError, MTPRuntimeError, ParallelError
from ..validate import is_int
from .common import (check_model_options, check_request, compile_option, draft_options, friendly_errors, int_list,
                     load_runtime, model_options, sampling_options)


@dataclass(frozen=True)
class Preset:
    """What bench runs when an option is not given."""

    drafts: tuple[str, ...]
    num_prompts: int
    max_new_tokens: int
    compile: bool


QUICK = Preset(QUICK_DRAFTS, num_prompts=3, max_new_tokens=64, compile=False)
"""The default: plain decoding, auto and a one-token chain, eager (about half a minute on a busy 2-core CPU with the
shipped model; compiling the step shapes alone takes minutes the first time on a machine)."""
FULL = Preset(DEFAULT_DRAFTS, num_prompts=8, max_new_tokens=128, compile=True)
"""--full: every draft mode, compiled steps."""


@click.command()
@model_options
@compile_option(default=None, default_text="off; on with --full")
@click.option("--full", is_flag=True,
              help="The full sweep: auto, chain, tree and dynamic (each at its default size) on 8 prompts x 128 "
                   "tokens, compiled. Without it, bench compares plain decoding, auto and a one-token chain on 3 "
                   "prompts x 64 tokens, eagerly (about a minute).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompts: .jsonl with a \"prompt\" field per line, or text with one prompt per blank-line-separated "
                   "block.  [default: the first 30 lines of held-out files of the training corpus]")
@click.option("--num-prompts", type=int, default=None, show_default="3; 8 with --full",
              help="Number of default prompts (not with --prompts).")
@click.option("--max-new-tokens", type=int, default=None, show_default="64; 128 with --full",
              help="Tokens generated per prompt.")
@click.option("--draft", "drafts", multiple=True, metavar="[auto|chain|tree|dynamic]",
              help="Draft mode to benchmark, repeatable (see `generate --help`); plain decoding always runs "
                   "as the baseline.  [default: auto, chain; with --full: auto, chain, tree, dynamic]")
@draft_options(sweep=True)
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i is sampled with seed + i.")
@click.option("--ignore-eos/--respect-eos", default=True, show_default=True,
              help="Generate exactly --max-new-tokens per prompt (the default), or stop at end-of-sequence.")
@click.option("--json", "json_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write every figure (configs, per-prompt stats, machine) to this JSON file.")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Draw acceptance per depth and speedup per configuration to this image (needs matplotlib; the "
                   "suffix picks the format: .png, .pdf, .svg, ...).")
@click.option("--compare-hf", is_flag=True,
              help="Also time transformers' generate on the same weights and prompts: greedy, prompt lookup (3 "
                   "tokens) and its MTP mode, and check their greedy ids against ours.")
@click.option("--batch-sizes", default=None, metavar="B[,B...]",
              help="Instead of per-prompt timing, measure batched throughput: one generate call over B prompts per "
                   "configuration and batch size (e.g. 1,4,16,64), tokens/s and speedup over plain decoding.")
@click.option("--soak", type=int, default=None, metavar="CALLS",
              help="Instead of timing, make CALLS generate calls on one runtime (cycling plain decoding and the "
                   "configurations; every 10th fills the cache to the model's maximum positions, every 5th is a "
                   "stream abandoned after one chunk) and report resident memory (RSS) as they go.")
@click.option("--url", "urls", multiple=True, metavar="http://HOST:PORT",
              help="Instead of a local model, load-test running `mtp-runtime serve` processes (repeatable: servers "
                   "started with different --draft settings are reported side by side); with --soak, soak the "
                   "first one over HTTP.")
@click.option("--concurrency", default="1,4,16", show_default=True, metavar="C[,C...]",
              help="With --url: clients streaming at once, one level per value.")
@click.option("--num-requests", type=int, default=32, show_default=True,
              help="With --url: requests per server and concurrency level.")
@click.option("--api-key", default=None, envvar="MTP_RUNTIME_API_KEY", help="With --url: the servers' --api-key.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@friendly_errors
def bench(model, device, dtype, threads, attention, compile_steps, full, prompts_file, num_prompts, max_new_tokens,
          drafts, num_draft_tokens, trees, depth, draft_topk, temperature, top_k, top_p, seed, ignore_eos, json_file,
          plot_file, compare_hf, batch_sizes, soak, urls, concurrency, num_requests, api_key, progress):
    """Measure MTP draft acceptance and speedup over plain decoding, on the same prompts in one run.

    Plain decoding and every configuration run on the same prompts, interleaved, each after one untimed
    warm-up generate. Greedy by default; with --temperature the acceptance is that of rejection sampling.
    The default is a quick comparison (plain, auto, chain k=1; 3 prompts x 64 tokens, eager); `bench --full`
    runs the whole sweep (auto, chain, tree, dynamic; 8 prompts x 128 tokens, compiled steps). Every option is
    checked before the model loads.

    \b
    Figures per configuration:
      acceptance   P(depth-d draft accepted | its parent accepted), per depth
      cumulative   P(at least d drafts accepted in a step): vLLM's rate
      tau          tokens per verify forward that carried drafts, bonus
                   included: 1 + the sum of the cumulative rates
      tok/fwd      mean accepted length: new tokens / trunk forwards,
                   the prefill counted as the first forward
      histogram    drafted tokens accepted per step
      tok/s        wall-clock tokens per second of the generate calls
      speedup      tok/s over plain decoding's tok/s in the same run
      bound(free)  = tau: the speedup if drafting and verification were free
      tau*step     tau x plain decode-step time / this decode-step time: the
                   speedup implied by the measured acceptance and step cost
                   (prefill excluded)
      draft/verify/commit/other   shares of the engine's time
      =plain       greedy token ids equal plain decoding's on every prompt

    Scale-out: started by torchrun with WORLD_SIZE > 1 (`torchrun --nproc-per-node 2 -m mtp_runtime.cli bench
    ...`), the model is split over the ranks by attention head and routed expert; every rank runs the same
    benchmark, and rank 0 prints the tables and writes --json and --plot (its own timings).
    """
    from .. import bench as bench_mod
    from ..parallel import launched_world_size

    if prompts_file is not None and num_prompts is not None:
        raise click.UsageError("--num-prompts counts the default prompts; with --prompts FILE every prompt in it runs")
    preset = FULL if full else QUICK
    num_prompts = preset.num_prompts if num_prompts is None else num_prompts
    max_new_tokens = preset.max_new_tokens if max_new_tokens is None else max_new_tokens
    if compile_steps is None:  # the preset's choice stays eager where compiling is not supported (off the CPU)
        compile_steps = preset.compile and _cpu(device)
    if urls:
        _check_outputs(json_file, plot_file)
        _serving(urls, model, prompts_file, num_prompts, max_new_tokens, dict(temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed), ignore_eos, json_file, concurrency, num_requests, api_key, soak, progress,
                 local={"--draft": drafts, "--num-draft-tokens": num_draft_tokens, "--tree": trees, "--depth": depth,
                        "--draft-topk": draft_topk, "--compare-hf": compare_hf, "--plot": plot_file,
                        "--batch-sizes": batch_sizes})
        return
    if compare_hf and launched_world_size() > 1:
        raise ParallelError("--compare-hf runs transformers on the whole model; run it without torchrun")
    _check_outputs(json_file, plot_file)
    configs = bench_mod.sweep(drafts or preset.drafts, int_list(num_draft_tokens, "--num-draft-tokens"),
                              list(trees) or None, depth, draft_topk)
    facts = check_model_options(model, device, dtype, threads)
    check_request(facts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  draft="none")
    sizes = _check_modes(batch_sizes, soak, compare_hf, plot_file)
    texts = _prompts(model, prompts_file, num_prompts)
    runtime = load_runtime(model, device, dtype, threads, attention, compile_steps)
    if sizes is not None or soak is not None:
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        _batch_or_soak(runtime, texts, configs, sizes, soak, max_new_tokens, sampling, json_file, progress)
        return
    report = bench_mod.run_bench(runtime, texts, configs, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                                 progress=progress and runtime.is_main_process)
    if not runtime.is_main_process:
        return
    if compare_hf:
        bench_mod.compare_hf(runtime, report, progress=progress)
    click.echo(bench_mod.format_report(report))
    if json_file is not None:
        _write_json(report, json_file)
    if plot_file is not None:
        bench_mod.plot_report(report, plot_file)
        click.echo(f"plot written to {plot_file}", err=True)


def _cpu(device: str | None) -> bool:
    """Whether the run is on the CPU, where compiled steps are supported (an explicit --compile elsewhere is an
    error from Runtime.compile)."""
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")


def _check_modes(batch_sizes: str | None, soak: int | None, compare_hf: bool, plot_file) -> list[int] | None:
    """--batch-sizes and --soak replace the per-prompt timing, so they exclude each other and its extras; checked
    before the model loads. Returns the batch sizes (None without --batch-sizes)."""
    modes = [name for name, given in (("--batch-sizes", batch_sizes is not None), ("--soak", soak is not None)) if given]
    extras = [name for name, given in (("--compare-hf", compare_hf), ("--plot", plot_file is not None)) if given]
    if len(modes) > 1 or (modes and extras):
        raise GenerationSettingsError(f"{' and '.join(modes + extras)} cannot be combined; run them separately")
    if soak is not None and soak < 1:
        raise GenerationSettingsError(f"--soak={soak} must be at least 1 call")
    sizes = int_list(batch_sizes, "--batch-sizes")
    if sizes is not None and min(sizes) < 1:
        raise GenerationSettingsError(f"--batch-sizes {sizes} must list positive integers, e.g. 1,4,16,64")
    return sizes


def _batch_or_soak(runtime, prompts: list[str], configs, batch_sizes: list[int] | None, soak: int | None,
                   max_new_tokens: int, sampling: dict, json_file: Path | None, progress: bool) -> None:
    """Batched throughput over `batch_sizes`, or `soak` calls with RSS samples; the report to stdout and --json."""
    from ..bench.batch import run_batch_sweep
    from ..bench.configs import DraftConfig
    from ..bench.soak import run_soak

    ids = [runtime.encode(p) for p in prompts]
    if batch_sizes is not None:
        report = run_batch_sweep(runtime, ids, configs, batch_sizes, max_new_tokens, sampling, progress)
    else:
        report = run_soak(runtime, ids, [DraftConfig("none"), *configs], soak, max_new_tokens, sampling, progress)
    click.echo(report.format())
    if json_file is not None:
        _write_json(report, json_file)


def _serving(urls, model, prompts_file, num_prompts, max_new_tokens, sampling, ignore_eos, json_file, concurrency,
             num_requests, api_key, soak, progress, local: dict) -> None:
    """bench --url: the serving benchmark (or soak) against running servers (bench/serving.py)."""
    from ..bench.serving import run_serving_bench, run_serving_soak

    given = [name for name, value in local.items() if value]
    if given:
        raise GenerationSettingsError(f"{', '.join(given)} cannot be combined with --url: a server drafts as it was "
                                      "started (start one per --draft setting and pass each --url)")
    levels = int_list(concurrency, "--concurrency")
    if not levels or min(levels) < 1 or num_requests < 1:
        raise GenerationSettingsError("--concurrency must list positive integers (e.g. 1,4,16) and --num-requests "
                                      "must be at least 1")
    if soak is not None and soak < 1:
        raise GenerationSettingsError(f"--soak={soak} must be at least 1 request")
    prompts = _prompts(model, prompts_file, num_prompts)
    urls = [url.rstrip("/").removesuffix("/v1") for url in urls]
    if soak is not None:
        report = run_serving_soak(urls[0], prompts, soak, max_new_tokens, max(levels), api_key, progress)
    else:
        report = run_serving_bench(urls, prompts, levels, num_requests, max_new_tokens, sampling, ignore_eos, api_key,
                                   progress)
    click.echo(report.format())
    if json_file is not None:
        _write_json(report, json_file)


def _check_outputs(json_file: Path | None, plot_file: Path | None) -> None:
    """Fail before the long run when an output cannot be written (no matplotlib, an image format it cannot write,
    or a missing folder)."""
    if plot_file is not None:
        from ..bench.plot import check_plot_path

        check_plot_path(plot_file)
    for file in (json_file, plot_file):
        if file is not None and not file.resolve().parent.is_dir():
            raise MTPRuntimeError(f"cannot write {file}: folder {file.resolve().parent} does not exist")


def _prompts(model: Path | None, prompts_file: Path | None, num_prompts: int) -> list[str]:
    """The --prompts file, or held-out files of the corpus the model was trained on."""
    import mtp_runtime
    from ..prompts import default_prompts, load_prompts, training_corpus

    if prompts_file is not None:
        return load_prompts(prompts_file)
    if not is_int(num_prompts, 1):
        raise GenerationSettingsError(f"--num-prompts {num_prompts} must be at least 1")
    roots, percent = training_corpus(model if model is not None else mtp_runtime.DEFAULT_MODEL)
    return default_prompts(num_prompts, roots=roots, percent=percent)


def _write_json(report, json_file: Path) -> None:
    try:
        json_file.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MTPRuntimeError(f"cannot write {json_file}: {exc}") from None
    click.echo(f"figures written to {json_file}", err=True)
