"""One DeepSeek decoder layer: pre-norm MLA (sparse for DeepSeek-V3.2) then pre-norm MoE (or dense MLP in the first
layers)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .mla import MLA
from .moe import DenseMLP, MoE
from .norm import RMSNorm
from .plan import AttentionPlan
from .rope import RopeTables
from .sparse_mla import SparseMLA


class DecoderLayer(nn.Module):
    """`arch_idx` is the checkpoint layer number (decides MoE vs dense); `cache_idx` its slot in the cache."""

    def __init__(self, config: ModelConfig, arch_idx: int, cache_idx: int):
        super().__init__()
        self.self_attn = SparseMLA(config, cache_idx) if config.indexer is not None else MLA(config, cache_idx)
        if config.is_moe_layer(arch_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, plan: AttentionPlan, rope: RopeTables) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), plan, rope)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))
