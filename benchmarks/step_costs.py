"""What one decoding step's pieces cost: a trunk forward over n tree nodes against a plain one-token step, and one
MTP depth (a module pass with its head) against one trunk decoder layer, eager and compiled.

    python benchmarks/step_costs.py [--model FOLDER] [--context 256] [--nodes 1,2,4,8,16] [--json out.json]

Each figure is the fastest of several timed rounds after warm-up calls (minima resist the noise of a shared
machine). Trees are chains (every node sees its ancestors), against `--context` committed cache entries. The n
nodes are n consecutive tokens of the first held-out prompt (`--tokens text`, the default) or random ids
(`--tokens random`): the tokens choose the routed experts, and a forward's cost follows the weight bytes it reads,
so each trunk figure comes with the distinct routed experts per MoE layer it used (random ids route nearly
uniformly and use more of them than text does). One decoder layer's cost is (trunk forward - head) / layers,
the head being timed alone. The MTP depth is module 1's pass of a chain step: the appended slots of the previous
step (chain depth + 1 of them) and its draft node, then its head on that node.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mtp_runtime
from mtp_runtime.cache import LatentCache
from mtp_runtime.compiled import CompiledForwards
from mtp_runtime.forwards import Forwards
from mtp_runtime.model.moe import Gate
from mtp_runtime.model.plan import AttentionPlan, causal_visibility
from mtp_runtime.prompts import default_prompts


def fastest(fn, calls: int = 20, rounds: int = 5) -> float:
    """Seconds per call: the best round's mean."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def chain_plan(cache: LatentCache, n: int, start: int = 0) -> AttentionPlan:
    positions = cache.lengths[:, None] + torch.arange(n)
    return AttentionPlan.over_cache(cache, positions, causal_visibility(1, n, positions, start), start=start)


def node_tokens(runtime, source: str, nodes: list[int]):
    """n -> [1, n] token ids: n consecutive tokens of the first held-out prompt (encoded once), or random ids."""
    if source == "random":
        return lambda n: torch.randint(0, runtime.config.vocab_size, (1, n))
    text = runtime.encode(default_prompts(1)[0])
    if len(text) < max(nodes):
        raise SystemExit(f"the first held-out prompt has {len(text)} tokens, fewer than {max(nodes)}; "
                         "use --tokens random")
    return lambda n: torch.tensor(text[:n])[None]


def experts_used(model, tokens: torch.Tensor, plan: AttentionPlan) -> float | None:
    """Mean distinct routed experts per trunk MoE layer in one eager forward over tokens (None without MoE)."""
    counts = []
    hooks = [m.register_forward_hook(lambda _m, _x, out: counts.append(out[1].unique().numel()))
             for m in model.model.modules() if isinstance(m, Gate)]
    with torch.inference_mode():
        model.forward_trunk(tokens, plan)
    for hook in hooks:
        hook.remove()
    return sum(counts) / len(counts) if counts else None


def measure(forwards: Forwards, context: int, nodes: list[int], chain_depth: int, tokens_of) -> dict:
    model = forwards.model
    cfg = model.config
    capacity = context + max(nodes) + 8
    trunk = LatentCache(cfg.num_hidden_layers, 1, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                        initial_length=context)
    figures = {"trunk_ms": {}, "experts_per_layer": {}}
    for n in nodes:
        tokens = tokens_of(n)
        plan = chain_plan(trunk, n)
        figures["experts_per_layer"][n] = experts_used(model, tokens, plan)
        with torch.inference_mode():
            figures["trunk_ms"][n] = fastest(lambda: forwards.trunk(tokens, plan)) * 1e3
    with torch.inference_mode():
        hidden = torch.randn(1, 1, cfg.hidden_size)
        head = fastest(lambda: model.logits(hidden)) * 1e3
        figures["head_ms"] = head
        figures["layer_ms"] = (figures["trunk_ms"][1] - head) / cfg.num_hidden_layers
        if model.num_mtp:
            mtp = LatentCache(1, 1, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim, initial_length=context)
            n = chain_depth + 2  # the appended slots, then the depth-1 node
            tokens = torch.randint(0, cfg.vocab_size, (1, n))
            prev = torch.randn(1, n, cfg.hidden_size)
            plan = chain_plan(mtp, n, start=1)
            depth = lambda: model.mtp_logits(0, forwards.mtp(0, prev, tokens, plan)[:, -1:])
            figures["mtp_depth_ms"] = fastest(depth) * 1e3
    plain = figures["trunk_ms"][1]
    figures["verify_over_plain"] = {n: t / plain for n, t in figures["trunk_ms"].items()}
    if "mtp_depth_ms" in figures:
        figures["mtp_depth_over_layer"] = figures["mtp_depth_ms"] / figures["layer_ms"]
        figures["mtp_depth_over_trunk"] = figures["mtp_depth_ms"] / plain
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--nodes", default="1,2,4,8,16")
    parser.add_argument("--chain-depth", type=int, default=3, help="the chain whose step the MTP pass belongs to")
    parser.add_argument("--tokens", choices=("text", "random"), default="text",
                        help="the verified nodes' token ids: held-out text (default) or random")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runtime = mtp_runtime.load(args.model, threads=1)
    torch.set_num_threads(runtime.threads)
    nodes = [int(n) for n in args.nodes.split(",")]
    results = {"model": str(runtime.path), "threads": runtime.threads, "context": args.context,
               "tokens": args.tokens}
    tokens_of = node_tokens(runtime, args.tokens, nodes)
    modes = [("eager", Forwards(runtime.model))] + ([] if args.no_compile else
                                                     [("compiled", CompiledForwards(runtime.model))])
    for name, forwards in modes:
        start = time.perf_counter()
        results[name] = measure(forwards, args.context, nodes, args.chain_depth, tokens_of)
        results[name]["wall_s"] = time.perf_counter() - start
        if forwards.compiled:
            results[name]["compile_s"] = forwards.compile_seconds
        r = results[name]
        experts = r["experts_per_layer"]
        print(f"{name}: plain step {r['trunk_ms'][1]:.2f} ms; verify over n nodes / plain: "
              + ", ".join(f"n={n} {x:.2f}x" + (f" ({experts[n]:.1f} experts/layer)" if experts[n] else "")
                          for n, x in r["verify_over_plain"].items())
              + f"; layer {r['layer_ms']:.3f} ms, head {r['head_ms']:.3f} ms"
              + (f"; one MTP depth {r['mtp_depth_ms']:.3f} ms = {r['mtp_depth_over_layer']:.2f} layers = "
                 f"{r['mtp_depth_over_trunk']:.3f} trunk steps" if "mtp_depth_ms" in r else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
