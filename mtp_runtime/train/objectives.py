"""Training losses: next-token loss of the trunk plus the MTP modules' losses (V3 report, section 2.2).

Depth d (1-based) at index i reads token t_{i+d} and depth d-1's normalised output at index i (the trunk's
final-normed hidden for d = 1), runs at RoPE position i + d, and predicts t_{i+d+1}: exactly the cache layout
the drafter uses at inference (see drafter.py). Depth d runs module min(d, D), so depths beyond D train the last
module on its own outputs, the way drafting deeper than D reuses it.
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
    """Per draft depth: cross-entropy against the corpus, or KL to the trunk when distilling."""
    mtp_accuracy: list[torch.Tensor]
    """Per draft depth: how often its argmax equals the target's argmax (the greedy acceptance proxy)."""

    def total(self, mtp_weight: float, train_trunk: bool = True) -> torch.Tensor:
        mtp = torch.stack(self.mtp).mean() if self.mtp else torch.zeros(())
        return (self.trunk if train_trunk else 0.0) + mtp_weight * mtp


def window_losses(model: DeepseekForCausalLM, window: torch.Tensor, context: int, distill: bool = False,
                  train_trunk: bool = True, depth: int | None = None, loss_start: int = 0) -> Losses:
    """Losses on windows [B, context + depth + 1]; the trunk sees context + depth tokens, each draft depth context.

    depth: draft depths trained (default: one per module); loss_start: MTP losses count only the positions from
    this index on (the generated part of a window whose first tokens are its prompt).
    """
    b = window.shape[0]
    depth = model.num_mtp if depth is None else depth
    trunk_in = window[:, : context + depth]
    with torch.set_grad_enabled(train_trunk and torch.is_grad_enabled()):
        hidden = model.forward_trunk(trunk_in, AttentionPlan.causal(b, trunk_in.shape[1], device=window.device))
        trunk_logits = model.logits(hidden)
    trunk_loss = F.cross_entropy(trunk_logits.flatten(0, 1), window[:, 1: context + depth + 1].flatten())
    prev = hidden[:, :context] if train_trunk else hidden[:, :context].detach()
    mtp_losses, accuracies = [], []
    positions = torch.arange(context, device=window.device).expand(b, context)
    counted = slice(loss_start, context)
    for d in range(1, depth + 1):
        k = min(d, model.num_mtp) - 1
        tokens = window[:, d: d + context]
        plan = AttentionPlan(positions=positions + d, impl="expanded", causal_only=True)
        prev = model.forward_mtp(k, prev, tokens, plan)
        logits = model.mtp_logits(k, prev)[:, counted]
        if distill:
            teacher = trunk_logits[:, d: d + context][:, counted].detach()
            loss = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
            loss = loss / logits.shape[1]
            target_ids = teacher.argmax(-1)
        else:
            target_ids = window[:, d + 1: d + 1 + context][:, counted]
            loss = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten())
        mtp_losses.append(loss)
        accuracies.append((logits.argmax(-1) == target_ids).float().mean().detach())
    return Losses(trunk_loss, mtp_losses, accuracies)
