"""Architecture summary of a model folder with total and active parameter counts (what `mtp-runtime info` shows).

Everything comes from config.json, the safetensors headers (tensor names, never the weights) and tokenizer.json,
so it works on the configs of models far too large to load here.
"""

from __future__ import annotations

from pathlib import Path


def attention_params(cfg) -> int:
    """Parameters of one MLA block: q (LoRA-compressed or not), the kv latent path, o_proj and the layer's norms."""
    h, heads, bias = cfg.hidden_size, cfg.num_attention_heads, int(cfg.attention_bias)
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = h * heads * cfg.qk_head_dim
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = (h + bias) * latent + cfg.kv_lora_rank + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + heads * cfg.v_head_dim * h + bias * h + 2 * h + indexer_params(cfg)  # + o_proj, two norms


def indexer_params(cfg) -> int:
    """Parameters of one sparse-attention indexer (0 without): wq_b, wk, the key LayerNorm and weights_proj."""
    if cfg.indexer is None:
        return 0
    heads, dim = cfg.indexer.n_heads, cfg.indexer.head_dim
    return cfg.q_lora_rank * heads * dim + cfg.hidden_size * dim + 2 * dim + cfg.hidden_size * heads


def layer_params(cfg, layer_idx: int) -> tuple[int, float]:
    """(total, active per token) parameters of decoder layer `layer_idx` (routed experts count k/E when active)."""
    h, attn = cfg.hidden_size, attention_params(cfg)
    if not cfg.is_moe_layer(layer_idx):
        return attn + 3 * h * cfg.intermediate_size, attn + 3 * h * cfg.intermediate_size
    experts = cfg.n_routed_experts
    routed = experts * 3 * h * cfg.moe_intermediate_size
    shared = 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
    gate = experts * h + (experts if cfg.topk_method == "noaux_tc" else 0)
    total = attn + routed + shared + gate
    return total, total - routed + routed * cfg.num_experts_per_tok / experts


def parameter_counts(cfg, mtp) -> dict:
    """Total and active-per-token parameters of the trunk and of the MTP modules."""
    n, h, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    layers = [layer_params(cfg, i) for i in range(n)]
    outer = vocab * h * (1 if cfg.tie_word_embeddings else 2) + h  # embedding, head, final norm
    modules = [layer_params(cfg, n + k) for k in range(mtp.depth)]
    # per MTP module: enorm, hnorm, shared_head.norm, eh_proj, and its own head / embedding copies when stored
    extra = 3 * h + 2 * h * h + vocab * h * (int(mtp.own_head) + int(mtp.own_embedding))
    return {"total": outer + sum(t for t, _ in layers),
            "active_per_token": round(outer + sum(a for _, a in layers)),
            "mtp_total": sum(t for t, _ in modules) + mtp.depth * extra,
            "mtp_active_per_token": round(sum(a for _, a in modules) + mtp.depth * extra)}


def model_summary(path: Path) -> dict:
    """Architecture, parameter counts, MTP depth, cache sizes and vocabulary of a model folder (weights optional)."""
    from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointFiles, mtp_layout, open_folder
    from .text import load_tokenizer

    folder = open_folder(path)
    cfg = folder.config
    has_weights = (folder.path / SINGLE_FILE).is_file() or (folder.path / INDEX_FILE).is_file()
    mtp = mtp_layout(folder, CheckpointFiles(folder.path) if has_weights else None)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    latent, expanded = cfg.latent_cache_bytes_per_token(2), cfg.expanded_cache_bytes_per_token(2)
    index_keys = cfg.index_key_bytes_per_token(2)
    tokenizer = load_tokenizer(folder.path)
    return {
        "model": str(folder.path), "model_type": cfg.model_type,
        "layers": {"total": cfg.num_hidden_layers, "dense": cfg.num_hidden_layers - moe_layers, "moe": moe_layers},
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention": _attention(cfg), "indexer": _indexer(cfg), "moe": _moe(cfg), "rope": _rope(cfg),
        "parameters": parameter_counts(cfg, mtp),
        "mtp_depth": mtp.depth, "mtp_modules_stored": mtp.stored,
        "cache_bytes_per_token": {"dtype": "bfloat16", "latent": latent, "index_keys": index_keys,
                                  "index_keys_fp8": cfg.index_key_bytes_per_token(fp8=True),
                                  "total": latent + index_keys, "expanded_kv": expanded,
                                  "ratio": expanded / (latent + index_keys)},
        "tokenizer_vocab_size": len(tokenizer) if tokenizer is not None else None,
    }


def _attention(cfg) -> dict:
    return {"heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim}


def _indexer(cfg) -> dict | None:
    if cfg.indexer is None:
        return None
    return {"heads": cfg.indexer.n_heads, "head_dim": cfg.indexer.head_dim, "topk": cfg.indexer.topk,
            "parameters_per_layer": indexer_params(cfg)}


def _moe(cfg) -> dict | None:
    if not cfg.n_routed_experts:
        return None
    return {"routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "shared_experts": cfg.n_shared_experts, "expert_intermediate_size": cfg.moe_intermediate_size,
            "dense_intermediate_size": cfg.intermediate_size, "first_k_dense_replace": cfg.first_k_dense_replace,
            "scoring_func": cfg.scoring_func, "topk_method": cfg.topk_method, "n_group": cfg.n_group,
            "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor}


def _rope(cfg) -> dict:
    rope = cfg.rope
    if rope.type != "yarn":
        return {"type": rope.type, "theta": rope.theta}
    return {"type": rope.type, "theta": rope.theta, "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings, "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim}
