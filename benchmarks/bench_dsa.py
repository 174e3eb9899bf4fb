"""DeepSeek Sparse Attention (DeepSeek-V3.2) benchmarks: parity with transformers, cache bytes per token, and the
attention time of one decoded token vs the context length, dense MLA vs DSA, on one random V3.2-shaped layer.

    python benchmarks/bench_dsa.py --threads 1 [--contexts 512,1024,...] [--repeats 5] [--json out.json]
        [--trained FOLDER --held-out-ids IDS.npy]

With --trained (a V3.2 folder, e.g. from `mtp-runtime train --indexer`) and its held-out token ids (the run's
data/held_out.npy), FP8 indexer keys are also measured on that model: held-out loss through the cache and greedy
continuations, FP8 vs full-precision keys.

Attention is timed on one attention layer of DeepSeek-V3.2-Exp's shape (hidden 7168, 128 heads, kv_lora_rank 512,
rope 64, q_lora_rank 1536; indexer 64 heads x 128, index_topk 2048) with random weights, over a cache filled with
random latents and indexer keys, float32 on the CPU. "core" is the context-dependent part of one decoded token:
dense: absorbed attention over every cached row; DSA: indexer query projection and scores over every cached key,
top-k selection, absorbed attention over the gathered rows (up to 2048 cached keys every key is selected and DSA
runs the dense path). "layer" is the whole attention forward (projections,
cache write, o_proj included). The four run interleaved, round after round, so that load from other processes
hits them alike; each figure is the minimum over --repeats rounds after a warm-up (the least disturbed), with the
median alongside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

import mtp_runtime
from mtp_runtime.cache_layout import CacheLayout
from mtp_runtime.config import ModelConfig
from mtp_runtime.model.indexer import select_top_k
from mtp_runtime.model.mla import MLA
from mtp_runtime.model.plan import AttentionPlan, causal_visibility
from mtp_runtime.model.rope import Rotary
from mtp_runtime.model.sparse_mla import SparseMLA

from bench_core import randomize_weights  # this folder: python benchmarks/bench_dsa.py puts it on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import PUBLISHED, machine_info, time_interleaved  # noqa: E402

V32_PUBLISHED = dict(PUBLISHED["DeepSeek-V3"], model_type="deepseek_v32", index_n_heads=64, index_head_dim=128,
                     index_topk=2048)
"""deepseek-ai/DeepSeek-V3.2-Exp's config.json: DeepSeek-V3's plus the indexer fields."""

# Tiny random reference models for the parity figures (index_topk well below the 12..44-token sequences).
TINY = dict(
    vocab_size=199, hidden_size=48, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    n_group=1, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True,
    index_n_heads=8, index_head_dim=16, index_topk=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
PARITY_CASES = {
    "topk 4": {},
    "topk 6, YaRN, grouped, dense layer 0": dict(index_topk=6, first_k_dense_replace=1, n_group=2, topk_group=1,
                                                 rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 64,
                                                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                                  "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
}


# ---------------------------------------------------------------------------------------------- parity


@torch.no_grad()
def build_reference(values: dict, folder: Path, seed: int) -> DeepseekV32ForCausalLM:
    config = DeepseekV32Config(**values)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(config).eval()
    randomize_weights(model, 0.15)
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def parity_rows(seed: int, new_tokens: int = 32) -> list[dict]:
    """Per case: max |logits - transformers'| over 2 x 44 tokens, and whether 32 greedy tokens are identical."""
    rows = []
    for name, overrides in PARITY_CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            reference = build_reference(dict(TINY, **overrides), Path(tmp), seed)
            rt = mtp_runtime.load(tmp)
            ids = torch.randint(0, TINY["vocab_size"], (2, 44), generator=torch.Generator().manual_seed(seed))
            diff = (rt.logits(ids).double() - reference(ids).logits.double()).abs().max().item()
            prompt = ids[0, :8].tolist()
            ours = rt.generate(input_ids=prompt, max_new_tokens=new_tokens, draft="none").token_ids
            theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 8, dtype=torch.long),
                                        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
            fp8 = fp8_agreement(rt, ids)
            rows.append({"case": name, "max_abs_logits_diff": diff, "greedy_identical": list(ours) == theirs,
                         "new_tokens": new_tokens, **fp8})
    return rows


def fp8_agreement(rt, ids: torch.Tensor) -> dict:
    """Prefill logits over a cache (the gathered path) with FP8 indexer keys vs float32 keys."""
    model, cfg = rt.model, rt.config
    logits = {}
    for fp8 in (False, True):
        cache = CacheLayout.for_config(cfg, fp8).allocate(cfg.num_hidden_layers, *ids.shape, torch.float32, "cpu")
        positions = torch.arange(ids.shape[1]).expand(*ids.shape)
        plan = AttentionPlan.over_cache(cache, positions, causal_visibility(*ids.shape, positions, 0))
        logits[fp8] = model.logits(model.forward_trunk(ids, plan))
    same = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
    return {"fp8_keys_max_abs_logits_diff": (logits[True] - logits[False]).abs().max().item(),
            "fp8_keys_argmax_agreement": same}


def parity_table(rows: list[dict]) -> str:
    lines = ["| case | max abs logits diff (fp32) | 32 greedy tokens identical | FP8 keys: max abs logits diff | "
             "FP8 keys: argmax agreement |", "|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['max_abs_logits_diff']:.1e} | {'yes' if r['greedy_identical'] else 'NO'} "
                     f"| {r['fp8_keys_max_abs_logits_diff']:.1e} | {100 * r['fp8_keys_argmax_agreement']:.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- cache size


def cache_rows(capacity: int = 1024) -> list[dict]:
    """Bytes per token of allocated bf16 caches for the published DeepSeek-V3.2 config (61 layers)."""
    cfg = ModelConfig.from_dict(V32_PUBLISHED)
    layouts = {"latent only (dense MLA, as V3)": CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim),
               "latent + indexer keys, bf16": CacheLayout.for_config(cfg),
               "latent + indexer keys, FP8 + scales": CacheLayout.for_config(cfg, index_fp8=True)}
    rows = []
    for name, layout in layouts.items():
        cache = layout.allocate(cfg.num_hidden_layers, 1, capacity, torch.bfloat16, "cpu")
        tensors = [cache.latent] + ([cache.index.keys] + ([cache.index.scales] if cache.index.fp8 else [])
                                    if cache.index is not None else [])
        measured = sum(t.nbytes for t in tensors) // capacity
        rows.append({"layout": name, "bytes_per_token": measured, "reported": cache.bytes_per_token()})
    return rows


def cache_table(rows: list[dict]) -> str:
    base = rows[0]["bytes_per_token"]
    lines = ["| cache (DeepSeek-V3.2, 61 layers, bf16) | bytes per token | vs latent only |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['bytes_per_token']:,} | {r['bytes_per_token'] / base:.3f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- attention


@torch.no_grad()
def v32_layer(seed: int) -> SparseMLA:
    """One attention layer of DeepSeek-V3.2-Exp's shape with random weights (std 0.02; norms 1)."""
    cfg = ModelConfig.from_dict(dict(V32_PUBLISHED, num_hidden_layers=1))
    torch.manual_seed(seed)
    with torch.device("meta"):
        layer = SparseMLA(cfg, 0)
    layer.to_empty(device="cpu")
    for name, param in layer.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02)
    return layer.eval()


class Context:
    """A one-token decode step of `layer` after `length` cached tokens: cache, plan, rope tables, inputs."""

    def __init__(self, layer: SparseMLA, cfg: ModelConfig, length: int, seed: int, fp8: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.cache = CacheLayout.for_config(cfg, fp8).allocate(1, 1, length + 1, torch.float32, "cpu")
        self.cache.latent.copy_(torch.randn(self.cache.latent.shape, generator=g))
        keys = torch.randn(1, 1, length + 1, cfg.indexer.head_dim, generator=g)
        self.cache.index.write(0, torch.arange(length + 1)[None], keys[0])
        self.cache.lengths.fill_(length)
        self.plan = AttentionPlan.over_cache(self.cache, self.cache.lengths[:, None].clone(),
                                             torch.ones(1, 1, 1, dtype=torch.bool))
        self.rope = Rotary(cfg.rope, cfg.qk_rope_head_dim).tables(self.plan.positions, torch.float32, matrices=True)
        self.hidden = torch.randn(1, 1, cfg.hidden_size, generator=g)
        self.layer = layer
        q_latent = layer.q_a_layernorm(layer.q_a_proj(self.hidden))
        q = layer.q_b_proj(q_latent).view(1, 1, layer.num_heads, -1)
        self.q_latent, self.q_nope = q_latent, q[..., : layer.nope_dim]
        self.q_pe = self.rope.rotate(q[..., layer.nope_dim:])
        self.keys = self.cache.read(0, self.plan.span)
        self.plan.head_bias(layer.num_heads, torch.float32)  # built once per forward for every layer: not timed

    def dense_core(self) -> torch.Tensor:
        return self.layer._absorbed(self.q_nope, self.q_pe, self.keys, self.plan)

    def selection(self) -> torch.Tensor:
        indexer = self.layer.indexer
        queries, weights = indexer.queries(self.q_latent, self.hidden, self.rope)
        index_keys = self.cache.index.read(0, self.plan.span)
        return select_top_k(indexer.scores(queries, weights, index_keys, self.plan.mask), indexer.topk)

    def sparse_core(self) -> torch.Tensor:
        if self.plan.span <= self.layer.indexer.topk:  # every key is selected: the layer attends densely
            return self.dense_core()
        slots = self.selection()
        return self.layer._gathered(self.q_nope, self.q_pe, self.keys, slots, self.plan.mask.gather(-1, slots))

    def dense_layer(self) -> torch.Tensor:
        return MLA.forward(self.layer, self.hidden, self.plan, self.rope)

    def sparse_layer(self) -> torch.Tensor:
        return self.layer(self.hidden, self.plan, self.rope)




@torch.no_grad()
def attention_rows(contexts: list[int], repeats: int, seed: int, max_seconds: float) -> list[dict]:
    layer = v32_layer(seed)
    cfg = ModelConfig.from_dict(dict(V32_PUBLISHED, num_hidden_layers=1))
    rows, start = [], time.perf_counter()
    for length in contexts:
        if time.perf_counter() - start > max_seconds:
            print(f"(stopping before context {length}: --max-seconds {max_seconds:g} spent)", file=sys.stderr)
            break
        ctx = Context(layer, cfg, length, seed)
        names = ("dense_core", "sparse_core", "dense_layer", "sparse_layer")
        seconds, _ = time_interleaved({name: getattr(ctx, name) for name in names}, repeats)
        row = {"context": length}
        for name in names:
            row[name] = {"min_ms": 1e3 * min(seconds[name]), "median_ms": 1e3 * statistics.median(seconds[name])}
        row.update(fp8_selection(layer, cfg, ctx, length, seed))
        rows.append(row)
        print(f"context {length}: dense core {row['dense_core']['min_ms']:.2f} ms, DSA core "
              f"{row['sparse_core']['min_ms']:.2f} ms", file=sys.stderr)
    return rows


def fp8_selection(layer: SparseMLA, cfg: ModelConfig, ctx: Context, length: int, seed: int) -> dict:
    """Share of the top-k chosen with float32 indexer keys that FP8-stored keys choose too (None: no selection)."""
    if length <= cfg.indexer.topk:
        return {"fp8_overlap": None}
    fp8 = Context(layer, cfg, length, seed, fp8=True)
    full_slots, fp8_slots = set(ctx.selection()[0, 0].tolist()), set(fp8.selection()[0, 0].tolist())
    return {"fp8_overlap": len(full_slots & fp8_slots) / len(full_slots)}


def attention_table(rows: list[dict]) -> str:
    lines = ["| context | dense core ms (median) | DSA core ms (median) | core speedup | dense layer ms | DSA layer ms | "
             "layer speedup | FP8 keys: top-k overlap |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dc, sc, dl, sl = (r[k]["min_ms"] for k in ("dense_core", "sparse_core", "dense_layer", "sparse_layer"))
        overlap = "-" if r["fp8_overlap"] is None else f"{100 * r['fp8_overlap']:.1f}%"
        lines.append(f"| {r['context']:,} | {dc:.2f} ({r['dense_core']['median_ms']:.2f}) | {sc:.2f} "
                     f"({r['sparse_core']['median_ms']:.2f}) | {dc / sc:.2f}x | {dl:.1f} | {sl:.1f} | {dl / sl:.2f}x | "
                     f"{overlap} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- FP8 keys, trained


@torch.no_grad()
def trained_fp8_rows(folder: Path, held_out: Path, windows: int = 32, length: int = 256, prompts: int = 8,
                     new_tokens: int = 64, seed: int = 0) -> dict:
    """Held-out next-token loss through the cache (a prefill of each window) and greedy continuations of held-out
    prompts, with FP8 indexer keys vs keys in the model's dtype."""
    import numpy as np

    ids = np.load(held_out)
    starts = np.random.default_rng(seed).integers(0, len(ids) - length - 1, size=windows)
    batch = torch.from_numpy(np.stack([ids[i: i + length + 1].astype(np.int64) for i in starts]))
    out = {}
    continuations = {}
    for fp8 in (False, True):
        rt = mtp_runtime.load(folder, index_keys_fp8=fp8)
        model, cfg = rt.model, rt.config
        losses = []
        for chunk in batch.split(8):
            cache = rt.cache_layout.allocate(cfg.num_hidden_layers, chunk.shape[0], length, torch.float32, "cpu")
            positions = torch.arange(length).expand(chunk.shape[0], length)
            plan = AttentionPlan.over_cache(cache, positions, causal_visibility(chunk.shape[0], length, positions, 0),
                                            impl="expanded")
            logits = model.logits(model.forward_trunk(chunk[:, :-1], plan))
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item())
        out["fp8" if fp8 else "full"] = sum(losses) / len(losses)
        starts_p = batch[:prompts, :64].tolist()
        continuations[fp8] = [r.token_ids for r in rt.generate(input_ids=starts_p, max_new_tokens=new_tokens,
                                                                draft="none", ignore_eos=True)]
    same = sum(a == b for x, y in zip(continuations[False], continuations[True]) for a, b in zip(x, y))
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
             for x, y in zip(continuations[False], continuations[True])]
    return {"topk": mtp_runtime.load(folder).config.indexer.topk, "windows": windows, "length": length,
            "loss_full": out["full"], "loss_fp8": out["fp8"], "prompts": prompts, "new_tokens": new_tokens,
            "same_positions": same / (prompts * new_tokens), "identical_prefix": first}


def trained_fp8_table(r: dict) -> str:
    return "\n".join([
        f"| indexer keys | held-out loss ({r['windows']} windows x {r['length']} tokens, index_topk {r['topk']}) |",
        "|---|---:|", f"| model dtype | {r['loss_full']:.4f} |", f"| FP8 + scales | {r['loss_fp8']:.4f} |", "",
        f"Greedy, {r['prompts']} held-out prompts x {r['new_tokens']} tokens: {100 * r['same_positions']:.1f}% of "
        f"positions equal; tokens identical before the first difference: {r['identical_prefix']}"])


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192,16384,32768,65536",
                        help="comma-separated context lengths for the attention timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="start no further context length once the attention timing has run this long")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-attention", action="store_true", help="only the parity and cache tables")
    parser.add_argument("--trained", type=Path, help="a trained V3.2 folder to measure FP8 indexer keys on")
    parser.add_argument("--held-out-ids", type=Path, help="its held-out token ids (.npy), with --trained")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine_info()}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    results["parity"] = parity_rows(args.seed)
    print("\n## Parity with transformers' DeepseekV32ForCausalLM (fp32)\n\n" + parity_table(results["parity"]))
    results["cache"] = cache_rows()
    print("\n## Cache bytes per token\n\n" + cache_table(results["cache"]))
    if not args.skip_attention:
        contexts = [int(c) for c in args.contexts.split(",")]
        results["attention"] = attention_rows(contexts, args.repeats, args.seed, args.max_seconds)
        print("\n## Attention per decoded token, one V3.2-shaped layer, index_topk 2048 (fp32, ms)\n\n"
              + attention_table(results["attention"]))
    if args.trained is not None:
        results["trained_fp8"] = trained_fp8_rows(args.trained, args.held_out_ids)
        print(f"\n## FP8 indexer keys on {args.trained}\n\n" + trained_fp8_table(results["trained_fp8"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
