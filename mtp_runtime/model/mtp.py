"""MTP module k (DeepSeek-V3 report, section 2.2): combine the previous depth's state with the next token.

h' = eh_proj([enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])   (embedding first)
h^k = block_k(h'),  output = shared_head.norm(h^k)       (feeds both the head and depth k+1)
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .norm import RMSNorm
from .plan import AttentionPlan
from .rope import RopeTables


class SharedHead(nn.Module):
    """The MTP output norm, plus the checkpoint's own copy of the output head when it stores one."""

    def __init__(self, config: ModelConfig, own_head: bool):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if own_head else None


class MTPModule(DecoderLayer):
    """A decoder layer with the MTP input projection; stored at model.layers.{num_hidden_layers + k}."""

    def __init__(self, config: ModelConfig, k: int, own_head: bool = False, own_embedding: bool = False):
        super().__init__(config, arch_idx=config.num_hidden_layers + k, cache_idx=k)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config, own_head)
        self.embed_tokens = nn.Embedding(config.vocab_size, h) if own_embedding else None

    def forward(self, prev_hidden: torch.Tensor, token_embeds: torch.Tensor, plan: AttentionPlan,
                rope: RopeTables) -> torch.Tensor:
        """prev_hidden, token_embeds [B, n, H] -> normalised h^k [B, n, H]."""
        combined = torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1)  # [B, n, 2H]
        hidden = super().forward(self.eh_proj(combined), plan, rope)
        return self.shared_head.norm(hidden)
