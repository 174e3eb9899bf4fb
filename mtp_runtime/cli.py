"""The `mtp-runtime` command line: generate, bench, info and train."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import GenerationSettingsError, MTPRuntimeError


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


def parse_arch(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs with JSON values (numbers, true/false, null) or plain strings."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--arch")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Speculative decoding with DeepSeek multi-token-prediction (MTP) modules."""


# ---------------------------------------------------------------------------------------------- shared options

def model_options(command):
    """--model, --device, --dtype, --threads."""
    for decorator in reversed([
        click.option("--model", type=click.Path(path_type=Path), default=None, show_default="the shipped model",
                     help="HF-format DeepSeek-V2/V3 folder (config.json, *.safetensors, tokenizer.json)."),
        click.option("--device", default=None, show_default="cuda if available, else cpu",
                     help="torch device, e.g. cpu, cuda, cuda:1."),
        click.option("--dtype", default=None, show_default="bfloat16 on cuda, float32 on cpu",
                     help="Weights and activations: float32, bfloat16 or float16."),
        click.option("--threads", type=int, default=None, show_default="torch's choice",
                     help="torch CPU threads."),
    ]):
        command = decorator(command)
    return command


def sampling_options(command):
    """--temperature, --top-k, --top-p (transformers' generate names)."""
    for decorator in reversed([
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="Softmax temperature; 0 decodes greedily (argmax)."),
        click.option("--top-k", type=int, default=0, show_default=True,
                     help="Sample among the k most likely tokens only; 0 turns it off."),
        click.option("--top-p", type=float, default=1.0, show_default=True,
                     help="Nucleus sampling: the smallest token set holding this much mass; 1 turns it off."),
    ]):
        command = decorator(command)
    return command


DRAFT_HELP = ("Drafting: none (plain decoding), chain (one MTP guess per depth), tree (static token tree, see "
              "--tree) or dynamic (EAGLE-2-style tree grown by draft probability).")
TREE_SPEC = ("branching per depth as '3,2,1' (3 children of the root, 2 of each, 1 of each), or Medusa-style JSON "
             "paths of child ranks, e.g. '[[0],[1],[0,0]]'.  [default: 3,2,1]")


def _load(model: Path | None, device: str | None, dtype: str | None, threads: int | None):
    """The Runtime for --model (or the shipped model), with a clear error for a missing folder."""
    import mtp_runtime

    if threads is not None:
        if threads < 1:
            raise GenerationSettingsError(f"--threads={threads} must be at least 1")
        import torch

        torch.set_num_threads(threads)
    if model is not None and not model.exists():
        raise MTPRuntimeError(f"model folder {model} does not exist; pass a folder holding an HF config.json")
    return mtp_runtime.load(model, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- generate

def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
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


def _check_request(max_new_tokens: int, draft: str | None, kwargs: dict, stop: tuple[str, ...]) -> None:
    """Validate every generation setting before the (slow) model load."""
    from .params import DraftParams, GenerationRequest
    from .sampling import SamplingParams

    GenerationRequest(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["seed"]),
        draft=DraftParams.build(draft or "dynamic", kwargs["num_draft_tokens"], kwargs["tree"], kwargs["depth"],
                                kwargs["topk"]),
        stop_strings=stop).validate()


@main.command()
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read the prompt from this file ('-' for stdin). Without PROMPT or this, stdin is read.")
@model_options
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@sampling_options
@click.option("--seed", type=int, default=None, show_default="random", help="Seed of the sampling generator.")
@click.option("--draft", default=None, metavar="[none|chain|tree|dynamic]",
              show_default="dynamic if the model has MTP modules, else none", help=DRAFT_HELP)
@click.option("--num-draft-tokens", type=int, default=None,
              help="chain: tokens drafted per step (default 3); dynamic: draft nodes kept per step (default 8).")
@click.option("--tree", default=None, help="Static tree shape (implies --draft tree): " + TREE_SPEC)
@click.option("--depth", type=int, default=None, help="dynamic: maximum draft depth.  [default: 4]")
@click.option("--topk", type=int, default=None,
              help="dynamic: children per expanded node and nodes expanded per depth.  [default: 4]")
@click.option("--stop", multiple=True, help="Stop when the text contains this string (repeatable); it is cut off.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--stats", is_flag=True, help="Print an acceptance summary to stderr after the text.")
@click.option("--json", "json_out", is_flag=True,
              help="Print one JSON object (text, token_ids, prompt_token_ids, finish_reason, stats) instead of "
                   "streaming text.")
@friendly_errors
def generate(prompt, prompt_file, model, device, dtype, threads, max_new_tokens, temperature, top_k, top_p, seed,
             draft, num_draft_tokens, tree, depth, topk, stop, ignore_eos, stats, json_out):
    """Generate a continuation of PROMPT, streaming text to stdout as drafted tokens are accepted.

    The prompt comes from PROMPT, --prompt-file, or stdin (when neither is given). Greedy output is the same
    with or without drafting; drafting only changes how many tokens each trunk forward emits.
    """
    from .bench import format_stats

    text = _read_prompt(prompt, prompt_file)
    if tree is not None and draft is None:
        draft = "tree"
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, num_draft_tokens=num_draft_tokens,
                  tree=tree, depth=depth, topk=topk)
    _check_request(max_new_tokens, draft, kwargs, tuple(stop))
    try:
        runtime = _load(model, device, dtype, threads)
        kwargs.update(draft=draft, max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos)
        if json_out:
            result = runtime.generate(text, **kwargs)
            mode = draft or ("dynamic" if runtime.num_mtp_modules else "none")
            click.echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                                   "prompt_token_ids": result.prompt_token_ids, "finish_reason": result.finish_reason,
                                   "draft": mode, "stats": result.stats.to_dict()}))
        else:
            stream = runtime.generate(text, stream=True, **kwargs)
            last = ""
            for chunk in stream:
                if chunk.text:
                    click.echo(chunk.text, nl=False)  # click.echo flushes
                    last = chunk.text
            if not last.endswith("\n"):
                click.echo()
            result = stream.results[0]
    except KeyboardInterrupt:
        click.echo()
        sys.exit(130)
    except BrokenPipeError:  # e.g. `mtp-runtime generate ... | head -1`
        _silence_stdout()
        sys.exit(141)
    if stats:
        click.echo(format_stats(result.stats, result.finish_reason), err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises no second BrokenPipeError."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------- bench

def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise GenerationSettingsError(
            f"--num-draft-tokens {value!r} is invalid: expected integers separated by commas, e.g. 1,2,3") from None


@main.command()
@model_options
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompts: .jsonl with a \"prompt\" field per line, or text with one prompt per blank-line-separated "
                   "block.  [default: the first 30 lines of held-out files of the training corpus]")
@click.option("--num-prompts", type=int, default=8, show_default=True,
              help="Number of default prompts (ignored with --prompts).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens generated per prompt.")
@click.option("--draft", "drafts", multiple=True, metavar="[chain|tree|dynamic]",
              help="Draft mode to benchmark, repeatable (see `generate --help`); plain decoding always runs "
                   "as the baseline.  [default: chain, tree, dynamic]")
@click.option("--num-draft-tokens", default=None, metavar="N[,N...]",
              help="Sweep, comma-separated: chain tokens per step and dynamic node budgets.  [default: chain 3, "
                   "dynamic 8]")
@click.option("--tree", "trees", multiple=True, help="Shape for --draft tree, repeatable to sweep: " + TREE_SPEC)
@click.option("--depth", type=int, default=None, help="dynamic: maximum draft depth.  [default: 4]")
@click.option("--topk", type=int, default=None, help="dynamic: children per expanded node.  [default: 4]")
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i is sampled with seed + i.")
@click.option("--ignore-eos/--respect-eos", default=True, show_default=True,
              help="Generate exactly --max-new-tokens per prompt (the default), or stop at end-of-sequence.")
@click.option("--json", "json_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write every figure (configs, per-prompt stats, machine) to this JSON file.")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Draw acceptance per depth and speedup per configuration to this image (needs matplotlib).")
@click.option("--compare-hf", is_flag=True,
              help="Also time transformers' generate on the same weights and prompts: greedy, prompt lookup (3 "
                   "tokens) and its MTP mode, and check their greedy ids against ours.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@friendly_errors
def bench(model, device, dtype, threads, prompts_file, num_prompts, max_new_tokens, drafts, num_draft_tokens, trees,
          depth, topk, temperature, top_k, top_p, seed, ignore_eos, json_file, plot_file, compare_hf, progress):
    """Measure MTP draft acceptance and speedup over plain decoding, on the same prompts in one run.

    Plain decoding and every configuration run on the same prompts, interleaved, each after one untimed
    warm-up generate. Greedy by default; with --temperature the acceptance is that of rejection sampling.

    \b
    Figures per configuration:
      acceptance   P(depth-d draft accepted | its parent accepted), per depth
      cumulative   P(at least d drafts accepted in a step): vLLM's rate
      tau          mean accepted length: tokens per trunk forward, bonus included
      histogram    drafted tokens accepted per step
      tok/s        wall-clock tokens per second of the generate calls
      speedup      tok/s over plain decoding's tok/s in the same run
      bound(free)  = tau: the speedup if drafting and verification were free
      tau*step     tau x plain decode-step time / this decode-step time: the
                   speedup implied by the measured acceptance and step cost
                   (prefill excluded)
      draft/verify/commit/other   shares of the engine's time
      =plain       greedy token ids equal plain decoding's on every prompt
    """
    from . import bench as bench_mod
    from .prompts import default_prompts, load_prompts, training_corpus

    if plot_file is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MTPRuntimeError("--plot needs matplotlib; install it with: pip install 'mtp-runtime[plot]'") from None
    for file in (json_file, plot_file):
        if file is not None and not file.resolve().parent.is_dir():
            raise MTPRuntimeError(f"cannot write {file}: folder {file.resolve().parent} does not exist")
    configs = bench_mod.sweep(drafts or bench_mod.DEFAULT_DRAFTS, _int_list(num_draft_tokens), list(trees) or None,
                              depth, topk)
    _check_request(max_new_tokens, "none", dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                                 num_draft_tokens=None, tree=None, depth=None, topk=None), ())
    runtime = _load(model, device, dtype, threads)
    if prompts_file is not None:
        prompts = load_prompts(prompts_file)
    else:
        roots, percent = training_corpus(runtime.path)
        prompts = default_prompts(num_prompts, roots=roots, percent=percent)
    report = bench_mod.run_bench(runtime, prompts, configs, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos, progress=progress)
    if compare_hf:
        bench_mod.compare_hf(runtime, report, progress=progress)
    click.echo(bench_mod.format_report(report))
    if json_file is not None:
        try:
            json_file.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise MTPRuntimeError(f"cannot write {json_file}: {exc}") from None
        click.echo(f"figures written to {json_file}", err=True)
    if plot_file is not None:
        bench_mod.plot_report(report, plot_file)
        click.echo(f"plot written to {plot_file}", err=True)


# ---------------------------------------------------------------------------------------------- info

def _layer_params(cfg, layer_idx: int) -> tuple[int, float]:
    """(total, active per token) parameters of decoder layer `layer_idx` (routed experts count k/E when active)."""
    h, heads, bias = cfg.hidden_size, cfg.num_attention_heads, int(cfg.attention_bias)
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = h * heads * cfg.qk_head_dim
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = (h + bias) * latent + cfg.kv_lora_rank + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + heads * cfg.v_head_dim * h + bias * h + 2 * h  # + o_proj, two norms
    if not cfg.is_moe_layer(layer_idx):
        return attn + 3 * h * cfg.intermediate_size, attn + 3 * h * cfg.intermediate_size
    experts = cfg.n_routed_experts
    routed = experts * 3 * h * cfg.moe_intermediate_size
    shared = 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
    gate = experts * h + (experts if cfg.topk_method == "noaux_tc" else 0)
    total = attn + routed + shared + gate
    return total, total - routed + routed * cfg.num_experts_per_tok / experts


def model_summary(folder: Path) -> dict:
    """Architecture, parameter counts, MTP depth, cache sizes and vocabulary of a model folder (weights optional)."""
    from .checkpoint import CheckpointFiles
    from .config import ModelConfig
    from .errors import CheckpointError
    from .text import load_tokenizer

    cfg = ModelConfig.from_file(folder / "config.json")
    n, h, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    try:
        files = CheckpointFiles(folder)
        depth, stored = files.mtp_layer_count(n), True
        own_head = depth > 0 and files.has_our_name("mtp.0.shared_head.head.weight", n)
        own_embedding = depth > 0 and files.has_our_name("mtp.0.embed_tokens.weight", n)
    except CheckpointError:  # config only: describe what the config promises
        depth, stored, own_head, own_embedding = cfg.num_nextn_predict_layers, False, True, True
    layers = [_layer_params(cfg, i) for i in range(n)]
    outer = vocab * h * (1 if cfg.tie_word_embeddings else 2) + h  # embedding, head, final norm
    mtp = [_layer_params(cfg, n + k) for k in range(depth)]
    # per MTP module: enorm, hnorm, shared_head.norm, eh_proj, and its own head / embedding copies when stored
    mtp_extra = 3 * h + 2 * h * h + vocab * h * (int(own_head) + int(own_embedding))
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(n))
    latent, expanded = cfg.latent_cache_bytes_per_token(2), cfg.expanded_cache_bytes_per_token(2)
    tokenizer = load_tokenizer(folder)
    rope = cfg.rope
    return {
        "model": str(folder), "model_type": cfg.model_type,
        "layers": {"total": n, "dense": n - moe_layers, "moe": moe_layers},
        "hidden_size": h, "vocab_size": vocab, "max_position_embeddings": cfg.max_position_embeddings,
        "attention": {"heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
                      "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
                      "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim},
        "moe": None if not cfg.n_routed_experts else {
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "shared_experts": cfg.n_shared_experts, "expert_intermediate_size": cfg.moe_intermediate_size,
            "dense_intermediate_size": cfg.intermediate_size, "first_k_dense_replace": cfg.first_k_dense_replace,
            "scoring_func": cfg.scoring_func, "topk_method": cfg.topk_method, "n_group": cfg.n_group,
            "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor},
        "rope": {"type": rope.type, "theta": rope.theta, **({"factor": rope.factor, "original_max_position_embeddings":
                 rope.original_max_position_embeddings, "mscale": rope.mscale, "mscale_all_dim": rope.mscale_all_dim}
                 if rope.type == "yarn" else {})},
        "parameters": {"total": outer + sum(t for t, _ in layers),
                       "active_per_token": round(outer + sum(a for _, a in layers)),
                       "mtp_total": sum(t for t, _ in mtp) + depth * mtp_extra,
                       "mtp_active_per_token": round(sum(a for _, a in mtp) + depth * mtp_extra)},
        "mtp_depth": depth, "mtp_modules_stored": stored,
        "cache_bytes_per_token": {"dtype": "bfloat16", "latent": latent, "expanded_kv": expanded,
                                  "ratio": expanded / latent},
        "tokenizer_vocab_size": len(tokenizer) if tokenizer is not None else None,
    }


def _count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def _format_summary(s: dict) -> str:
    a, m, p, c, r = s["attention"], s["moe"], s["parameters"], s["cache_bytes_per_token"], s["rope"]
    q = f"q_lora_rank {a['q_lora_rank']}" if a["q_lora_rank"] else "no q compression"
    rope = f"{r['type']}, theta {r['theta']:g}" + (
        f", factor {r['factor']:g} over {r['original_max_position_embeddings']} positions, mscale {r['mscale']:g}, "
        f"mscale_all_dim {r['mscale_all_dim']:g}" if r["type"] == "yarn" else "")
    rows = [
        ("model", s["model"]),
        ("type", s["model_type"]),
        ("layers", f"{s['layers']['total']} ({s['layers']['dense']} dense + {s['layers']['moe']} MoE), hidden "
                   f"{s['hidden_size']}, vocab {s['vocab_size']}, {s['max_position_embeddings']} positions"),
        ("attention", f"MLA, {a['heads']} heads, {q}, kv_lora_rank {a['kv_lora_rank']}, qk {a['qk_nope_head_dim']} "
                      f"nope + {a['qk_rope_head_dim']} rope, v {a['v_head_dim']}"),
        ("moe", "none (all layers dense)" if m is None else
         f"{m['routed_experts']} routed experts, top-{m['experts_per_token']}, {m['shared_experts']} shared, width "
         f"{m['expert_intermediate_size']} (dense {m['dense_intermediate_size']}); gate {m['scoring_func']}/"
         f"{m['topk_method']}, {m['n_group']} groups keep {m['topk_group']}, norm_topk_prob {m['norm_topk_prob']}, "
         f"scale {m['routed_scaling_factor']:g}"),
        ("rope", rope),
        ("parameters", f"{_count(p['total'])} total, {_count(p['active_per_token'])} active per token "
                       "(routed experts counted k/E)"),
        ("mtp", f"depth {s['mtp_depth']}{'' if s['mtp_modules_stored'] else ' (per config; no weights found)'}, "
                f"{_count(p['mtp_total'])} parameters, {_count(p['mtp_active_per_token'])} active per token"),
        ("cache/token", f"{c['latent']:,} B latent (c_kv + k_pe) vs {c['expanded_kv']:,} B decompressed K/V in "
                        f"{c['dtype']}: {c['ratio']:.1f}x smaller"),
        ("tokenizer", f"{s['tokenizer_vocab_size']} tokens" if s["tokenizer_vocab_size"]
         else "none (no tokenizer.json)"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "json_out", is_flag=True, help="Print the summary as one JSON object.")
@friendly_errors
def info(model, json_out):
    """Summarise a model folder (default: the shipped model): architecture, parameters, MTP depth, cache size.

    Reads config.json, the safetensors headers (no weights) and tokenizer.json, so it also works on the configs
    of models far too large to load here.
    """
    from . import DEFAULT_MODEL

    folder = model if model is not None else DEFAULT_MODEL
    if not folder.is_dir():
        what = "the shipped default model is missing at" if model is None else "model folder"
        raise MTPRuntimeError(f"{what} {folder}{'' if model is None else ' does not exist'}; pass a model folder")
    summary = model_summary(folder)
    click.echo(json.dumps(summary, indent=1) if json_out else _format_summary(summary))


@main.command()
@click.argument("corpus", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder: tokenizer, token arrays, train_state.pt (resume), train_log.jsonl; the model "
                   "is exported to OUT/model.")
@click.option("--steps", default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", default=16, show_default=True, help="Windows per step.")
@click.option("--context", default=256, show_default=True, help="Tokens per window seen by the MTP modules.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate (warmup then cosine to 10%).")
@click.option("--warmup", default=100, show_default=True, help="Warmup steps.")
@click.option("--vocab-size", default=2048, show_default=True, help="Byte-level BPE vocabulary size.")
@click.option("--num-mtp", default=3, show_default=True, help="Number of MTP modules (D).")
@click.option("--mtp-weight", default=0.3, show_default=True, help="lambda: weight of the mean MTP loss.")
@click.option("--mtp-weight-late", default=0.1, show_default=True,
              help="lambda after 70% of the steps (the V3 report's 0.3 -> 0.1).")
@click.option("--mtp-only", is_flag=True, help="Train only fresh MTP modules on the frozen trunk of --init.")
@click.option("--init", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Existing HF checkpoint folder whose trunk --mtp-only keeps.")
@click.option("--distill", is_flag=True,
              help="MTP targets are the trunk's own predictions (self-distillation) instead of the corpus.")
@click.option("--eval-every", default=200, show_default=True, help="Held-out evaluation interval (steps).")
@click.option("--save-every", default=100, show_default=True, help="Checkpoint interval (steps); rerun to resume.")
@click.option("--max-minutes", type=float, default=None, help="Stop (and export) after this much wall time.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--seed", default=0, show_default=True)
@click.option("--arch", "arch", multiple=True, metavar="KEY=VALUE",
              help="Override an architecture field of the default shape (repeatable), e.g. --arch hidden_size=128.")
@friendly_errors
def train(corpus, out_dir, steps, batch_size, context, lr, warmup, vocab_size, num_mtp, mtp_weight,
          mtp_weight_late, mtp_only, init, distill, eval_every, save_every, max_minutes, threads, seed, arch):
    """Train a small DeepSeek-V3-shaped model with MTP modules (or only MTP modules) on CORPUS.

    CORPUS: text files or folders (default: the running interpreter's standard-library Python sources).
    Whole files are held out by a stable hash of their path. Rerunning the same command resumes.
    """
    import torch

    from .train.trainer import Trainer, TrainSettings

    if threads:
        torch.set_num_threads(threads)
    settings = TrainSettings(
        out_dir=out_dir, corpus=list(corpus), steps=steps, batch_size=batch_size, context=context, lr=lr,
        warmup=warmup, vocab_size=vocab_size, num_mtp=num_mtp, mtp_weight=mtp_weight,
        mtp_weight_late=mtp_weight_late, mtp_only=mtp_only, init=init, distill=distill, eval_every=eval_every,
        save_every=save_every, max_minutes=max_minutes, seed=seed, arch_overrides=parse_arch(arch))
    folder = Trainer(settings).train()
    click.echo(f"model written to {folder}")


if __name__ == "__main__":
    main()
