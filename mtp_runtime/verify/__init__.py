"""Verification of a draft: the token tree the trunk checks, and the rules that accept a path of it."""

from .accept import Acceptance, accept_greedy, accept_sampling, accept_typical
from .tree import DraftTree, StaticTreeShape, parse_tree_spec, tree_from_branching, tree_from_paths

__all__ = [
    "Acceptance", "DraftTree", "StaticTreeShape", "accept_greedy", "accept_sampling", "accept_typical",
    "parse_tree_spec", "tree_from_branching", "tree_from_paths",
]
