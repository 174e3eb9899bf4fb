"""Draft tree shapes from branching lists, path lists and specs; the batched tree's ancestor mask."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_runtime.errors import GenerationSettingsError
from mtp_runtime.verify.tree import (
    MAX_TREE_DEPTH, DraftTree, StaticTreeShape, parse_tree_spec, tree_from_branching, tree_from_paths,
)


def test_branching_2_2_by_hand():
    shape = tree_from_branching([2, 2])
    assert shape.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert shape.depths == (0, 1, 1, 2, 2, 2, 2)
    assert shape.ranks == (0, 0, 1, 0, 1, 0, 1)
    assert shape.num_nodes == 7 and shape.max_depth == 2
    assert shape.nodes_at_depth(0) == [0]
    assert shape.nodes_at_depth(1) == [1, 2]
    assert shape.nodes_at_depth(2) == [3, 4, 5, 6]
    assert shape.nodes_at_depth(3) == []


def test_branching_3_2_1_counts():
    shape = tree_from_branching([3, 2, 1])
    assert shape.num_nodes == 1 + 3 + 6 + 6
    assert [len(shape.nodes_at_depth(d)) for d in range(4)] == [1, 3, 6, 6]
    # the single child of each depth-2 node is its rank-0 child, in the order of the parents
    assert [shape.parents[i] for i in shape.nodes_at_depth(3)] == shape.nodes_at_depth(2)
    assert all(shape.ranks[i] == 0 for i in shape.nodes_at_depth(3))


def test_chain_and_empty_branching():
    chain = tree_from_branching([1] * 4)
    assert chain.parents == (-1, 0, 1, 2, 3) and chain.depths == (0, 1, 2, 3, 4) and chain.ranks == (0,) * 5
    root_only = tree_from_branching([])
    assert root_only.parents == (-1,) and root_only.max_depth == 0


def test_paths_are_ordered_by_depth_then_lexicographically():
    shape = tree_from_paths([(1, 0), (0,), (0, 1), (1,), (0, 0)])
    # nodes: root, (0,), (1,), (0, 0), (0, 1), (1, 0)
    assert shape.parents == (-1, 0, 0, 1, 1, 2)
    assert shape.depths == (0, 1, 1, 2, 2, 2)
    assert shape.ranks == (0, 0, 1, 0, 1, 0)


def test_paths_deeper_example():
    shape = tree_from_paths([(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0), (0, 1), (2, 0), (0, 0, 1)])
    # root, (0,), (1,), (2,), (0,0), (0,1), (1,0), (2,0), (0,0,0), (0,0,1)
    assert shape.parents == (-1, 0, 0, 0, 1, 1, 2, 3, 4, 4)
    assert shape.ranks == (0, 0, 1, 2, 0, 1, 0, 0, 0, 1)
    assert shape.depths == (0, 1, 1, 1, 2, 2, 2, 2, 3, 3)


def test_branching_equals_its_paths():
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert tree_from_branching([2, 2]) == tree_from_paths(paths)


@pytest.mark.parametrize("spec", ["2,3", " 2, 3 ", "[2,3]", "[2, 3]", [2, 3], (2, 3)])
def test_parse_branching_spec(spec):
    assert parse_tree_spec(spec) == tree_from_branching([2, 3])


def test_parse_paths_spec():
    paths = [[0], [1], [0, 0], [0, 1], [1, 0]]
    expected = tree_from_paths([tuple(path) for path in paths])
    assert parse_tree_spec(json.dumps(paths)) == expected
    assert parse_tree_spec(paths) == expected


def test_size_limit_counts_drafted_nodes():
    assert tree_from_branching([32, 31]).num_nodes == 1 + 32 + 32 * 31  # 1024 drafted: allowed
    with pytest.raises(GenerationSettingsError, match="1024"):
        tree_from_branching([32, 32])
    assert tree_from_branching([1] * MAX_TREE_DEPTH).max_depth == MAX_TREE_DEPTH


@pytest.mark.parametrize("spec, named", [
    ("", "non-empty"),
    ("   ", "non-empty"),
    ("[]", "non-empty"),
    ("0", ">= 1"),
    ("3,0,1", ">= 1"),
    ("-2", ">= 1"),
    ("3,x", "comma-separated"),
    ("3,,2", "comma-separated"),
    ("2.5", "comma-separated"),
    ("[2, 2.5]", "integer"),
    ("[true]", "integer"),
    ("[3,2", "JSON"),
    ('{"a": 1}', "comma-separated"),
    ("[[0], 1]", "integer"),
    ("[[0], [0, 0], [1, 0]]", "prefix \\[1\\]"),
    ("[[0], [0, 1]]", "sibling \\[0, 0\\]"),
    ("[[0], [0]]", "twice"),
    ("[[0], [-1]]", "ranks >= 0"),
    ("[[0], []]", "non-empty"),
    ("[[0], [0.5]]", "integer ranks"),
    (",".join(["1"] * 17), "depth 17"),
    (json.dumps([[0] * d for d in range(1, 18)]), "depth 17"),
    ("4,4,4,4,4", "1024"),
    ("1000,1000,1000", "1024"),
    (3, "tree must be a spec string .*, not int 3"),
    ("[" * 100_000, "nested too deeply"),
    ("[]", "non-empty list"),
])
def test_malformed_specs_raise(spec, named):
    with pytest.raises(GenerationSettingsError, match=named):
        parse_tree_spec(spec)


def test_ancestor_mask_of_a_hand_made_batch():
    # row 0: root -> {1, 2}, 1 -> 3, 2 -> 4;  row 1: the chain 0 -> 1 -> 2 -> 3 -> 4
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]])
    depths = torch.tensor([[0, 1, 1, 2, 2], [0, 1, 2, 3, 4]])
    tree = DraftTree(tokens=torch.zeros(2, 5, dtype=torch.long), parents=parents, depths=depths)
    expected = torch.tensor([
        [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [1, 0, 1, 0, 0],
         [1, 1, 0, 1, 0],
         [1, 0, 1, 0, 1]],
        [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1]],
    ], dtype=torch.bool)
    assert tree.max_depth == 4
    assert torch.equal(tree.ancestor_mask(), expected)


def test_from_shape_gives_every_row_the_shape():
    shape = tree_from_branching([2, 1])
    tokens = torch.arange(10).reshape(2, 5)
    tree = DraftTree.from_shape(shape, tokens)
    assert tree.parents.tolist() == [list(shape.parents)] * 2
    assert tree.depths.tolist() == [list(shape.depths)] * 2
    assert tree.max_depth == 2
    assert tree.ancestor_mask()[:, 4].tolist() == [[True, False, True, False, True]] * 2


@st.composite
def path_sets(draw) -> list[tuple[int, ...]]:
    """A random prefix-closed set of paths with contiguous sibling ranks, in random order."""
    paths: list[tuple[int, ...]] = [()]
    num_children = [0]
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.integers(0, len(paths) - 1))
        if len(paths[parent]) == 6:
            continue
        paths.append(paths[parent] + (num_children[parent],))
        num_children[parent] += 1
        num_children.append(0)
    return draw(st.permutations(paths[1:]))


@settings(max_examples=60, deadline=None)
@given(path_sets())
def test_random_paths_make_consistent_trees(paths):
    shape = tree_from_paths(paths)
    n = shape.num_nodes
    assert n == len(paths) + 1
    assert shape.parents[0] == -1 and shape.depths[0] == 0
    for i in range(1, n):
        assert shape.parents[i] < i
        assert shape.depths[shape.parents[i]] == shape.depths[i] - 1
    assert list(shape.depths) == sorted(shape.depths)
    # children of each node are consecutive and ranked 0, 1, ... in index order
    for u in range(n):
        children = [i for i in range(n) if shape.parents[i] == u]
        assert [shape.ranks[i] for i in children] == list(range(len(children)))
        if children:
            assert children == list(range(children[0], children[0] + len(children)))

    tree = DraftTree.from_shape(shape, torch.zeros(1, n, dtype=torch.long))
    mask = tree.ancestor_mask()[0]  # [n, n]
    as_int = mask.int()
    assert mask.diagonal().all()  # reflexive
    assert torch.equal((as_int @ as_int > 0), mask)  # transitive (and reflexive, so M @ M == M)
    assert torch.equal(mask & mask.T, torch.eye(n, dtype=torch.bool))  # antisymmetric
    assert as_int.sum(1).tolist() == [d + 1 for d in shape.depths]
    for i in range(1, n):
        assert mask[i, shape.parents[i]]


def test_static_shape_is_hashable_and_frozen():
    shape = tree_from_branching([2])
    assert {shape: 1}[StaticTreeShape((-1, 0, 0), (0, 1, 1), (0, 0, 1))] == 1
    with pytest.raises(AttributeError):
        shape.parents = (-1,)
