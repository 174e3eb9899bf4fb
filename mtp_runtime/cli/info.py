"""`mtp-runtime info`: a model folder's architecture (the sparse-attention indexer included), parameter counts, MTP
depth and cache size."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import MTPRuntimeError
from .common import friendly_errors


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "json_out", is_flag=True, help="Print the summary as one JSON object.")
@friendly_errors
def info(model, json_out):
    """Summarise a model folder (default: the shipped model): architecture, parameters, MTP depth, cache size.

    Reads config.json, the safetensors headers (no weights) and tokenizer.json, so it also works on the configs
    of models far too large to load here.
    """
    from .. import DEFAULT_MODEL
    from ..summary import model_summary

    folder = model if model is not None else DEFAULT_MODEL
    if not folder.is_dir():
        what = "the shipped default model is missing at" if model is None else "model folder"
        raise MTPRuntimeError(f"{what} {folder}{'' if model is None else ' does not exist'}; pass a model folder")
    summary = model_summary(folder)
    click.echo(json.dumps(summary, indent=1) if json_out else format_summary(summary))


def format_summary(s: dict) -> str:
    """model_summary() as aligned 'name  value' lines."""
    p, c = s["parameters"], s["cache_bytes_per_token"]
    rows = [
        ("model", s["model"]),
        ("type", s["model_type"]),
        ("layers", f"{s['layers']['total']} ({s['layers']['dense']} dense + {s['layers']['moe']} MoE), hidden "
                   f"{s['hidden_size']}, vocab {s['vocab_size']}, {s['max_position_embeddings']} positions"),
        ("attention", _attention(s["attention"])),
        *([("indexer", _indexer(s["indexer"]))] if s["indexer"] else []),
        ("moe", _moe(s["moe"])),
        ("rope", _rope(s["rope"])),
        ("parameters", f"{_count(p['total'])} total, {_count(p['active_per_token'])} active per token "
                       "(routed experts counted k/E)"),
        ("mtp", f"depth {s['mtp_depth']}{'' if s['mtp_modules_stored'] else ' (per config; no weights found)'}, "
                f"{_count(p['mtp_total'])} parameters, {_count(p['mtp_active_per_token'])} active per token"),
        ("cache/token", _cache(c)),
        ("tokenizer", f"{s['tokenizer_vocab_size']} tokens" if s["tokenizer_vocab_size"]
         else "none (no tokenizer.json)"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def _attention(a: dict) -> str:
    q = f"q_lora_rank {a['q_lora_rank']}" if a["q_lora_rank"] else "no q compression"
    return (f"MLA, {a['heads']} heads, {q}, kv_lora_rank {a['kv_lora_rank']}, qk {a['qk_nope_head_dim']} "
            f"nope + {a['qk_rope_head_dim']} rope, v {a['v_head_dim']}")


def _indexer(i: dict) -> str:
    return (f"DeepSeek Sparse Attention: each query attends to its top {i['topk']} keys by a lightning indexer of "
            f"{i['heads']} heads x {i['head_dim']} ({_count(i['parameters_per_layer'])} parameters per layer)")


def _cache(c: dict) -> str:
    if not c["index_keys"]:
        return (f"{c['latent']:,} B latent (c_kv + k_pe) vs {c['expanded_kv']:,} B decompressed K/V in {c['dtype']}: "
                f"{c['ratio']:.1f}x smaller")
    return (f"{c['total']:,} B = {c['latent']:,} B latent (c_kv + k_pe) + {c['index_keys']:,} B indexer keys "
            f"({c['index_keys_fp8']:,} B in FP8) vs {c['expanded_kv']:,} B decompressed K/V in {c['dtype']}: "
            f"{c['ratio']:.1f}x smaller")


def _moe(m: dict | None) -> str:
    if m is None:
        return "none (all layers dense)"
    return (f"{m['routed_experts']} routed experts, top-{m['experts_per_token']}, {m['shared_experts']} shared, "
            f"width {m['expert_intermediate_size']} (dense {m['dense_intermediate_size']}); gate "
            f"{m['scoring_func']}/{m['topk_method']}, {m['n_group']} groups keep {m['topk_group']}, norm_topk_prob "
            f"{m['norm_topk_prob']}, scale {m['routed_scaling_factor']:g}")


def _rope(r: dict) -> str:
    text = f"{r['type']}, theta {r['theta']:g}"
    if r["type"] != "yarn":
        return text
    return (text + f", factor {r['factor']:g} over {r['original_max_position_embeddings']} positions, mscale "
            f"{r['mscale']:g}, mscale_all_dim {r['mscale_all_dim']:g}")


def _count(value: float) -> str:
    """A parameter count with a B / M / K suffix."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))
