"""Forwards: the two networks a decoding step runs (the trunk with its head, an MTP module), eager or compiled.

The engine and the drafter call only these. `Forwards` runs them eagerly; `CompiledForwards` (compiled.py) runs
the same functions through torch.compile. Both take an explicit AttentionPlan over an explicit cache and return
tensors; neither ever commits a cache.
"""

from __future__ import annotations

import torch

from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan


def trunk_step(model: DeepseekForCausalLM, tokens: torch.Tensor, plan: AttentionPlan):
    """Trunk over tokens [B, n]: (final-normed hidden [B, n, H], logits [B, n, V] float32)."""
    hidden = model.forward_trunk(tokens, plan)
    return hidden, model.logits(hidden)


def mtp_step(model: DeepseekForCausalLM, k: int, prev_hidden: torch.Tensor, tokens: torch.Tensor,
             plan: AttentionPlan) -> torch.Tensor:
    """MTP module k (0-based) over prev_hidden [B, n, H] and tokens [B, n]: its normed output [B, n, H]."""
    return model.forward_mtp(k, prev_hidden, tokens, plan)


class Forwards:
    """Eager forwards (every shape, every batch size)."""

    compiled = False

    def __init__(self, model: DeepseekForCausalLM):
        self.model = model
        self.compile_seconds = 0.0
        """Wall time spent in calls that compiled a new graph (always 0 here; see CompiledForwards)."""

    def trunk(self, tokens: torch.Tensor, plan: AttentionPlan):
        """A decoding step's trunk forward (verify or plain decoding; not the prefill)."""
        return trunk_step(self.model, tokens, plan)

    def mtp(self, k: int, prev_hidden: torch.Tensor, tokens: torch.Tensor, plan: AttentionPlan,
            step: bool = True) -> torch.Tensor:
        """An MTP pass; `step` is False for the prompt's pass, whose shape follows the prompt length."""
        return mtp_step(self.model, k, prev_hidden, tokens, plan)
