"""Property-based tests (hypothesis): the invariants of docs/architecture.md on random trees, acceptances, commits
and batches.

Trees here are random parent arrays (any topology, a different one per batch row), not only the static shapes
of test_tree.py; targets are random or derived from a random "language model" (a function of the context), so
that greedy acceptance can be compared with sequential greedy decoding. Every test is derandomized.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import build_model
from mtp_runtime.cache import LatentCache
from mtp_runtime.runtime import Runtime
from mtp_runtime.verify.accept import accept_greedy, accept_sampling
from mtp_runtime.verify.tree import DraftTree

FAST = settings(max_examples=80, deadline=None, derandomize=True)
ENGINE = settings(max_examples=40, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------- random trees

@st.composite
def parent_arrays(draw, max_nodes: int = 10) -> list[int]:
    """A random tree in topological order: parents[0] == -1, parents[i] < i."""
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def depths_of(parents: list[int]) -> list[int]:
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return depths


def ancestors_of(parents: list[int], node: int) -> list[int]:
    """node and its ancestors, root first."""
    chain = [node]
    while parents[chain[-1]] >= 0:
        chain.append(parents[chain[-1]])
    return chain[::-1]


def children_of(parents: list[int], node: int) -> list[int]:
    return [i for i, p in enumerate(parents) if p == node]


@st.composite
def batched_trees(draw, max_nodes: int = 10, max_rows: int = 4, vocab: int = 4) -> tuple[list[list[int]], DraftTree]:
    """A DraftTree whose rows share the node count but each have their own random topology, tokens and validity."""
    n = draw(st.integers(1, max_nodes))
    rows = draw(st.integers(1, max_rows))
    parents = [[-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)] for _ in range(rows)]
    tokens = [[draw(st.integers(0, vocab - 1)) for _ in range(n)] for _ in range(rows)]
    valid = [[True] + [draw(st.sampled_from([True, True, True, False])) for _ in range(n - 1)]  # mostly valid
             for _ in range(rows)]
    tree = DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents),
                     depths=torch.tensor([depths_of(p) for p in parents]),
                     valid=torch.tensor(valid) if draw(st.booleans()) else None)
    return parents, tree


@FAST
@given(st.integers(1, 9), st.integers(1, 4), st.data())
def test_greedy_chain_shortcut_equals_the_general_walk(n, rows, data):
    """accept_greedy's chain path (a prefix ends at the first mismatch) decides exactly what the tree walk does."""
    tokens = torch.tensor([[data.draw(st.integers(0, 2)) for _ in range(n)] for _ in range(rows)])
    argmax = torch.tensor([[data.draw(st.integers(0, 2)) for _ in range(n)] for _ in range(rows)])
    valid = torch.tensor([[True] + [data.draw(st.booleans()) for _ in range(n - 1)] for _ in range(rows)])
    chain = dict(tokens=tokens, parents=(torch.arange(n) - 1).expand(rows, n), depths=torch.arange(n).expand(rows, n),
                 valid=valid if data.draw(st.booleans()) else None)
    fast, walk = accept_greedy(DraftTree(**chain, chain=True), argmax), accept_greedy(DraftTree(**chain), argmax)
    assert torch.equal(fast.path, walk.path) and torch.equal(fast.num_accepted, walk.num_accepted)
    assert torch.equal(fast.bonus, walk.bonus)


@FAST
@given(batched_trees())
def test_ancestor_mask_is_the_closure_of_parent_links_per_row(case):
    parents, tree = case
    mask = tree.ancestor_mask()
    for row, row_parents in enumerate(parents):
        n = len(row_parents)
        expected = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            expected[i, ancestors_of(row_parents, i)] = True
        assert torch.equal(mask[row], expected), (row_parents, mask[row].int())
        # a node's verify position is prefix_len + depth, and its depth is its number of strict ancestors
        assert (mask[row].sum(1) - 1).tolist() == tree.depths[row].tolist()


@FAST
@given(batched_trees(), st.data())
def test_select_rows_keeps_each_rows_tree(case, data):
    _, tree = case
    batch = tree.tokens.shape[0]
    rows = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=5)))
    picked = tree.select_rows(rows)
    for name in ("tokens", "parents", "depths", "valid"):
        got, full = getattr(picked, name), getattr(tree, name)
        assert (got is None) == (full is None)
        if full is not None:
            assert torch.equal(got, full[rows]), name
    assert torch.equal(picked.ancestor_mask(), tree.ancestor_mask()[rows])


@FAST
@given(parent_arrays(max_nodes=12))
def test_every_root_path_is_recovered_by_greedy_acceptance(parents):
    """For each node v, a target that agrees exactly along the path to v makes accept_greedy return that path."""
    n = len(parents)
    depths = depths_of(parents)
    tokens = torch.arange(100, 100 + n)  # distinct tokens: only the intended path can match
    tree = DraftTree(tokens[None], torch.tensor([parents]), torch.tensor([depths]))
    for v in range(n):
        path = ancestors_of(parents, v)
        argmax = torch.full((1, n), 7)  # 7 is no node's token
        for node, child in zip(path, path[1:]):
            argmax[0, node] = tokens[child]
        result = accept_greedy(tree, argmax)
        assert result.path[0].tolist() == path + [-1] * (max(depths) + 1 - len(path))
        assert result.num_accepted.item() == depths[v]
        assert result.bonus.item() == 7


# ---------------------------------------------------------------------------- greedy acceptance

def reference_greedy(parents, tokens, valid, argmax) -> tuple[int, list[int]]:
    """(last node, emitted tokens): the deepest node whose whole path matches the argmax chain, lowest index first."""
    n = len(parents)
    on_path = [True] + [False] * (n - 1)
    for i in range(1, n):  # parents come first
        on_path[i] = on_path[parents[i]] and valid[i] and tokens[i] == argmax[parents[i]]
    depths = depths_of(parents)
    last = min((i for i in range(n) if on_path[i]), key=lambda i: (-depths[i], i))
    path = ancestors_of(parents, last)
    return last, [tokens[i] for i in path[1:]] + [argmax[last]]


@FAST
@given(batched_trees(), st.data())
def test_greedy_accepts_the_longest_matching_path(case, data):
    parents, tree = case
    batch, n = tree.tokens.shape
    argmax = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n),
                                             min_size=batch, max_size=batch)))
    result = accept_greedy(tree, argmax)
    valid = tree.valid if tree.valid is not None else torch.ones_like(tree.tokens, dtype=torch.bool)
    for row in range(batch):
        last, emitted = reference_greedy(parents[row], tree.tokens[row].tolist(), valid[row].tolist(),
                                         argmax[row].tolist())
        accepted = result.num_accepted[row].item()
        path = result.path[row].tolist()
        assert path[: accepted + 1] == ancestors_of(parents[row], last)
        assert all(node == -1 for node in path[accepted + 1:])
        got = [tree.tokens[row, node].item() for node in path[1: accepted + 1]] + [result.bonus[row].item()]
        assert got == emitted


class ToyLM:
    """A random deterministic next-token function of the whole context: what a greedy target model is."""

    def __init__(self, seed: int, vocab: int):
        self.seed, self.vocab = seed, vocab

    def next(self, context: tuple[int, ...]) -> int:
        return random.Random(f"{self.seed}:{context}").randrange(self.vocab)


@FAST
@given(parent_arrays(max_nodes=12), st.integers(0, 2**16), st.integers(2, 4), st.data())
def test_greedy_emits_what_sequential_greedy_decoding_emits(parents, seed, vocab, data):
    """Drafts from a small vocabulary (duplicates included) verified by a consistent target: the step emits
    exactly the next tokens of plain greedy decoding, as many as the tree holds plus the bonus."""
    n = len(parents)
    tokens = [data.draw(st.integers(0, vocab - 1)) for _ in range(n)]
    lm = ToyLM(seed, vocab)
    prompt = (1, 2)
    contexts = [prompt + tuple(tokens[i] for i in ancestors_of(parents, v)) for v in range(n)]
    argmax = torch.tensor([[lm.next(context) for context in contexts]])
    tree = DraftTree(torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([depths_of(parents)]))
    result = accept_greedy(tree, argmax)
    accepted = result.num_accepted.item()
    emitted = [tokens[node] for node in result.path[0, 1: accepted + 1].tolist()] + [result.bonus.item()]
    sequential, context = [], prompt + (tokens[0],)
    for _ in range(accepted + 1):
        sequential.append(lm.next(context))
        context += (sequential[-1],)
    assert emitted == sequential
    # and no drafted node continues the greedy chain one step further than what was accepted
    chain = sequential[:-1]
    longer = [v for v in range(n) if [tokens[i] for i in ancestors_of(parents, v)[1:]] == chain + [sequential[-1]]]
    assert not longer


# ---------------------------------------------------------------------------- sampling acceptance

@st.composite
def sampling_cases(draw, vocab: int = 5):
    """A batch of random trees with random target p and draft q per node (zeros included on purpose)."""
    parents, tree = draw(batched_trees(max_nodes=8, max_rows=3, vocab=vocab))
    batch, n = tree.tokens.shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def distributions() -> torch.Tensor:
        weights = torch.rand(batch, n, vocab, generator=gen)
        weights[torch.rand(batch, n, vocab, generator=gen) < 0.3] = 0.0  # some impossible tokens
        weights[..., 0] += 1e-3  # never all zero
        return weights / weights.sum(-1, keepdim=True)

    tree.draft_probs = distributions()
    return parents, tree, distributions(), draw(st.integers(0, 2**31))


@FAST
@given(sampling_cases())
def test_sampling_returns_a_valid_root_path(case):
    parents, tree, target, seed = case
    result = accept_sampling(tree, target, torch.Generator().manual_seed(seed))
    batch, n = tree.tokens.shape
    valid = tree.valid if tree.valid is not None else torch.ones(batch, n, dtype=torch.bool)
    for row in range(batch):
        accepted = result.num_accepted[row].item()
        path = result.path[row].tolist()
        assert 0 <= accepted <= tree.max_depth and len(path) == tree.max_depth + 1
        assert path[: accepted + 1] == ancestors_of(parents[row], path[accepted])
        assert all(node == -1 for node in path[accepted + 1:])
        for parent, child in zip(path, path[1: accepted + 1]):
            token = tree.tokens[row, child].item()
            assert valid[row, child]
            assert target[row, parent, token] > 0, "a token the target cannot emit was accepted"
            assert tree.draft_probs[row, parent, token] > 0, "a token the drafter cannot draw was accepted"
        # the bonus comes from the target at the last node (or its residual, whose support is inside p's)
        assert target[row, path[accepted], result.bonus[row]] > 0


@FAST
@given(sampling_cases())
def test_sampling_is_reproducible_with_a_seed(case):
    _, tree, target, seed = case
    first = accept_sampling(tree, target, torch.Generator().manual_seed(seed))
    second = accept_sampling(tree, target, torch.Generator().manual_seed(seed))
    for name in ("path", "num_accepted", "bonus"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@FAST
@given(sampling_cases())
def test_sampling_accepts_every_draw_when_the_draft_is_the_target(case):
    """q == p: the first child of each node that q can draw is always accepted, down to a node without one."""
    parents, tree, _, seed = case
    target = tree.draft_probs.clone()
    result = accept_sampling(tree, target, torch.Generator().manual_seed(seed))
    valid = tree.valid if tree.valid is not None else torch.ones_like(tree.tokens, dtype=torch.bool)
    for row, row_parents in enumerate(parents):
        node = 0
        while True:
            drawable = [c for c in children_of(row_parents, node)
                        if valid[row, c] and target[row, node, tree.tokens[row, c]] > 0]
            if not drawable:
                break
            node = drawable[0]
        assert result.path[row, : result.num_accepted[row] + 1].tolist() == ancestors_of(row_parents, node)


@FAST
@given(parent_arrays(max_nodes=9), st.integers(0, 2**31), st.data())
def test_sampling_with_a_one_hot_target_is_greedy_acceptance(parents, seed, data):
    """A one-hot target is greedy decoding: with distinct sibling tokens (draws without replacement) that q can
    draw, accept_sampling takes exactly the path accept_greedy takes, and the bonus is the target's token."""
    vocab, n = 10, len(parents)
    tokens = [data.draw(st.integers(0, vocab - 1))]
    for i in range(1, n):
        taken = [tokens[c] for c in children_of(parents, parents[i]) if c < i]
        tokens.append(data.draw(st.sampled_from([t for t in range(vocab) if t not in taken])))
    # the target's token after each node: often one of its children's, sometimes another
    argmax = []
    for v in range(n):
        choices = [tokens[c] for c in children_of(parents, v)]
        argmax.append(data.draw(st.sampled_from(choices)) if choices and data.draw(st.booleans())
                      else data.draw(st.integers(0, vocab - 1)))
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(1, n, vocab, generator=gen) + 0.01  # every token drawable
    tree = DraftTree(torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([depths_of(parents)]),
                     draft_probs=q / q.sum(-1, keepdim=True))
    target = torch.nn.functional.one_hot(torch.tensor([argmax]), vocab).float()
    sampled = accept_sampling(tree, target, gen)
    greedy = accept_greedy(tree, torch.tensor([argmax]))
    assert torch.equal(sampled.path, greedy.path)
    assert torch.equal(sampled.bonus, greedy.bonus)


# ---------------------------------------------------------------------------- cache commit

@st.composite
def commit_cases(draw):
    """A cache with random committed prefixes, then steps of (random scratch entries, random accepted root path)."""
    batch = draw(st.integers(1, 4))
    lengths = [draw(st.integers(0, 6)) for _ in range(batch)]
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 7))
        parents = [[-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)] for _ in range(batch)]
        lasts = [draw(st.integers(0, n - 1)) for _ in range(batch)]
        steps.append((n, parents, lasts))
    return lengths, steps, draw(st.integers(0, 2**31))


@FAST
@given(commit_cases())
def test_commit_keeps_exactly_the_accepted_path_entries(case):
    lengths, steps, seed = case
    gen = torch.Generator().manual_seed(seed)
    layers, rank, rope, batch = 2, 3, 2, len(lengths)
    capacity = max(lengths) + sum(n for n, _, _ in steps) + 1
    cache = LatentCache(layers, batch, capacity, rank, rope)
    # the reference: per row, the list of committed (c_kv, k_pe) entries over all layers
    reference = [[(torch.randn(layers, rank, generator=gen), torch.randn(layers, rope, generator=gen))
                  for _ in range(length)] for length in lengths]
    for row, entries in enumerate(reference):
        for slot, (c, k) in enumerate(entries):
            cache.c_kv[:, row, slot], cache.k_pe[:, row, slot] = c, k
    cache.lengths = torch.tensor(lengths)
    for n, parents, lasts in steps:
        # the verify forward writes one scratch entry per tree node at slots length + node, in every layer
        c_new = torch.randn(layers, batch, n, rank, generator=gen)
        k_new = torch.randn(layers, batch, n, rope, generator=gen)
        slots = cache.lengths[:, None] + torch.arange(n)
        for layer in range(layers):
            cache.write(layer, slots, torch.cat([c_new[layer], k_new[layer]], dim=-1))
        # the engine commits the accepted path, padded with -1 then clamped to 0, as offsets
        paths = [ancestors_of(p, last) for p, last in zip(parents, lasts)]
        width = max(len(path) for path in paths)
        offsets = torch.tensor([path + [-1] * (width - len(path)) for path in paths]).clamp_min(0)
        cache.commit(offsets, torch.tensor([len(path) for path in paths]))
        for row, path in enumerate(paths):
            reference[row] += [(c_new[:, row, node], k_new[:, row, node]) for node in path]
    assert cache.lengths.tolist() == [len(entries) for entries in reference]
    for row, entries in enumerate(reference):
        for slot, (c, k) in enumerate(entries):
            assert torch.equal(cache.c_kv[:, row, slot], c), (row, slot)
            assert torch.equal(cache.k_pe[:, row, slot], k), (row, slot)


@FAST
@given(st.integers(1, 5), st.data())
def test_keep_rows_keeps_the_listed_rows_untouched(batch, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    cache = LatentCache(2, batch, 6, 3, 2)
    cache.c_kv.copy_(torch.randn(cache.c_kv.shape, generator=gen))
    cache.k_pe.copy_(torch.randn(cache.k_pe.shape, generator=gen))
    cache.lengths = torch.randint(0, 7, (batch,), generator=gen)
    before = (cache.c_kv.clone(), cache.k_pe.clone(), cache.lengths.clone())
    kept = sorted(data.draw(st.sets(st.integers(0, batch - 1), min_size=1)))
    rows = torch.tensor(kept)
    cache.keep_rows(rows)
    assert cache.batch_size == len(kept)
    assert torch.equal(cache.c_kv, before[0][:, rows])
    assert torch.equal(cache.k_pe, before[1][:, rows])
    assert torch.equal(cache.lengths, before[2][rows])


# ---------------------------------------------------------------------------- engine: batch compositions

@lru_cache(maxsize=1)
def mostly_right_runtime() -> Runtime:
    """The tiny near-bigram model of test_engine_lossless (drafts mostly accepted), built once per session."""
    return Runtime(build_model(num_mtp=2, seed=3, context_scale=0.01, norm_std=0.0, eh_noise=0.0))


@lru_cache(maxsize=None)
def plain_greedy(prompt: tuple[int, ...], new_tokens: int, eos: int | None) -> list[int]:
    return mostly_right_runtime().generate(input_ids=list(prompt), max_new_tokens=new_tokens, draft="none",
                                           eos_token_id=eos, ignore_eos=eos is None).token_ids


@st.composite
def prompt_batches(draw) -> list[tuple[int, ...]]:
    """1-3 prompts of 1-12 tokens; the tokens come from a drawn seed, so that few examples still vary them."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    return [tuple(rng.randrange(64) for _ in range(draw(st.integers(1, 12)))) for _ in range(draw(st.integers(1, 3)))]


drafts = st.one_of(
    st.builds(lambda k: dict(draft="chain", num_draft_tokens=k), st.integers(1, 4)),
    st.builds(lambda spec: dict(draft="tree", tree=spec), st.sampled_from(["2", "2,1", "3,2,1", "1,2,1", "2,2,2"])),
    st.builds(lambda paths: dict(draft="tree", tree=paths),
              st.sampled_from([[[0], [1], [0, 0], [1, 0], [0, 0, 0]], [[0], [0, 0], [0, 1], [0, 0, 0]]])),
    st.builds(lambda k, d: dict(draft="dynamic", num_draft_tokens=k, depth=d, draft_topk=2), st.integers(2, 6),
              st.integers(1, 4)),
)


@ENGINE
@given(prompt_batches(), drafts, st.integers(1, 24), st.none() | st.integers(0, 2**16))
def test_speculative_batch_equals_each_prompt_decoded_alone(batch, draft, new_tokens, eos_pick):
    """Greedy speculative decoding of a random batch gives, per prompt, plain greedy decoding of it alone.

    The eos token, when there is one, is a token the first prompt's plain output emits: rows then finish at
    different steps, and finished rows are dropped from the running batch.
    """
    eos = None
    if eos_pick is not None:
        first = plain_greedy(batch[0], new_tokens, None)
        eos = first[eos_pick % len(first)]
    results = mostly_right_runtime().generate(input_ids=[list(p) for p in batch], max_new_tokens=new_tokens,
                                              eos_token_id=eos, ignore_eos=eos is None, **draft)
    for prompt, result in zip(batch, results):
        assert result.token_ids == plain_greedy(prompt, new_tokens, eos), (prompt, draft, eos)
