"""DeepseekForCausalLM: the trunk (embedding, decoder layers, final norm, head) and its MTP modules."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .mtp import MTPModule
from .norm import RMSNorm
from .plan import AttentionPlan
from .rope import RopeTables, Rotary


class Backbone(nn.Module):
    """Named `model` so parameter names match HF checkpoints (model.layers.{i}.self_attn...)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """forward_trunk -> hidden after the final norm; logits() maps hidden to vocabulary scores."""

    def __init__(self, config: ModelConfig, num_mtp: int = 0, mtp_own_head: bool = False,
                 mtp_own_embedding: bool = False):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(config, k, mtp_own_head, mtp_own_embedding) for k in range(num_mtp))
        self.rotary = Rotary(config.rope, config.qk_rope_head_dim)

    @property
    def num_mtp(self) -> int:
        return len(self.mtp)

    def forward_trunk(self, input_ids: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """input_ids [B, n] -> final-normed hidden states [B, n, H]."""
        hidden = self.model.embed_tokens(input_ids)
        rope = self.rope_tables(plan, hidden.dtype)
        for layer in self.model.layers:
            hidden = layer(hidden, plan, rope)
        return self.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Trunk head: hidden [B, n, H] -> logits [B, n, vocab] in float32."""
        return self.lm_head(hidden).float()

    def forward_mtp(self, k: int, prev_hidden: torch.Tensor, token_ids: torch.Tensor,
                    plan: AttentionPlan) -> torch.Tensor:
        """MTP module k (0-based) on prev_hidden [B, n, H] and the next tokens [B, n] -> normed h [B, n, H]."""
        module = self.mtp[k]
        embed = module.embed_tokens if module.embed_tokens is not None else self.model.embed_tokens
        token_embeds = embed(token_ids)
        return module(prev_hidden, token_embeds, plan, self.rope_tables(plan, token_embeds.dtype))

    def rope_tables(self, plan: AttentionPlan, dtype: torch.dtype) -> RopeTables:
        """One forward's RoPE tables; forwards over a cache also get the rotation matrices they rotate with."""
        return self.rotary.tables(plan.positions, dtype, matrices=plan.cache is not None)

    def mtp_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head of MTP module k on its normed output -> logits [.., vocab] in float32."""
        head = self.mtp[k].shared_head.head
        return (head if head is not None else self.lm_head)(hidden).float()
