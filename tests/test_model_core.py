"""The model core: absorbed vs expanded MLA, incremental decoding through the latent cache, the cache length
contract, and MTP modules against a naive hand-written reference of the formula in docs/architecture.md
("MTP layout")."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from builders import build_model, save_model
from mtp_runtime.cache import LatentCache
from mtp_runtime.model import moe
from mtp_runtime.model.plan import AttentionPlan
from mtp_runtime.runtime import Runtime

ATTN_ATOL = 1e-5
LOGITS_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def model():
    return build_model(num_mtp=2, seed=1)


@pytest.fixture(scope="module")
def own_head_model():
    return build_model(num_mtp=1, seed=2, mtp_own_head=True)


def random_prefix_cache(cfg, layers: int, lengths: list[int], capacity: int, seed: int) -> LatentCache:
    g = torch.Generator().manual_seed(seed)
    cache = LatentCache(layers, len(lengths), capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    cache.c_kv.copy_(torch.randn(cache.c_kv.shape, generator=g))
    cache.k_pe.copy_(torch.randn(cache.k_pe.shape, generator=g))
    cache.lengths.copy_(torch.tensor(lengths))
    return cache


def random_tree_mask(b: int, n: int, seed: int) -> torch.Tensor:
    """[B, n, n]: a random lower-triangular visibility pattern that always includes the query itself."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, n, n, generator=g) < 0.5).tril()
    return mask | torch.eye(n, dtype=torch.bool)


# --- absorbed vs expanded ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("start", [0, 2])
def test_absorbed_and_expanded_attention_agree(model, layer, start):
    cfg = model.config
    attn = model.model.layers[layer].self_attn
    b, n = 2, 5
    lengths = [6, 9]
    visible = random_tree_mask(b, n, seed=layer)
    positions = torch.tensor(lengths)[:, None] + torch.tensor([0, 1, 1, 2, 3])
    hidden = torch.randn(b, n, cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    rope = model.rotary.tables(positions, hidden.dtype, matrices=True)
    outs = {}
    for impl in ("absorbed", "expanded"):
        cache = random_prefix_cache(cfg, cfg.num_hidden_layers, lengths, 32, seed=3)
        plan = AttentionPlan.over_cache(cache, positions, visible, start=start, impl=impl)
        outs[impl] = attn(hidden, plan, rope)
    assert torch.isfinite(outs["absorbed"]).all()
    assert (outs["absorbed"] - outs["expanded"]).abs().max() <= ATTN_ATOL


def test_absorbed_and_expanded_agree_without_q_compression():
    m = build_model(num_mtp=0, seed=4, q_lora_rank=None)
    cfg = m.config
    attn = m.model.layers[1].self_attn
    visible = random_tree_mask(1, 4, seed=5)
    positions = torch.tensor([[3, 4, 4, 5]])
    hidden = torch.randn(1, 4, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    rope = m.rotary.tables(positions, hidden.dtype, matrices=True)
    outs = []
    for impl in ("absorbed", "expanded"):
        cache = random_prefix_cache(cfg, cfg.num_hidden_layers, [3], 16, seed=6)
        outs.append(attn(hidden, AttentionPlan.over_cache(cache, positions, visible, impl=impl), rope))
    assert (outs[0] - outs[1]).abs().max() <= ATTN_ATOL


def test_attention_matches_naive_reference_over_cache(model):
    """Both paths equal per-head decompressed attention over the visible slots."""
    cfg = model.config
    attn = model.model.layers[1].self_attn
    lengths = [4, 7]
    visible = random_tree_mask(2, 3, seed=9)
    positions = torch.tensor(lengths)[:, None] + torch.tensor([0, 1, 1])
    hidden = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(10))
    cache = random_prefix_cache(cfg, cfg.num_hidden_layers, lengths, 16, seed=11)
    plan = AttentionPlan.over_cache(cache, positions, visible)
    got = attn(hidden, plan, model.rotary.tables(positions, hidden.dtype, matrices=True))
    # the forward wrote the new entries; the reference attends over the same slots with the same mask
    ref = torch.stack([
        naive_attention(attn, cfg, hidden[r], positions[r], cache.c_kv[1, r, : plan.mask.shape[-1]],
                        cache.k_pe[1, r, : plan.mask.shape[-1]], plan.mask[r])
        for r in range(2)])
    assert (got - ref).abs().max() <= ATTN_ATOL


# --- incremental decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill, prefill_impl", [(1, "absorbed"), (4, "absorbed"), (4, "expanded"),
                                                   (9, "expanded")])
def test_incremental_decoding_equals_full_forward(model, prefill, prefill_impl):
    cfg = model.config
    rt = Runtime(model)
    b, total = 2, 14
    ids = torch.randint(0, cfg.vocab_size, (b, total), generator=torch.Generator().manual_seed(prefill))
    full = rt.logits(ids)  # [B, T, V]
    cache = LatentCache(cfg.num_hidden_layers, b, total + 2, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    positions = torch.arange(prefill).expand(b, prefill)
    causal = torch.ones(prefill, prefill, dtype=torch.bool).tril().expand(b, prefill, prefill)
    plan = AttentionPlan.over_cache(cache, positions, causal, impl=prefill_impl)
    logits = [model.logits(model.forward_trunk(ids[:, :prefill], plan))]
    assert cache.lengths.tolist() == [0, 0]  # the model never commits
    cache.commit(None, torch.full((b,), prefill))
    for t in range(prefill, total):
        plan = AttentionPlan.over_cache(cache, cache.lengths[:, None].clone(), torch.ones(b, 1, 1, dtype=torch.bool))
        before = cache.lengths.clone()
        logits.append(model.logits(model.forward_trunk(ids[:, t: t + 1], plan)))
        assert torch.equal(cache.lengths, before)
        cache.commit(torch.zeros(b, 1, dtype=torch.long), torch.ones(b, dtype=torch.long))
    incremental = torch.cat(logits, dim=1)
    assert cache.lengths.tolist() == [total, total]
    assert (incremental - full).abs().max() <= LOGITS_ATOL


def test_forward_never_changes_lengths_or_committed_slots(model):
    """Trunk and MTP forwards write only their plan's slots; lengths change only in commit."""
    cfg = model.config
    b, n = 2, 3
    lengths = [5, 8]
    visible = random_tree_mask(b, n, seed=12)
    positions = torch.tensor(lengths)[:, None] + torch.tensor([0, 1, 1])
    tokens = torch.randint(0, cfg.vocab_size, (b, n), generator=torch.Generator().manual_seed(13))
    for layers, run in ((cfg.num_hidden_layers, lambda plan: model.forward_trunk(tokens, plan)),
                        (model.num_mtp, lambda plan: model.forward_mtp(1, torch.randn(b, n, cfg.hidden_size),
                                                                      tokens, plan))):
        cache = random_prefix_cache(cfg, layers, lengths, 16, seed=14)
        c_kv, k_pe = cache.c_kv.clone(), cache.k_pe.clone()
        plan = AttentionPlan.over_cache(cache, positions, visible)
        run(plan)
        assert cache.lengths.tolist() == lengths
        written = torch.zeros(cache.c_kv.shape[1:3], dtype=torch.bool)
        written.scatter_(1, plan.slots, True)
        assert torch.equal(cache.c_kv[:, ~written], c_kv[:, ~written])
        assert torch.equal(cache.k_pe[:, ~written], k_pe[:, ~written])
        assert not torch.equal(cache.c_kv, c_kv)


# --- MTP modules against a naive reference --------------------------------------------------------------


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position * theta^(-2i/d) (DeepSeek's interleaved layout); x [T, ..., d].

    The rotated pairs are returned as [all first members, all second members], the layout the cache stores k_pe
    in (a permutation of the dims, so q_pe . k_pe is unchanged when both use it)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv_freq  # [T, d/2]
    angle = angle.reshape(angle.shape[0], *([1] * (x.dim() - 2)), d // 2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle))  # [..., d/2, 2]
    return torch.cat([rotated[..., 0], rotated[..., 1]], dim=-1).float()


def naive_attention(attn, cfg, x, positions, ctx_ckv, ctx_kpe, mask):
    """One sequence: x [n, H] queries at positions [n]; keys are the given cache slots (c_kv normed, k_pe
    roped) [S, ...] with mask [n, S]. Per-head decompressed K/V, explicit softmax."""
    heads, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, 1e-6) @ attn.q_b_proj.weight.T
    q = q.view(-1, heads, dn + dr)
    q_nope, q_pe = q[..., :dn], rope_interleaved(q[..., dn:], positions, cfg.rope.theta)
    kv = (ctx_ckv @ attn.kv_b_proj.weight.T).view(-1, heads, dn + dv)  # [S, heads, dn + dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    out = torch.zeros(x.shape[0], heads, dv)
    for i in range(x.shape[0]):
        for h in range(heads):
            scores = (k_nope[:, h] @ q_nope[i, h] + ctx_kpe @ q_pe[i, h]) * cfg.qk_head_dim ** -0.5
            scores = scores.masked_fill(~mask[i], float("-inf"))
            out[i, h] = scores.softmax(-1) @ v[:, h]
    return out.reshape(x.shape[0], heads * dv) @ attn.o_proj.weight.T


def naive_self_attention(attn, cfg, x, positions):
    """Causal attention over the sequence itself: builds the normed c_kv and roped k_pe by hand."""
    latent = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = rms(latent[:, : cfg.kv_lora_rank], attn.kv_a_layernorm.weight, 1e-6)
    k_pe = rope_interleaved(latent[:, cfg.kv_lora_rank:], positions, cfg.rope.theta)
    n = x.shape[0]
    return naive_attention(attn, cfg, x, positions, c_kv, k_pe, torch.ones(n, n, dtype=torch.bool).tril())


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def naive_moe(moe, cfg, x):
    """DeepSeek-V3 noaux_tc routing and a per-token loop over the chosen experts, plus the shared expert."""
    out = torch.zeros_like(x)
    per_group = cfg.n_routed_experts // cfg.n_group
    for t in range(x.shape[0]):
        scores = torch.sigmoid(moe.gate.weight @ x[t])
        choice = scores + moe.gate.e_score_correction_bias
        group_scores = [sorted(choice[g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -sum(group_scores[g]))[: cfg.topk_group]
        allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -float(choice[e]))[: cfg.num_experts_per_tok]
        weights = scores[chosen] / scores[chosen].sum() * cfg.routed_scaling_factor
        for w, e in zip(weights, chosen):
            ex = moe.experts
            out[t] += w * swiglu(x[t], ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
    sh = moe.shared_experts
    return out + swiglu(x, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)


def _expert_path_edges(model) -> list[int]:
    """Token counts on both sides of moe.PAIRS_MAX (for this model's top-k) and of moe.DENSE_MAX_TOKENS."""
    most, dense = moe.PAIRS_MAX // model.config.num_experts_per_tok, moe.DENSE_MAX_TOKENS
    assert most < dense
    return [1, most, most + 1, dense, dense + 1, 3 * dense]


@pytest.mark.parametrize("edge", range(6))
def test_moe_matches_naive_reference_on_every_expert_path(model, edge):
    """Pair by pair (up to PAIRS_MAX pairs), dense (up to DENSE_MAX_TOKENS tokens) and the grouped matmul (past
    it) all give the naive per-token loop."""
    cfg = model.config
    tokens = _expert_path_edges(model)[edge]
    layer = next(layer for layer in model.model.layers if isinstance(layer.mlp, moe.MoE))
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(30 + edge))
    torch.testing.assert_close(layer.mlp(x[None])[0], naive_moe(layer.mlp, cfg, x), atol=LOGITS_ATOL, rtol=1e-4)


def naive_mtp(model, k, prev_hidden, tokens, embedding_first=True):
    """One sequence through MTP module k: prev_hidden [n, H], tokens [n] -> (normed h [n, H], logits [n, V])."""
    cfg, module = model.config, model.mtp[k]
    eps = cfg.rms_norm_eps
    emb_table = module.embed_tokens.weight if module.embed_tokens is not None else model.model.embed_tokens.weight
    e = rms(emb_table[tokens], module.enorm.weight, eps)
    h = rms(prev_hidden, module.hnorm.weight, eps)
    x = torch.cat([e, h] if embedding_first else [h, e], dim=-1) @ module.eh_proj.weight.T
    positions = torch.arange(tokens.shape[0])
    x = x + naive_self_attention(module.self_attn, cfg, rms(x, module.input_layernorm.weight, eps), positions)
    x = x + naive_moe(module.mlp, cfg, rms(x, module.post_attention_layernorm.weight, eps))
    out = rms(x, module.shared_head.norm.weight, eps)
    head = module.shared_head.head.weight if module.shared_head.head is not None else model.lm_head.weight
    return out, out @ head.T


def run_mtp(model, k, prev_hidden, tokens):
    b, n = tokens.shape
    out = model.forward_mtp(k, prev_hidden, tokens, AttentionPlan.causal(b, n))
    return out, model.mtp_logits(k, out)


@pytest.mark.parametrize("k", [0, 1])
def test_mtp_module_matches_naive_reference(model, k):
    cfg = model.config
    g = torch.Generator().manual_seed(20 + k)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    prev = torch.randn(2, 6, cfg.hidden_size, generator=g)
    out, logits = run_mtp(model, k, prev, tokens)
    for r in range(2):
        ref_out, ref_logits = naive_mtp(model, k, prev[r], tokens[r])
        assert (out[r] - ref_out).abs().max() <= LOGITS_ATOL
        assert (logits[r] - ref_logits).abs().max() <= LOGITS_ATOL


def test_swapped_concat_order_fails_the_comparison(model):
    """Power check: the reference with [hnorm(h), enorm(emb)] must not match, so the test above can fail."""
    cfg = model.config
    g = torch.Generator().manual_seed(30)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    prev = torch.randn(1, 6, cfg.hidden_size, generator=g)
    _, logits = run_mtp(model, 0, prev, tokens)
    _, swapped = naive_mtp(model, 0, prev[0], tokens[0], embedding_first=False)
    assert (logits[0] - swapped).abs().max() > 100 * LOGITS_ATOL


def test_mtp_module_uses_its_own_head_when_present(own_head_model):
    m = own_head_model
    cfg = m.config
    g = torch.Generator().manual_seed(31)
    tokens = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
    prev = torch.randn(1, 5, cfg.hidden_size, generator=g)
    out, logits = run_mtp(m, 0, prev, tokens)
    _, ref = naive_mtp(m, 0, prev[0], tokens[0])
    assert (logits[0] - ref).abs().max() <= LOGITS_ATOL
    assert (logits[0] - m.logits(out[0])).abs().max() > 100 * LOGITS_ATOL  # the trunk head would differ


# --- loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_mtp", [0, 1, 2])
def test_load_counts_mtp_modules_and_keeps_weights(tmp_path, num_mtp):
    m = build_model(num_mtp=num_mtp, seed=40)
    rt = mtp_runtime.load(save_model(tmp_path / "ckpt", m), device="cpu")
    assert rt.num_mtp_modules == num_mtp
    assert rt.model.mtp[0].shared_head.head is None if num_mtp else True
    ours = rt.model.state_dict()
    for name, tensor in m.state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_loaded_checkpoint_uses_stored_mtp_head(tmp_path, own_head_model):
    rt = mtp_runtime.load(save_model(tmp_path / "ckpt", own_head_model), device="cpu")
    assert rt.num_mtp_modules == 1
    head = rt.model.mtp[0].shared_head.head
    assert head is not None
    assert torch.equal(head.weight, own_head_model.mtp[0].shared_head.head.weight)
    assert not torch.equal(head.weight, rt.model.lm_head.weight)
    h = torch.randn(3, rt.config.hidden_size)
    assert torch.allclose(rt.model.mtp_logits(0, h), h @ head.weight.T, atol=1e-6)
