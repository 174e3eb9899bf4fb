"""shard_model: split a loaded DeepseekForCausalLM over the ranks of a ParallelGroup, in place.

Per decoder layer (trunk and MTP modules alike):
* MLA: each rank keeps num_heads / W heads (rows of q_b_proj or q_proj and of kv_b_proj, columns of o_proj,
  followed by an all-reduce). q_a_proj, kv_a_proj_with_mqa and the norms stay replicated, so every rank
  computes the same c_kv and k_pe and holds the complete latent cache, as DeepSeek's inference does.
* MoE: routed experts split by expert, shared experts by channel, one all-reduce (see experts.py).
* Dense MLP: split by channel, one all-reduce.
Embeddings, the output heads, the MTP input projections and the gates stay replicated.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import ParallelError
from ..model import DeepseekForCausalLM
from ..model.mla import MLA
from ..model.moe import MoE
from .experts import ParallelMoE
from .group import ParallelGroup
from .linear import ParallelDenseMLP, RowParallelLinear, sliced_linear


def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raise ParallelError naming every width that world_size does not divide."""
    if world_size < 1:
        raise ParallelError(f"world size {world_size} must be at least 1")
    widths = {"num_attention_heads": config.num_attention_heads}
    if config.n_routed_experts:
        widths["n_routed_experts"] = config.n_routed_experts
        widths["moe_intermediate_size * n_shared_experts"] = config.moe_intermediate_size * config.n_shared_experts
    if not config.n_routed_experts or config.first_k_dense_replace or config.moe_layer_freq > 1:
        widths["intermediate_size"] = config.intermediate_size  # some layer is a dense MLP
    bad = [f"{name} = {value}" for name, value in widths.items() if value % world_size]
    if bad:
        raise ParallelError(f"cannot split this model over {world_size} ranks: {', '.join(bad)} "
                            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world_size}; use a world size "
                            "that divides the head and expert counts")


def shard_model(model: DeepseekForCausalLM, group: ParallelGroup) -> DeepseekForCausalLM:
    """Keep only this rank's heads, experts and MLP channels in every layer; returns the same model."""
    check_shardable(model.config, group.world_size)
    if group.world_size == 1:
        return model
    for layer in [*model.model.layers, *model.mtp]:
        shard_attention(layer.self_attn, group)
        if isinstance(layer.mlp, MoE):
            layer.mlp = ParallelMoE(layer.mlp, model.config, group)
        else:
            layer.mlp = ParallelDenseMLP(layer.mlp, group)
    return model


def shard_attention(attn: MLA, group: ParallelGroup) -> None:
    """Keep heads [rank * h/W, (rank + 1) * h/W): their query, k_nope/v decompression and output rows."""
    heads = group.local_range(attn.num_heads)
    qk, kv = attn.nope_dim + attn.rope_dim, attn.nope_dim + attn.v_dim
    q_rows = slice(heads.start * qk, heads.stop * qk)  # q rows are head-major: [heads * qk]
    if hasattr(attn, "q_proj"):
        attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    else:
        attn.q_b_proj = sliced_linear(attn.q_b_proj, rows=q_rows)
    attn.kv_b_proj = sliced_linear(attn.kv_b_proj, rows=slice(heads.start * kv, heads.stop * kv))  # [heads * kv]
    v_cols = slice(heads.start * attn.v_dim, heads.stop * attn.v_dim)  # o_proj input is head-major: [heads * dv]
    attn.o_proj = RowParallelLinear(attn.o_proj, v_cols, group)
    attn.num_heads = heads.stop - heads.start
