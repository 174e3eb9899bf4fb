"""Training losses: next-token loss of the trunk plus the MTP modules' losses (V3 report, section 2.2).

Module k (1-based) at index i reads token t_{i+k} and the previous depth's output at index i (the trunk's
final-normed hidden for k = 1), runs at RoPE position i + k, and predicts t_{i+k+1}: exactly the cache layout
the drafter uses at inference (see drafter.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import DeepseekForCausalLM
from ..model.plan import AttentionPlan


@dataclass
class Losses:
    trunk: torch.Tensor
    """Next-token cross-entropy of the trunk."""
    mtp: list[torch.Tensor]
    """Per module: cross-entropy against the corpus, or KL to the trunk when distilling."""
    mtp_accuracy: list[torch.Tensor]
    """Per module: how often its argmax equals the target's argmax (the greedy acceptance proxy)."""

    def total(self, mtp_weight: float, train_trunk: bool = True) -> torch.Tensor:
        mtp = torch.stack(self.mtp).mean() if self.mtp else torch.zeros(())
        return (self.trunk if train_trunk else 0.0) + mtp_weight * mtp


def window_losses(model: DeepseekForCausalLM, window: torch.Tensor, context: int, distill: bool = False,
                  train_trunk: bool = True) -> Losses:
    """Losses on windows [B, context + D + 1]; the trunk sees context + D tokens, the modules context."""
    b = window.shape[0]
    depth = model.num_mtp
    trunk_in = window[:, : context + depth]
    with torch.set_grad_enabled(train_trunk and torch.is_grad_enabled()):
        hidden = model.forward_trunk(trunk_in, AttentionPlan.causal(b, trunk_in.shape[1], device=window.device))
        trunk_logits = model.logits(hidden)
    trunk_loss = F.cross_entropy(trunk_logits.flatten(0, 1), window[:, 1: context + depth + 1].flatten())
    prev = hidden[:, :context] if train_trunk else hidden[:, :context].detach()
    mtp_losses, accuracies = [], []
    positions = torch.arange(context, device=window.device).expand(b, context)
    for k in range(depth):
        tokens = window[:, k + 1: k + 1 + context]
        plan = AttentionPlan(positions=positions + k + 1, impl="expanded", causal_only=True)
        prev = model.forward_mtp(k, prev, tokens, plan)
        logits = model.mtp_logits(k, prev)
        if distill:
            teacher = trunk_logits[:, k + 1: k + 1 + context].detach()
            loss = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
            loss = loss / context
            target_ids = teacher.argmax(-1)
        else:
            target_ids = window[:, k + 2: k + 2 + context]
            loss = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten())
        mtp_losses.append(loss)
        accuracies.append((logits.argmax(-1) == target_ids).float().mean().detach())
    return Losses(trunk_loss, mtp_losses, accuracies)
