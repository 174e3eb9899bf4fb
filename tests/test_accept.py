"""Acceptance rules on hand-made trees (greedy, typical) and exact-distribution tests of sampling.

The sampling tests simulate a Markov "language model" on a 5-token vocabulary: the target's next
token after x follows P[x] and the drafter's Q[x]. The drafter fills a tree by Gumbel-top-k
(children of a node drawn from Q without replacement, best first); accept_sampling must then
emit tokens whose law is exactly that of plain sampling from P. A chi-square test compares the
empirical law of the first (and first two) emitted tokens with P, and the same test is shown to
reject deliberately broken variants, so that passing it means something.
"""

from __future__ import annotations

import pytest
import torch

from mtp_runtime.errors import GenerationSettingsError
from mtp_runtime.verify import accept as accept_module
from mtp_runtime.verify.accept import Acceptance, accept_greedy, accept_sampling, accept_typical
from mtp_runtime.verify.tree import DraftTree, StaticTreeShape, tree_from_branching

TRIALS = 20000
MIN_P_VALUE = 1e-3

# P[x] / Q[x]: target / draft distribution of the token after x; zeros on both sides on purpose
P = torch.tensor([
    [0.05, 0.40, 0.30, 0.25, 0.00],
    [0.30, 0.05, 0.15, 0.20, 0.30],
    [0.10, 0.10, 0.60, 0.00, 0.20],
    [0.25, 0.25, 0.25, 0.15, 0.10],
    [0.40, 0.00, 0.10, 0.30, 0.20],
])
Q = torch.tensor([
    [0.30, 0.10, 0.35, 0.05, 0.20],
    [0.10, 0.50, 0.00, 0.20, 0.20],
    [0.20, 0.30, 0.20, 0.10, 0.20],
    [0.05, 0.05, 0.10, 0.40, 0.40],
    [0.20, 0.20, 0.20, 0.20, 0.20],
])
# a drafter whose first distribution has only two tokens: a third sibling is an impossible draw
Q_SPARSE = Q.clone()
Q_SPARSE[0] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])
# a drafter that is sure of a token the target finds less likely: the first sibling is often
# rejected, so how the later ones were drawn matters
Q_PEAKED = Q.clone()
Q_PEAKED[0] = torch.tensor([0.05, 0.05, 0.70, 0.10, 0.10])
ROOT = 0


# ---------------------------------------------------------------------------- greedy

def shape_tree(shape: StaticTreeShape, tokens: list[list[int]], valid=None) -> DraftTree:
    return DraftTree.from_shape(shape, torch.tensor(tokens), valid=None if valid is None else torch.tensor(valid))


def check(result: Acceptance, path: list[list[int]], num_accepted: list[int], bonus: list[int]) -> None:
    assert result.path.tolist() == path
    assert result.num_accepted.tolist() == num_accepted
    assert result.bonus.tolist() == bonus


# shape [2, 2]: root 0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5, 6}
BRANCHING_2_2 = tree_from_branching([2, 2])
TOKENS_2_2 = [10, 11, 12, 13, 14, 15, 16]


def argmax_row(**after: int) -> list[int]:
    """target_argmax for the [2, 2] tree: the trunk's token after each node (node names n0..n6), default 0."""
    return [after.get(f"n{i}", 0) for i in range(7)]


@pytest.mark.parametrize("after, path, num_accepted, bonus", [
    # full: 12 after the root, 16 after node 2, then the bonus
    ({"n0": 12, "n2": 16, "n6": 99}, [0, 2, 6], 2, 99),
    # partial: node 1 is right, neither of its children (13, 14)
    ({"n0": 11, "n1": 77}, [0, 1, -1], 1, 77),
    # none: the trunk wanted 55 after the root
    ({"n0": 55}, [0, -1, -1], 0, 55),
    # the first child of node 1 is right
    ({"n0": 11, "n1": 13, "n3": 7}, [0, 1, 3], 2, 7),
    # a correct token in the other branch (16 after node 1) does not count
    ({"n0": 11, "n1": 16, "n6": 3}, [0, 1, -1], 1, 16),
])
def test_greedy_on_a_2_2_tree(after, path, num_accepted, bonus):
    tree = shape_tree(BRANCHING_2_2, [TOKENS_2_2])
    result = accept_greedy(tree, torch.tensor([argmax_row(**after)]))
    check(result, [path], [num_accepted], [bonus])


def test_greedy_batch_rows_with_different_outcomes():
    cases = [
        ({"n0": 12, "n2": 16, "n6": 99}, [0, 2, 6], 2, 99),
        ({"n0": 55}, [0, -1, -1], 0, 55),
        ({"n0": 11, "n1": 77}, [0, 1, -1], 1, 77),
        ({"n0": 12, "n2": 15, "n5": 8}, [0, 2, 5], 2, 8),
    ]
    tokens = [TOKENS_2_2] * len(cases)
    target_argmax = torch.tensor([argmax_row(**after) for after, *_ in cases])
    result = accept_greedy(shape_tree(BRANCHING_2_2, tokens), target_argmax)
    check(result, [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases])


def test_greedy_prefers_the_deeper_of_two_correct_branches():
    # both children of the root carry token 11 (a duplicate draw); only node 2's subtree goes on
    tokens = [[10, 11, 11, 13, 14, 15, 16]]
    result = accept_greedy(shape_tree(BRANCHING_2_2, tokens), torch.tensor([argmax_row(n0=11, n1=1, n2=16, n6=5)]))
    check(result, [[0, 2, 6]], [2], [5])


def test_greedy_breaks_a_depth_tie_by_the_lowest_index():
    tokens = [[10, 11, 11, 13, 14, 13, 16]]
    result = accept_greedy(shape_tree(BRANCHING_2_2, tokens),
                           torch.tensor([argmax_row(n0=11, n1=13, n2=13, n3=4, n5=6)]))
    check(result, [[0, 1, 3]], [2], [4])


def test_greedy_never_accepts_an_invalid_node():
    valid = [[True, False, True, True, True, True, True]]
    tree = shape_tree(BRANCHING_2_2, [TOKENS_2_2], valid)
    check(accept_greedy(tree, torch.tensor([argmax_row(n0=11, n1=13)])), [[0, -1, -1]], [0], [11])
    valid = [[True, True, True, True, True, False, True]]
    tree = shape_tree(BRANCHING_2_2, [TOKENS_2_2], valid)
    check(accept_greedy(tree, torch.tensor([argmax_row(n0=12, n2=15)])), [[0, 2, -1]], [1], [15])


def test_greedy_on_an_uneven_hand_made_batch():
    # row 0: a chain 0 -> 1 -> 2 -> 3 and a side child 4 of the root; row 1: root with 4 children
    parents = torch.tensor([[-1, 0, 1, 2, 0], [-1, 0, 0, 0, 0]])
    depths = torch.tensor([[0, 1, 2, 3, 1], [0, 1, 1, 1, 1]])
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    tree = DraftTree(tokens, parents, depths)
    target_argmax = torch.tensor([[6, 7, 8, 1, 0], [9, 0, 0, 0, 2]])
    check(accept_greedy(tree, target_argmax), [[0, 1, 2, 3], [0, 4, -1, -1]], [3, 1], [1, 2])
    target_argmax = torch.tensor([[9, 7, 8, 1, 3], [4, 0, 0, 0, 2]])
    check(accept_greedy(tree, target_argmax), [[0, 4, -1, -1], [0, -1, -1, -1]], [1, 0], [3, 4])


def test_greedy_on_a_root_only_tree():
    tree = DraftTree(torch.tensor([[4], [5]]), torch.tensor([[-1], [-1]]), torch.tensor([[0], [0]]))
    check(accept_greedy(tree, torch.tensor([[7], [8]])), [[0], [0]], [0, 0], [7, 8])


# ---------------------------------------------------------------------------- sampling: simulation

def gumbel_top_k(q: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[N, V] distributions -> [N, k] tokens drawn one after another without replacement."""
    uniform = torch.rand(q.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    keys = q.double().log() - (-uniform.log()).log()  # log q + Gumbel noise
    return keys.topk(k, dim=-1).indices


def draft(shape: StaticTreeShape, roots: torch.Tensor, draft_table: torch.Tensor, generator,
          target_table: torch.Tensor = P) -> tuple[DraftTree, torch.Tensor]:
    """Fill `shape` for every root token by Gumbel-top-k from the drafter; return the tree and target_probs."""
    tokens = torch.empty(len(roots), shape.num_nodes, dtype=torch.long)  # [N, n]
    tokens[:, 0] = roots
    for u in range(shape.num_nodes):
        children = [i for i in range(shape.num_nodes) if shape.parents[i] == u]
        if children:
            tokens[:, children] = gumbel_top_k(draft_table[tokens[:, u]], len(children), generator)
    tree = DraftTree.from_shape(shape, tokens, draft_probs=draft_table[tokens])  # draft_probs [N, n, V]
    return tree, target_table[tokens]  # target_probs [N, n, V]


def emitted(tree: DraftTree, result: Acceptance) -> torch.Tensor:
    """[N, P] tokens emitted by one step (accepted drafts, then the bonus), padded with -1."""
    drafted = torch.where(result.path[:, 1:] >= 0, tree.tokens.gather(1, result.path.clamp(min=0))[:, 1:], -1)
    padded = torch.cat([drafted, torch.full_like(drafted[:, :1], -1)], dim=1)
    return padded.scatter(1, result.num_accepted[:, None], result.bonus[:, None])


def speculative_step(shape: StaticTreeShape, roots: torch.Tensor, draft_table: torch.Tensor, generator,
                     target_table: torch.Tensor = P) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft + accept_sampling step from each root: ([N, P] emitted tokens, [N] num_accepted)."""
    tree, target_probs = draft(shape, roots, draft_table, generator, target_table)
    result = accept_sampling(tree, target_probs, generator)
    return emitted(tree, result), result.num_accepted


def first_token(shape: StaticTreeShape, draft_table: torch.Tensor, seed: int) -> torch.Tensor:
    """[TRIALS]: the first token a speculative step emits from ROOT."""
    generator = torch.Generator().manual_seed(seed)
    return speculative_step(shape, torch.full((TRIALS,), ROOT), draft_table, generator)[0][:, 0]


def first_two_tokens(shape: StaticTreeShape, draft_table: torch.Tensor, seed: int,
                     target_table: torch.Tensor = P) -> torch.Tensor:
    """[TRIALS, 2]: the first two tokens a speculative run emits from ROOT (two steps where needed)."""
    generator = torch.Generator().manual_seed(seed)
    tokens, num_accepted = speculative_step(shape, torch.full((TRIALS,), ROOT), draft_table, generator, target_table)
    # a step that emitted only its bonus is followed by a second step rooted at it
    next_tokens, _ = speculative_step(shape, tokens[:, 0], draft_table, generator, target_table)
    second = torch.where(num_accepted >= 1, tokens[:, 1], next_tokens[:, 0])
    return torch.stack([tokens[:, 0], second], dim=1)


def chi_square_p_value(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the chi-square goodness-of-fit test of integer samples against probs (0 on impossible draws)."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    possible = probs > 0
    expected = probs[possible].double() * len(samples)
    statistic = ((counts[possible] - expected) ** 2 / expected).sum()
    dof = torch.tensor(possible.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


def first_token_p_value(shape: StaticTreeShape, draft_table: torch.Tensor = Q, seed: int = 0) -> float:
    return chi_square_p_value(first_token(shape, draft_table, seed), P[ROOT])


def joint_p_value(shape: StaticTreeShape, seed: int = 0, target_table: torch.Tensor = P) -> float:
    pairs = first_two_tokens(shape, Q, seed, target_table)
    vocab = P.shape[0]
    joint = P[ROOT][:, None] * P  # [V, V] plain sampling: P(a) P(b | a)
    return chi_square_p_value(pairs[:, 0] * vocab + pairs[:, 1], joint.flatten())


SHAPES = {
    "chain1": tree_from_branching([1]),
    "chain2": tree_from_branching([1, 1]),
    "siblings2": tree_from_branching([2]),
    "siblings3": tree_from_branching([3]),
    "tree3x2": tree_from_branching([3, 2]),
}


def test_chi_square_helper_sees_a_small_bias():
    generator = torch.Generator().manual_seed(0)
    fair = torch.multinomial(P[ROOT], TRIALS, replacement=True, generator=generator)
    assert chi_square_p_value(fair, P[ROOT]) > MIN_P_VALUE
    biased = (P[ROOT] + torch.tensor([0.03, -0.03, 0.0, 0.0, 0.0]))
    assert chi_square_p_value(torch.multinomial(biased, TRIALS, replacement=True, generator=generator),
                              P[ROOT]) < MIN_P_VALUE
    assert chi_square_p_value(torch.tensor([4, 0, 1]), P[ROOT]) == 0.0  # token 4 is impossible under P[0]


# ---------------------------------------------------------------------------- sampling: exactness

@pytest.mark.parametrize("name", list(SHAPES))
def test_sampling_first_token_follows_the_target(name):
    assert first_token_p_value(SHAPES[name]) > MIN_P_VALUE


def test_sampling_skips_siblings_the_drafter_could_not_draw():
    assert first_token_p_value(SHAPES["siblings3"], Q_SPARSE) > MIN_P_VALUE


@pytest.mark.parametrize("name", ["siblings2", "siblings3"])
def test_sampling_with_a_peaked_drafter(name):
    assert first_token_p_value(SHAPES[name], Q_PEAKED) > MIN_P_VALUE


@pytest.mark.parametrize("name", ["chain2", "tree3x2"])
def test_sampling_first_two_tokens_follow_the_target(name):
    assert joint_p_value(SHAPES[name]) > MIN_P_VALUE


def test_power_bonus_from_p_instead_of_the_residual(monkeypatch):
    monkeypatch.setattr(accept_module, "_residual", lambda p, q: p)
    assert first_token_p_value(SHAPES["chain1"]) < MIN_P_VALUE
    assert first_token_p_value(SHAPES["siblings3"]) < MIN_P_VALUE


def test_power_siblings_treated_as_drawn_with_replacement(monkeypatch):
    monkeypatch.setattr(accept_module, "_without", lambda q, token: q)
    assert first_token_p_value(SHAPES["siblings2"], Q_PEAKED) < MIN_P_VALUE
    assert first_token_p_value(SHAPES["siblings3"], Q_PEAKED) < MIN_P_VALUE


def test_power_joint_test_sees_a_wrong_target_at_the_child():
    # every node verified against the root's target: the first token stays right, the second does not
    wrong = P[ROOT].expand_as(P)
    assert first_token_p_value(SHAPES["chain2"]) > MIN_P_VALUE
    assert joint_p_value(SHAPES["chain2"], target_table=wrong) < MIN_P_VALUE


def test_sampling_never_accepts_padding_and_stays_exact():
    generator = torch.Generator().manual_seed(3)
    shape = tree_from_branching([3])
    tree, target_probs = draft(tree_from_branching([2]), torch.full((TRIALS,), ROOT), Q, generator)
    # append a padding sibling carrying token 1, the likeliest under the target
    tree = DraftTree.from_shape(
        shape, torch.cat([tree.tokens, torch.ones(TRIALS, 1, dtype=torch.long)], dim=1),
        draft_probs=torch.cat([tree.draft_probs, tree.draft_probs[:, :1]], dim=1),
        valid=torch.tensor([True, True, True, False]).expand(TRIALS, 4))
    target_probs = torch.cat([target_probs, target_probs[:, :1]], dim=1)
    result = accept_sampling(tree, target_probs, generator)
    assert not (result.path == 3).any()
    assert chi_square_p_value(emitted(tree, result)[:, 0], P[ROOT]) > MIN_P_VALUE


def test_sampling_paths_are_well_formed():
    generator = torch.Generator().manual_seed(1)
    shape = SHAPES["tree3x2"]
    tree, target_probs = draft(shape, torch.randint(0, 5, (500,), generator=generator), Q, generator)
    result = accept_sampling(tree, target_probs, generator)
    assert result.path.shape == (500, 3)
    assert (result.path[:, 0] == 0).all()
    assert ((result.path >= 0).sum(1) == result.num_accepted + 1).all()
    parents = torch.tensor(shape.parents)
    for row, length in zip(result.path.tolist(), result.num_accepted.tolist()):
        assert all(parents[row[d]] == row[d - 1] for d in range(1, length + 1))
        assert all(node == -1 for node in row[length + 1:])


def test_sampling_with_the_draft_equal_to_the_target_accepts_everything():
    generator = torch.Generator().manual_seed(2)
    tree, target_probs = draft(SHAPES["chain2"], torch.full((1000,), ROOT), P, generator)
    result = accept_sampling(tree, target_probs, generator)
    assert (result.num_accepted == 2).all()


def test_sampling_with_a_one_hot_target_emits_it():
    generator = torch.Generator().manual_seed(4)
    one_hot = torch.eye(5)[[3, 2, 4, 1, 0]]  # after x the target surely emits one_hot[x].argmax()
    tree, target_probs = draft(SHAPES["siblings2"], torch.full((1000,), ROOT), Q, generator, one_hot)
    first = emitted(tree, accept_sampling(tree, target_probs, generator))[:, 0]
    assert (first == 3).all()


def test_sampling_needs_draft_probs():
    tree = shape_tree(SHAPES["chain1"], [[0, 1]])
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampling(tree, P[[0, 1]][None], None)


# ---------------------------------------------------------------------------- typical (lossy)

def typical_tree(tokens: list[int], parents: list[int], depths: list[int], trials: int = 1) -> DraftTree:
    return DraftTree(torch.tensor([tokens] * trials), torch.tensor([parents] * trials), torch.tensor([depths] * trials))


def test_typical_is_lossy_as_documented():
    # target after the root: [0.5, 0.45, 0.05]; a drafted 1 (p = 0.45 > 0.09) is ALWAYS accepted,
    # although plain sampling would emit it only 45% of the time
    target = torch.tensor([[0.5, 0.45, 0.05], [0.0, 0.0, 1.0]])
    tree = typical_tree([0, 1], [-1, 0], [0, 1], trials=2000)
    result = accept_typical(tree, target.expand(2000, 2, 3), generator=torch.Generator().manual_seed(0))
    assert (result.num_accepted == 1).all()
    assert (result.bonus == 2).all()  # sampled from the (one-hot) target at the accepted node


def test_typical_rejects_an_unlikely_token_and_samples_the_bonus_at_the_root():
    # entropy of [0.5, 0.45, 0.05] is 0.86, so the threshold is min(0.09, 0.3 * exp(-0.86)) = 0.09 > 0.05
    target = torch.tensor([[0.5, 0.45, 0.05], [1.0, 0.0, 0.0]])
    result = accept_typical(typical_tree([0, 2], [-1, 0], [0, 1], trials=1000), target.expand(1000, 2, 3),
                            generator=torch.Generator().manual_seed(0))
    assert (result.num_accepted == 0).all()
    frequencies = torch.bincount(result.bonus, minlength=3).float() / 1000
    torch.testing.assert_close(frequencies, target[0], atol=0.06, rtol=0)


def test_typical_threshold_falls_with_the_entropy():
    # uniform over 100 tokens: p(x) = 0.01 < 0.09, but 0.3 * exp(-log 100) = 0.003 < 0.01: accepted
    uniform = torch.full((1, 2, 100), 0.01)
    assert accept_typical(typical_tree([0, 7], [-1, 0], [0, 1]), uniform).num_accepted.item() == 1
    assert accept_typical(typical_tree([0, 7], [-1, 0], [0, 1]), uniform, posterior_alpha=2.0).num_accepted.item() == 0


def test_typical_takes_the_deepest_path_then_the_likelier_one():
    # root -> {1: token 1, 2: token 2}; 1 -> 3 (token 0), 2 -> 4 (token 0); 3 -> 5
    parents, depths = [-1, 0, 0, 1, 2, 3], [0, 1, 1, 2, 2, 3]
    confident = torch.tensor([0.9, 0.05, 0.05])  # threshold min(0.09, 0.3 * exp(-0.39)) = 0.09
    target = torch.stack([torch.tensor([0.1, 0.3, 0.6]), confident, confident, confident, confident,
                          torch.tensor([0.0, 0.0, 1.0])])[None]  # [1, 6, 3]
    # node 5 carries token 0 (p = 0.9): the path through the less likely token 1 is deeper, and wins
    deep = accept_typical(typical_tree([0, 1, 2, 0, 0, 0], parents, depths), target)
    assert deep.path.tolist() == [[0, 1, 3, 5]] and deep.bonus.item() == 2
    # node 5 carries token 1 (p = 0.05 < 0.09): two paths of depth 2 remain, 0 -> 1 -> 3 and
    # 0 -> 2 -> 4, and the one through token 2 (p = 0.6 against 0.3) wins
    tie = accept_typical(typical_tree([0, 1, 2, 0, 0, 1], parents, depths), target)
    assert tie.path.tolist() == [[0, 2, 4, -1]] and tie.num_accepted.item() == 2


@pytest.mark.parametrize("settings", [{"posterior_threshold": -0.1}, {"posterior_alpha": float("nan")}])
def test_typical_rejects_bad_settings(settings):
    with pytest.raises(GenerationSettingsError):
        accept_typical(typical_tree([0, 1], [-1, 0], [0, 1]), torch.full((1, 2, 3), 1 / 3), **settings)
