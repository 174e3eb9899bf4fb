"""SparseMLA: MLA with DeepSeek Sparse Attention (DeepSeek-V3.2), where each query attends only to the keys its
lightning indexer selects.

Over a cache, the layer writes its new latent rows and indexer keys at the plan's slots, scores every query against
the indexer keys the plan's mask lets it see (a tree node: the committed prefix and its own ancestors) and keeps the
top `index_topk` (indexer.py). Then:

* span <= index_topk: every visible key is selected, so the dense MLA paths serve the plan unchanged;
* a long prefill (expanded impl): masked dense attention with the selection as the mask;
* otherwise (decode, tree verification, MTP drafting): absorbed attention in which each query gathers only its
  selected latent rows, so its cost stops growing with the context beyond index_topk.

Without a cache (training, full-sequence logits) the causal selection becomes the mask of dense attention. The
selection itself carries no gradient, as in DeepSeek's and transformers' implementations.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import MTPRuntimeError
from .indexer import Indexer, select_top_k, selection_mask
from .mla import MLA, _linear
from .plan import AttentionPlan
from .rope import RopeTables


class SparseMLA(MLA):
    """MLA plus its `indexer`; the cache must carry indexer keys (CacheLayout.for_config allocates them)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)

    def forward(self, hidden: torch.Tensor, plan: AttentionPlan, rope: RopeTables) -> torch.Tensor:
        """hidden [B, n, H] -> attention output [B, n, H]; writes this layer's latents and indexer keys."""
        b, n, _ = hidden.shape
        q_latent = self.q_a_layernorm(_linear(self.q_a_proj, hidden))  # [B, n, q_lora_rank]
        q = _linear(self.q_b_proj, q_latent).view(b, n, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv = _linear(self.kv_a_proj_with_mqa, hidden)
        c_kv = self.kv_a_layernorm(kv[..., : self.latent_dim])  # [B, n, R]
        if plan.cache is None:
            out = self._causal_sparse(q_nope, rope.apply(q_pe), c_kv, rope.apply(kv[..., self.latent_dim:]),
                                      q_latent, hidden, rope)
        else:
            out = self._over_cache(q_nope, q_pe, kv, c_kv, q_latent, hidden, plan, rope)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.v_dim))

    def _over_cache(self, q_nope, q_pe, kv, c_kv, q_latent, hidden, plan: AttentionPlan,
                    rope: RopeTables) -> torch.Tensor:
        cache = plan.cache
        if cache.index is None:
            raise MTPRuntimeError("a sparse-attention layer needs a cache with indexer keys; allocate it with "
                                  "CacheLayout.for_config(model.config)")
        k_pe = rope.rotate(kv[..., None, self.latent_dim:]).squeeze(-2)  # [B, n, dr]
        cache.write(self.layer_idx, plan.slots, torch.cat([c_kv, k_pe], dim=-1))
        cache.index.write(self.layer_idx, plan.slots, self.indexer.keys(hidden, rope))  # [B, n, D]
        keys = cache.read(self.layer_idx, plan.span)  # [B, S, R + dr]
        q_pe = rope.rotate(q_pe)
        topk = self.indexer.topk
        if plan.span <= topk:  # every visible key is among the top k
            return self._expanded(q_nope, q_pe, keys, plan) if plan.impl == "expanded" else \
                self._absorbed(q_nope, q_pe, keys, plan)
        with torch.no_grad():
            queries, weights = self.indexer.queries(q_latent, hidden, rope)
            scores = self.indexer.scores(queries, weights, cache.index.read(self.layer_idx, plan.span), plan.mask)
        if plan.impl == "expanded":
            selected = selection_mask(scores, plan.mask, topk)
            return self._expanded(q_nope, q_pe, keys, replace(plan, mask=selected, causal_only=False, _biases={}))
        slots = select_top_k(scores, topk)
        return self._gathered(q_nope, q_pe, keys, slots, plan.mask.gather(-1, slots))

    def _gathered(self, q_nope, q_pe, keys, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Absorbed attention of each query over its own selected latent rows only.

        slots [B, n, k] are the selected cache slots per query, valid [B, n, k] False where a selection slot is not
        visible (a query that sees fewer than k keys). Returns [B, n, heads, dv]."""
        b, n, h, _ = q_nope.shape
        k = slots.shape[-1]
        w_uk, w_uv = self._split_kv_b()
        q_lat = q_nope.transpose(1, 2) @ w_uk  # [B, heads, n, R]
        # [B, heads, n, R + dr] -> [B * n, heads, R + dr]: one row block per query
        query = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).transpose(1, 2).reshape(b * n, h, -1)
        rows = torch.arange(b, device=slots.device)[:, None, None]
        picked = keys[rows, slots].view(b * n, k, -1)  # [B * n, k, R + dr]
        bias = torch.zeros(b * n, 1, k, dtype=keys.dtype, device=keys.device).masked_fill_(
            ~valid.view(b * n, 1, k), float("-inf"))
        scores = torch.baddbmm(bias, query, picked.transpose(1, 2), alpha=self.scale)  # [B * n, heads, k]
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(keys.dtype)
        out_lat = (probs @ picked[..., : self.latent_dim]).view(b, n, h, -1).transpose(1, 2)  # [B, heads, n, R]
        return (out_lat @ w_uv.transpose(-1, -2)).transpose(1, 2)  # [B, n, heads, dv]

    def _causal_sparse(self, q_nope, q_pe, c_kv, k_pe, q_latent, hidden, rope: RopeTables):
        """Cache-free causal attention over the new tokens, each query restricted to its top-k earlier tokens."""
        n = q_nope.shape[1]
        if n <= self.indexer.topk:
            return self._causal(q_nope, q_pe, c_kv, k_pe)
        causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril().expand(hidden.shape[0], n, n)
        with torch.no_grad():
            queries, weights = self.indexer.queries(q_latent, hidden, rope)
            scores = self.indexer.scores(queries, weights, self.indexer.keys(hidden, rope), causal)
            selected = selection_mask(scores, causal, self.indexer.topk)
        k, v = self._decompress(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=selected[:, None], scale=self.scale)
        return out.transpose(1, 2)  # [B, n, heads, dv]
