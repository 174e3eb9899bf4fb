"""Draft trees: the static shapes a user asks for, and the batched trees the verifier walks.

Node 0 of every tree is the root, the last emitted token (not yet in the cache); every other
node is a drafted token. Nodes are stored in topological order (parents before children) and,
for static shapes, by depth then by the ranks along their path, so that the children of a node
are consecutive and best first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import GenerationSettingsError
from ..validate import is_int, show, wrong_type

MAX_TREE_DEPTH = 16
MAX_TREE_NODES = 1024
"""Bounds on a static shape: the depth, and the number of drafted nodes (the root not counted)."""
MAX_SPEC_CHARS = 100_000
"""Longest tree spec text accepted (far above the JSON of MAX_TREE_NODES paths of MAX_TREE_DEPTH ranks)."""


@dataclass
class DraftTree:
    """One draft tree per row of the batch; rows share the node count n, padding marked invalid."""

    tokens: torch.Tensor
    """[B, n] token id of each node; column 0 is the root."""
    parents: torch.Tensor
    """[B, n] index of each node's parent; -1 for the root, otherwise smaller than the node's own."""
    depths: torch.Tensor
    """[B, n] number of edges from the root; 0 for the root."""
    draft_probs: torch.Tensor | None = None
    """[B, n, V] the processed draft distribution q at each node over its children; None under greedy."""
    valid: torch.Tensor | None = None
    """[B, n] False marks padding and invalid draws, never accepted; None means all valid."""
    chain: bool = False
    """Every row is a chain: node i's parent is node i - 1 (known from the shape, never from the data)."""

    @classmethod
    def from_shape(cls, shape: StaticTreeShape, tokens: torch.Tensor,
                   draft_probs: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> DraftTree:
        """Give every row of `tokens` ([B, n]) the topology of `shape`."""
        batch = tokens.shape[0]
        parents = torch.tensor(shape.parents, device=tokens.device).expand(batch, -1)  # [B, n]
        depths = torch.tensor(shape.depths, device=tokens.device).expand(batch, -1)  # [B, n]
        return cls(tokens, parents, depths, draft_probs, valid)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def select_rows(self, rows: torch.Tensor) -> "DraftTree":
        """The same trees for the batch rows listed in rows only."""
        probs = None if self.draft_probs is None else self.draft_probs[rows]
        valid = None if self.valid is None else self.valid[rows]
        return DraftTree(self.tokens[rows], self.parents[rows], self.depths[rows], probs, valid, self.chain)

    def ancestor_mask(self) -> torch.Tensor:
        """[B, n, n] bool: [b, i, j] is True iff node j is node i or one of its ancestors."""
        batch, n = self.parents.shape
        eye = torch.eye(n, dtype=torch.bool, device=self.parents.device).expand(batch, n, n)
        has_parent = (self.parents >= 0)[..., None]  # [B, n, 1]
        parent_rows = self.parents.clamp(min=0)[..., None].expand(batch, n, n)  # [B, n, n]
        mask = eye
        # each pass copies the parent's row, so after d passes every node sees d levels up
        for _ in range(self.max_depth):
            mask = eye | (has_parent & mask.gather(1, parent_rows))
        return mask


@dataclass(frozen=True)
class StaticTreeShape:
    """One tree topology shared by every row and every step."""

    parents: tuple[int, ...]
    """Parent of each node, root included: parents[0] == -1."""
    depths: tuple[int, ...]
    """Depth of each node; the root has depth 0."""
    ranks: tuple[int, ...]
    """Node i is the ranks[i]-th best (0-based) child of its parent; 0 for the root."""

    @property
    def num_nodes(self) -> int:
        """Number of nodes, the root included."""
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def nodes_at_depth(self, depth: int) -> list[int]:
        return [i for i, d in enumerate(self.depths) if d == depth]


def tree_from_branching(branching: list[int]) -> StaticTreeShape:
    """Full tree: the root has branching[0] children, each of them branching[1], and so on."""
    for width in branching:
        if not is_int(width, 1):
            raise GenerationSettingsError(
                f"tree branching {list(branching)} is invalid: every entry must be an integer >= 1")
    _check_depth(len(branching))
    level, total = 1, 0
    for width in branching:
        level *= width
        total += level
        _check_size(total)
    level_paths: list[tuple[int, ...]] = [()]
    paths: list[tuple[int, ...]] = []
    for width in branching:
        level_paths = [path + (rank,) for path in level_paths for rank in range(width)]
        paths += level_paths
    return tree_from_paths(paths)


def tree_from_paths(paths: list[tuple[int, ...]]) -> StaticTreeShape:
    """Medusa-style choices: each path lists child ranks from the root, e.g. [(0,), (1,), (0, 0)]."""
    paths = [_as_path(path) for path in paths]
    if len(set(paths)) != len(paths):
        raise GenerationSettingsError(f"tree paths {paths} are invalid: a path is listed twice")
    _check_depth(max((len(path) for path in paths), default=0))
    _check_size(len(paths))
    present = set(paths)
    for path in paths:
        if path[:-1] and path[:-1] not in present:
            raise GenerationSettingsError(
                f"tree path {list(path)} is invalid: its prefix {list(path[:-1])} is not in the tree")
        # children are drawn best first, so rank r needs its siblings of rank < r
        if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in present:
            raise GenerationSettingsError(
                f"tree path {list(path)} is invalid: its sibling {list(path[:-1]) + [path[-1] - 1]} is not in the tree")
    ordered = [()] + sorted(paths, key=lambda path: (len(path), path))
    index = {path: i for i, path in enumerate(ordered)}
    return StaticTreeShape(
        parents=tuple(index[path[:-1]] if path else -1 for path in ordered),
        depths=tuple(len(path) for path in ordered),
        ranks=tuple(path[-1] if path else 0 for path in ordered),
    )


def parse_tree_spec(spec: str | list) -> StaticTreeShape:
    """"3,2,1" or [3, 2, 1] -> branching; "[[0], [1], [0, 0]]" (JSON) or a list of lists -> paths."""
    if isinstance(spec, str):
        spec = _parse_text(spec)
    elif not isinstance(spec, (list, tuple)):
        raise wrong_type("tree", spec, "a spec string such as '3,2,1', a list of branching factors or of "
                                       "Medusa-style paths, or a StaticTreeShape")
    if len(spec) == 0:
        raise GenerationSettingsError(f"tree spec {show(spec)} is invalid: expected a non-empty list")
    if all(isinstance(entry, (list, tuple)) for entry in spec):
        return tree_from_paths([tuple(entry) for entry in spec])
    return tree_from_branching(list(spec))


def _parse_text(text: str) -> list:
    text = text.strip()
    if len(text) > MAX_SPEC_CHARS:
        raise GenerationSettingsError(f"tree spec of {len(text)} characters is too long: at most {MAX_SPEC_CHARS} "
                                      f"(a tree has at most {MAX_TREE_NODES} drafted nodes)")
    if text.startswith("["):
        try:
            spec = json.loads(text)
        except RecursionError:
            raise GenerationSettingsError("tree spec is not valid: nested too deeply (paths are lists of ranks, "
                                          "e.g. '[[0],[1],[0,0]]')") from None
        except json.JSONDecodeError as error:
            raise GenerationSettingsError(f"tree spec {show(text)} is not valid JSON: {error}") from None
        if not isinstance(spec, list):
            raise GenerationSettingsError(f"tree spec {show(text)} is invalid: expected a JSON list of paths")
        return spec
    try:
        return [int(part) for part in text.split(",")] if text else []
    except ValueError:
        raise GenerationSettingsError(
            f"tree spec {show(text)} is invalid: expected comma-separated integers such as '3,2,1'") from None


def _as_path(path) -> tuple[int, ...]:
    path = tuple(path)
    if not path or not all(is_int(r, 0) for r in path):
        raise GenerationSettingsError(
            f"tree path {list(path)} is invalid: it must be a non-empty list of integer ranks >= 0")
    return path


def _check_depth(depth: int) -> None:
    if depth > MAX_TREE_DEPTH:
        raise GenerationSettingsError(f"tree depth {depth} is too deep: at most {MAX_TREE_DEPTH} is supported")


def _check_size(num_drafted: int) -> None:
    if num_drafted > MAX_TREE_NODES:
        raise GenerationSettingsError(
            f"tree has {num_drafted} drafted nodes or more: at most {MAX_TREE_NODES} are supported")
