"""The lightning indexer's training objective (DeepSeek-V3.2's recipe, trunk frozen).

Each sparse-attention layer's indexer defines a distribution over the keys its query may see, softmax(I). It is
trained towards the layer's main attention distribution, the attention probabilities averaged over heads (the
head-summed distribution, L1-normalised), by KL(attention || indexer):

* dense warm-up: the model attends densely and both distributions cover every visible key;
* sparse training: the model attends to the indexer's top-k and both distributions are restricted to those keys.

The layers' inputs are captured with forward pre-hooks during one ordinary no-grad forward of the trunk and the MTP
modules (`window_losses`), so only the indexer's own computation carries gradients; nothing reaches the frozen
model through it, as DeepSeek detaches the indexer's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DeepseekForCausalLM
from ..model.indexer import selection_mask
from ..model.rope import RopeTables
from ..model.sparse_mla import SparseMLA
from .objectives import window_losses


@dataclass
class LayerInput:
    """What one sparse-attention layer received in a cache-free forward."""

    attn: SparseMLA
    hidden: torch.Tensor
    """[B, T, H] the layer's (normed) attention input."""
    rope: RopeTables


@dataclass
class Capture:
    """Every sparse-attention layer's input of one forward, and that forward's trunk next-token loss."""

    inputs: list[LayerInput]
    trunk_loss: float


@torch.no_grad()
def capture_inputs(model: DeepseekForCausalLM, window: torch.Tensor, context: int, depth: int) -> Capture:
    """Run the trunk and `depth` MTP depths on windows [B, context + depth + 1], recording each layer's input."""
    inputs: list[LayerInput] = []

    def record(module, args):
        hidden, _, rope = args
        inputs.append(LayerInput(module, hidden, rope))

    layers = [m for m in model.modules() if isinstance(m, SparseMLA)]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        losses = window_losses(model, window, context, depth=depth)
    finally:
        for handle in handles:
            handle.remove()
    return Capture(inputs, losses.trunk.item())


@torch.no_grad()
def attention_distribution(attn: SparseMLA, hidden: torch.Tensor, rope: RopeTables,
                           visible: torch.Tensor) -> torch.Tensor:
    """The main attention's probabilities over keys, averaged over heads: [B, T, T] float32 (causal forward)."""
    q_nope, q_pe = attn._queries(hidden)
    kv = attn.kv_a_proj_with_mqa(hidden)
    c_kv = attn.kv_a_layernorm(kv[..., : attn.latent_dim])
    keys, _ = attn._decompress(c_kv, rope.apply(kv[..., attn.latent_dim:]))  # [B, T, heads, dqk]
    queries = torch.cat([q_nope, rope.apply(q_pe)], dim=-1)  # [B, T, heads, dqk]
    logits = torch.einsum("bthd,bshd->bhts", queries.float(), keys.float()) * attn.scale  # [B, heads, T, T]
    return logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)


def indexer_kl(layer: LayerInput, topk: int | None) -> torch.Tensor:
    """Mean over queries of KL(attention || softmax(indexer scores)); topk None: over every visible key (dense
    warm-up), else over the indexer's own top-k of each query (sparse training). Gradients reach the indexer only."""
    attn, hidden = layer.attn, layer.hidden.detach()
    b, n, _ = hidden.shape
    visible = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril().expand(b, n, n)
    target = attention_distribution(attn, hidden, layer.rope, visible)
    with torch.no_grad():
        q_latent = attn.q_a_layernorm(attn.q_a_proj(hidden))
    queries, weights = attn.indexer.queries(q_latent, hidden, layer.rope)
    scores = attn.indexer.scores(queries, weights, attn.indexer.keys(hidden, layer.rope), visible)
    support = visible if topk is None or n <= topk else selection_mask(scores.detach(), visible, topk)
    target = target * support
    target = target / target.sum(dim=-1, keepdim=True)
    log_indexer = scores.masked_fill(~support, float("-inf")).log_softmax(dim=-1).masked_fill(~support, 0.0)
    kl = (torch.xlogy(target, target) - target * log_indexer).sum(dim=-1)  # [B, T]
    return kl.mean()
