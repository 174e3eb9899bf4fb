"""Core benchmarks: MLA latent vs expanded KV-cache size for published DeepSeek configs, and plain greedy
decoding speed of mtp_runtime vs transformers on a tiny random DeepSeek-V3 checkpoint (CPU, fp32).

    python benchmarks/bench_core.py [--new-tokens 128] [--repeats 3] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import mtp_runtime
from mtp_runtime.config import ModelConfig

YARN_40X = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "rope_theta": 10000.0}

# Published config.json values (deepseek-ai/DeepSeek-V3, deepseek-ai/DeepSeek-V2-Lite).
PUBLISHED = {
    "DeepSeek-V3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        first_k_dense_replace=3, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        rope_scaling=dict(YARN_40X, mscale=1.0, mscale_all_dim=1.0)),
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, max_position_embeddings=163840,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        rope_scaling=dict(YARN_40X, mscale=0.707, mscale_all_dim=0.707)),
}

# The decode benchmark's random model: bigger than the tests', still seconds on a laptop CPU.
TINY_V3 = dict(
    vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=0,
    bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def machine_info() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


def cache_rows() -> list[dict]:
    """Latent vs expanded bf16 cache bytes per token for each published config."""
    rows = []
    for name, raw in PUBLISHED.items():
        config = ModelConfig.from_dict(raw)
        latent, expanded = config.latent_cache_bytes_per_token(2), config.expanded_cache_bytes_per_token(2)
        rows.append({"model": name, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                     "latent_bytes": latent, "expanded_bytes": expanded, "ratio": expanded / latent})
    return rows


def cache_table(rows: list[dict]) -> str:
    lines = ["| model | layers | heads | latent B/token (bf16) | expanded K+V B/token (bf16) | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['heads']} | {r['latent_bytes']:,} "
                     f"({r['latent_bytes'] / 1024:.1f} KiB) | {r['expanded_bytes']:,} "
                     f"({r['expanded_bytes'] / 2**20:.2f} MiB) | {r['ratio']:.1f}x |")
    return "\n".join(lines)


@torch.no_grad()
def build_tiny_v3(folder: Path, seed: int) -> DeepseekV3ForCausalLM:
    """A random V3 with non-flat logits and varied routing, saved to `folder`."""
    config = DeepseekV3Config(**TINY_V3)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    randomize_weights(model, 0.08)
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def randomize_weights(model, scale: float) -> None:
    """Norms near 1, other weights N(0, scale), gate biases N(0, 0.1): non-flat logits and varied routing."""
    for name, param in model.named_parameters():
        noise = torch.randn_like(param)
        param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.1 * torch.randn_like(buf))


def time_interleaved(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Wall seconds of each fn over `repeats` rounds (one warm-up call each first), and each fn's last tokens.

    Rounds alternate between the fns so that load from other processes hits them alike.
    """
    tokens = {name: fn() for name, fn in fns.items()}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            tokens[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, tokens


def decode_bench(new_tokens: int, repeats: int, prompt_len: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_v3(Path(tmp), seed)
        rt = mtp_runtime.load(tmp)
        return _compare(rt, model, new_tokens, repeats, prompt_len, seed)


def _compare(rt, model, new_tokens: int, repeats: int, prompt_len: int, seed: int) -> dict:
    prompt = torch.randint(0, TINY_V3["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.tolist()

    def ours() -> list[int]:
        return list(rt.generate(input_ids=prompt, max_new_tokens=new_tokens, draft="none").token_ids)

    def theirs() -> list[int]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    seconds, tokens = time_interleaved({"mtp_runtime": ours, "transformers": theirs}, repeats)
    result = {"new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats}
    for engine, runs in seconds.items():
        result[engine] = {"seconds": runs, "median_tok_s": new_tokens / statistics.median(runs)}
    result["speedup"] = result["mtp_runtime"]["median_tok_s"] / result["transformers"]["median_tok_s"]
    result["identical_tokens"] = tokens["mtp_runtime"] == tokens["transformers"]
    result["first_mismatch"] = _first_mismatch(tokens["mtp_runtime"], tokens["transformers"])
    return result


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def decode_table(r: dict) -> str:
    lines = ["| engine | median tok/s | runs (s) |", "|---|---:|---|"]
    for engine in ("mtp_runtime", "transformers"):
        runs = ", ".join(f"{s:.3f}" for s in r[engine]["seconds"])
        lines.append(f"| {engine} | {r[engine]['median_tok_s']:.1f} | {runs} |")
    lines.append("")
    lines.append(f"speedup (ours / transformers): {r['speedup']:.2f}x; token ids identical: "
                 f"{'yes' if r['identical_tokens'] else 'NO, first mismatch at ' + str(r['first_mismatch'])}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-decode", action="store_true", help="only print the cache-size table")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine_info(), "cache": cache_rows()}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    print("\n## KV cache per token\n\n" + cache_table(results["cache"]))
    if not args.skip_decode:
        results["decode"] = decode_bench(args.new_tokens, args.repeats, args.prompt_len, args.seed)
        print(f"\n## Greedy decode, tiny random DeepSeek-V3 ({args.new_tokens} new tokens, fp32, CPU)\n")
        print(decode_table(results["decode"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
