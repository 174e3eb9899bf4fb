"""One rank of the 2-rank gloo runs in test_distributed.py, started with torchrun's environment variables.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_worker.py MODEL_A MODEL_B OUT_DIR

Runs `run_cases` (also the single-process reference in the test) and writes OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mtp_runtime import Runtime

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2, 30, 8]]
NEW_TOKENS = 24
GENERATE_CASES = {
    "plain": dict(draft="none"),
    "chain": dict(draft="chain", num_draft_tokens=2),
    "tree": dict(draft="tree", tree="2,1"),
    "dynamic": dict(draft="dynamic", num_draft_tokens=6, depth=3, draft_topk=2),
    "sampled": dict(draft="chain", num_draft_tokens=2, temperature=0.8, seed=5),
}


def run_cases(main: Runtime, plain_q: Runtime) -> dict:
    """Logits, generated ids (one prompt and a batch) and chain acceptance of both models."""
    out = {"logits": main.logits(PROMPTS[0]), "logits_q_proj": plain_q.logits(PROMPTS[1])}
    for name, kwargs in GENERATE_CASES.items():
        out[name] = main.generate(input_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS, **kwargs).token_ids
    batch = main.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS, draft="chain", num_draft_tokens=2)
    out["batch_chain"] = [r.token_ids for r in batch]
    out["chain_accepted_length"] = main.generate(input_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS, draft="chain",
                                                 num_draft_tokens=2).stats.mean_accepted_length
    out["q_proj_tree"] = plain_q.generate(input_ids=PROMPTS[1], max_new_tokens=NEW_TOKENS, draft="tree",
                                          tree="2,1").token_ids
    out["unseeded_sample"] = main.generate(input_ids=PROMPTS[0], max_new_tokens=NEW_TOKENS, draft="chain",
                                           temperature=1.0).token_ids
    return out


def parameter_counts(runtime: Runtime) -> dict[str, int]:
    """Elements held by this process in the split parts of the first MoE layer, the dense layer and MTP 0."""
    model = runtime.model
    dense, moe, mtp = model.model.layers[0], model.model.layers[1], model.mtp[0]
    attn = moe.self_attn
    return {
        "q_b_proj": attn.q_b_proj.weight.numel(), "kv_b_proj": attn.kv_b_proj.weight.numel(),
        "o_proj": attn.o_proj.weight.numel(), "q_a_proj": attn.q_a_proj.weight.numel(),
        "routed_experts": sum(p.numel() for p in moe.mlp.experts.parameters()),
        "shared_experts": sum(p.numel() for p in moe.mlp.shared_experts.parameters()),
        "gate": moe.mlp.gate.weight.numel(), "dense_mlp": sum(p.numel() for p in dense.mlp.parameters()),
        "mtp_kv_b_proj": mtp.self_attn.kv_b_proj.weight.numel(),
        "mtp_experts": sum(p.numel() for p in mtp.mlp.experts.parameters()),
    }


def main(model_a: str, model_b: str, out_dir: str) -> None:
    from mtp_runtime.parallel import close, init_from_env

    torch.set_num_threads(1)
    group = init_from_env("cpu")
    try:
        main_rt = Runtime.from_folder(model_a, device="cpu", parallel=group)
        plain_q = Runtime.from_folder(model_b, device="cpu", parallel=group)
        result = run_cases(main_rt, plain_q)
        result["counts"] = parameter_counts(main_rt)
        torch.save(result, Path(out_dir) / f"rank{group.rank}.pt")
    finally:
        close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
