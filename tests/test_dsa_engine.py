"""DeepSeek Sparse Attention inside our own forwards: the tie rule (a verify forward selects exactly what one-token
steps select), the gathered, masked-dense and cache-free paths agreeing, decode reading only the selected latent
rows, FP8 indexer keys, and speculative greedy decoding equal to plain greedy on a model whose indexer ties often."""

from __future__ import annotations

import pytest
import torch

from builders import TINY_V32, build_model, tiny_config
from mtp_runtime.cache_layout import CacheLayout
from mtp_runtime.engine import Engine
from mtp_runtime.index_cache import dequantize_keys, quantize_keys
from mtp_runtime.model import indexer, sparse_mla
from mtp_runtime.model.plan import AttentionPlan, causal_visibility
from mtp_runtime.params import DraftParams, GenerationRequest

ATOL = 1e-5
LOGITS_ATOL = 1e-4
PROMPT = [5, 17, 3, 44, 9, 31]
CHAIN = [2, 60, 12, 7, 7, 40]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tied():
    """One indexer head: every key that head does not fire on scores exactly 0, so most selections tie."""
    return build_model(num_mtp=2, seed=4, **dict(TINY_V32, index_n_heads=1))


@pytest.fixture(scope="module")
def drafting():
    """Damped so that drafts are partly accepted, with attention still mattering; one indexer head (ties)."""
    return build_model(num_mtp=2, seed=3, context_scale=0.3, norm_std=0.0, eh_noise=0.0,
                       **dict(TINY_V32, index_n_heads=1))


class Recorder:
    """Wraps sparse_mla.select_top_k: keeps every selection and counts those decided by a tie at the k-th score."""

    def __init__(self, monkeypatch, select=indexer.select_top_k):
        self.selections: list[torch.Tensor] = []
        self.boundary_ties = 0
        self._select = select
        monkeypatch.setattr(sparse_mla, "select_top_k", self)

    def __call__(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        kth = scores.topk(k, dim=-1).values[..., -1:]
        above, tied = (scores > kth).sum(-1), (scores == kth).sum(-1)
        self.boundary_ties += int(((above < k) & (above + tied > k)).sum())
        slots = self._select(scores, k)
        self.selections.append(slots)
        return slots


def higher_slot_wins(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The opposite tie rule (equal scores go to the higher slot), in ascending slot order."""
    span = scores.shape[-1]
    return (span - 1 - indexer.select_top_k(scores.flip(-1), k)).flip(-1)


def new_cache(model, batch: int, capacity: int, fp8: bool = False):
    cfg = model.config
    return CacheLayout.for_config(cfg, fp8).allocate(cfg.num_hidden_layers, batch, capacity, torch.float32, "cpu")


def forward(model, cache, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
            impl: str = "absorbed") -> torch.Tensor:
    plan = AttentionPlan.over_cache(cache, positions, visible, impl=impl)
    return model.logits(model.forward_trunk(tokens, plan))


def prefill(model, cache, prompts: torch.Tensor, impl: str = "absorbed") -> torch.Tensor:
    b, n = prompts.shape
    positions = torch.arange(n).expand(b, n)
    logits = forward(model, cache, prompts, positions, causal_visibility(b, n, positions, 0), impl)
    cache.commit(None, torch.full((b,), n))
    return logits


def chain_in_one_forward(model, cache, chain: list[int]) -> torch.Tensor:
    n = len(chain)
    positions = cache.lengths[:, None] + torch.arange(n)
    return forward(model, cache, torch.tensor([chain]), positions, torch.ones(n, n, dtype=torch.bool).tril()[None])


def chain_in_steps(model, cache, chain: list[int]) -> torch.Tensor:
    logits = []
    for token in chain:
        logits.append(forward(model, cache, torch.tensor([[token]]), cache.lengths[:, None].clone(),
                              torch.ones(1, 1, 1, dtype=torch.bool)))
        cache.commit(None, torch.ones(1, dtype=torch.long))
    return torch.cat(logits, dim=1)


def per_query(selections: list[torch.Tensor], layers: int) -> list[list[list[int]]]:
    """Selections of a chain's forwards -> [layer][query] selected slots (one-token steps or one forward alike)."""
    out = [[] for _ in range(layers)]
    for i, slots in enumerate(selections):
        out[i % layers].extend(slots[0].tolist())
    return out


def test_a_verify_forward_selects_what_one_token_steps_select(tied, monkeypatch):
    layers = tied.config.num_hidden_layers
    recorder = Recorder(monkeypatch)
    one = new_cache(tied, 1, 32)
    prefill(tied, one, torch.tensor([PROMPT]))
    recorder.selections.clear()
    together = chain_in_one_forward(tied, one, CHAIN)
    chain_selection = per_query(recorder.selections, layers)
    recorder.selections.clear()
    steps = new_cache(tied, 1, 32)
    prefill(tied, steps, torch.tensor([PROMPT]))
    recorder.selections.clear()
    stepwise = chain_in_steps(tied, steps, CHAIN)
    assert per_query(recorder.selections, layers) == chain_selection
    assert (together - stepwise).abs().max() <= LOGITS_ATOL
    assert recorder.boundary_ties > 0  # ties decided selections here


def test_the_tie_rule_decides_selections_here(tied, monkeypatch):
    """Power check for the test above: the opposite tie rule selects other keys in the same forward."""
    layers = tied.config.num_hidden_layers
    chosen = {}
    for name, rule in (("lower", indexer.select_top_k), ("higher", higher_slot_wins)):
        recorder = Recorder(monkeypatch, rule)
        cache = new_cache(tied, 1, 32)
        prefill(tied, cache, torch.tensor([PROMPT]))
        chain_in_one_forward(tied, cache, CHAIN)
        chosen[name] = per_query(recorder.selections, layers)
    assert chosen["lower"] != chosen["higher"]


def test_select_top_k_breaks_ties_to_the_lower_slot():
    scores = torch.tensor([[[0.0, 2.0, 0.0, -1.0, 0.0, 0.0, float("-inf")]]])
    assert indexer.select_top_k(scores, 3).tolist() == [[[0, 1, 2]]]
    assert indexer.select_top_k(scores, 5).tolist() == [[[0, 1, 2, 4, 5]]]
    # fewer visible keys than k: the invisible slot fills the selection (its caller masks it)
    assert indexer.select_top_k(scores, 7).tolist() == [[[0, 1, 2, 3, 4, 5, 6]]]


def test_gathered_masked_dense_and_cache_free_paths_agree(tied):
    prompts = torch.tensor([PROMPT + CHAIN, CHAIN + PROMPT])  # 12 tokens, index_topk 3
    gathered_cache, dense_cache = new_cache(tied, 2, 16), new_cache(tied, 2, 16)
    gathered = prefill(tied, gathered_cache, prompts, impl="absorbed")
    dense = prefill(tied, dense_cache, prompts, impl="expanded")
    free = tied.logits(tied.forward_trunk(prompts, AttentionPlan.causal(*prompts.shape)))
    assert (gathered - dense).abs().max() <= LOGITS_ATOL
    assert (gathered - free).abs().max() <= LOGITS_ATOL
    assert (gathered_cache.latent - dense_cache.latent).abs().max() <= ATOL
    assert (gathered_cache.index.keys - dense_cache.index.keys).abs().max() <= ATOL
    dense_everywhere = build_model(num_mtp=0, seed=4, **dict(TINY_V32, index_n_heads=1, index_topk=64))
    dense_everywhere.load_state_dict(tied.state_dict(), strict=False)
    everything = dense_everywhere.logits(dense_everywhere.forward_trunk(prompts, AttentionPlan.causal(2, 12)))
    assert (everything - free).abs().max() > 1e-2  # the selection changed the result


def test_a_decode_step_reads_only_the_selected_latent_rows(tied, monkeypatch):
    recorder = Recorder(monkeypatch)
    cache = new_cache(tied, 1, 32)
    prefill(tied, cache, torch.tensor([PROMPT + CHAIN]))
    span = cache.max_length + 1

    def step(cache):
        recorder.selections.clear()
        return forward(tied, cache, torch.tensor([[8]]), cache.lengths[:, None].clone(),
                       torch.ones(1, 1, 1, dtype=torch.bool))

    base = step(cache)
    selected = recorder.selections[-1][0, 0].tolist()  # the last layer's choice
    assert len(selected) == tied.config.indexer.topk
    last = tied.config.num_hidden_layers - 1
    unselected = [s for s in range(span - 1) if s not in selected]
    cache.latent[last, 0, unselected] += 100.0
    assert torch.equal(step(cache), base)
    cache.latent[last, 0, selected[0]] += 100.0
    assert (step(cache) - base).abs().max() > 1e-3


def test_fp8_keys_round_trip_within_e4m3_precision():
    keys = torch.randn(3, 5, 200) * torch.logspace(-2, 2, 200)
    quantized, scales = quantize_keys(keys)
    assert quantized.dtype == torch.float8_e4m3fn and scales.shape == (3, 5, 2)
    restored = dequantize_keys(quantized, scales)
    block_max = keys.abs().unflatten(-1, (1, 200)).amax(-1)  # the second block is partial: bound both by the max
    assert ((restored - keys).abs() <= keys.abs() / 16 + block_max / 448 / 8).all()


def engine_tokens(model, draft: DraftParams, prompts, fp8: bool = False, max_new_tokens: int = 24):
    request = GenerationRequest(max_new_tokens=max_new_tokens, draft=draft)
    engine = Engine(model, request, cache_layout=CacheLayout.for_config(model.config, fp8))
    for _ in engine.run(prompts):
        pass
    return engine.batch.generated, engine.stats


DRAFT_MODES = {
    "chain3": DraftParams.build("chain", 3),
    "tree321": DraftParams.build("tree", tree="3,2,1"),
    "dynamic": DraftParams.build("dynamic", 8, depth=3),
}
RAGGED = [PROMPT, CHAIN[:2], PROMPT + CHAIN]


@pytest.mark.parametrize("fp8", [False, True], ids=["keys_fp32", "keys_fp8"])
@pytest.mark.parametrize("draft", list(DRAFT_MODES))
def test_speculative_greedy_equals_plain_greedy_with_ties(drafting, draft, fp8):
    plain, _ = engine_tokens(drafting, DraftParams.build("none"), RAGGED, fp8)
    speculative, stats = engine_tokens(drafting, DRAFT_MODES[draft], RAGGED, fp8)
    assert speculative == plain
    accepted = sum(s.depth_accepts[0] for s in stats)
    assert 0 < accepted < sum(s.depth_attempts[0] for s in stats)  # drafts both accepted and rejected


def test_fp8_keys_select_mostly_the_same_keys():
    """DeepSeek-V3.2-sized indexer heads over 512 keys: FP8-stored keys keep most of each top-64 selection."""
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, 16, 8, 128, generator=g), torch.randn(1, 512, 128, generator=g)
    weights = torch.randn(1, 16, 8, generator=g)
    visible = torch.ones(1, 16, 512, dtype=torch.bool)
    scorer = indexer.Indexer(tiny_config(**dict(TINY_V32, index_n_heads=8, index_head_dim=128)))
    full = indexer.select_top_k(scorer.scores(queries, weights, keys, visible), 64)
    fp8 = indexer.select_top_k(scorer.scores(queries, weights, dequantize_keys(*quantize_keys(keys)), visible), 64)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(full[0].tolist(), fp8[0].tolist())) / full.numel()
    assert 0.9 <= overlap < 1.0
