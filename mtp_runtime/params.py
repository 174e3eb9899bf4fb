"""Run-time knobs of one generate call (draft shape, lengths, stops), separate from the architecture."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .errors import GenerationSettingsError
from .sampling import SamplingParams
from .verify.tree import MAX_TREE_DEPTH, StaticTreeShape, parse_tree_spec, tree_from_branching

DRAFT_MODES = ("auto", "none", "chain", "tree", "dynamic")
DEFAULT_DRAFT_MODE = "auto"
DEFAULT_CHAIN_TOKENS = 1
AUTO_MAX_DEPTH = 4
"""auto: the deepest chain it considers (num_draft_tokens overrides)."""
MAX_DRAFT_TOKENS = 256


@dataclass(frozen=True)
class DraftParams:
    """How the MTP modules draft each step."""

    mode: str = "dynamic"
    """auto (a chain of 0..num_draft_tokens drafts chosen per step), none (plain decoding), chain, tree (static
    shape) or dynamic (EAGLE-2 style growth)."""
    num_draft_tokens: int = 8
    """chain: tokens per step (= depth); auto: the deepest chain; dynamic: nodes kept per step; tree: ignored (the
    shape decides)."""
    tree: StaticTreeShape | None = None
    """Static tree shape (mode 'tree')."""
    depth: int = 4
    """dynamic: maximum depth."""
    topk: int = 4
    """dynamic: children per expanded node, and nodes expanded per depth."""

    @classmethod
    def build(cls, mode: str, num_draft_tokens: int | None = None, tree=None, depth: int | None = None,
              topk: int | None = None) -> "DraftParams":
        """Validated params from user-facing arguments (tree: a spec string, list, or StaticTreeShape)."""
        if mode not in DRAFT_MODES:
            raise GenerationSettingsError(f"unknown draft mode {mode!r}; use one of {', '.join(DRAFT_MODES)}")
        defaults = cls()
        n = defaults.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        if mode == "chain" and num_draft_tokens is None:
            n = DEFAULT_CHAIN_TOKENS
        if mode == "auto" and num_draft_tokens is None:
            n = AUTO_MAX_DEPTH
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_TOKENS:
            raise GenerationSettingsError(
                f"num_draft_tokens={n!r} is out of range; use an integer in 1..{MAX_DRAFT_TOKENS}")
        if mode in ("chain", "auto") and n > MAX_TREE_DEPTH:
            raise GenerationSettingsError(
                f"num_draft_tokens={n} is out of range for a chain (one token per depth); use 1..{MAX_TREE_DEPTH}")
        shape = None
        if mode == "tree":
            shape = tree if isinstance(tree, StaticTreeShape) else parse_tree_spec(tree if tree is not None else "3,2,1")
        elif tree is not None:
            raise GenerationSettingsError(f"a tree shape was given but draft={mode!r}; use draft='tree'")
        depth = defaults.depth if depth is None else depth
        topk = defaults.topk if topk is None else topk
        for name, value in (("depth", depth), ("topk", topk)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise GenerationSettingsError(f"{name}={value!r} is out of range; use an integer in 1..16")
        return cls(mode=mode, num_draft_tokens=n, tree=shape, depth=depth, topk=topk)

    @functools.cached_property
    def shape(self) -> StaticTreeShape | None:
        """The static shape drafted each step (chain = width-one tree); None for dynamic and none. Built once."""
        if self.mode == "chain":
            return tree_from_branching([1] * self.num_draft_tokens)
        return self.tree if self.mode == "tree" else None

    @property
    def max_nodes(self) -> int:
        """Upper bound on drafted nodes per step (sizes the scratch region of the caches)."""
        if self.mode == "none":
            return 0
        if self.mode == "dynamic":
            return self.topk + (self.depth - 1) * self.topk * self.topk
        if self.mode == "auto":
            return self.num_draft_tokens
        return self.shape.num_nodes - 1

    @property
    def max_depth(self) -> int:
        if self.mode == "none":
            return 0
        if self.mode == "auto":
            return self.num_draft_tokens
        return self.depth if self.mode == "dynamic" else self.shape.max_depth

    @property
    def chains_only(self) -> bool:
        """Every tree drafted is a chain (so a commit never moves cache entries)."""
        return self.mode == "auto" or (self.shape is not None and self.shape.num_nodes == self.shape.max_depth + 1)


@functools.lru_cache(maxsize=None)
def chain_params(depth: int) -> DraftParams:
    """A chain of `depth` drafts (what auto drafts at each step)."""
    return DraftParams.build("chain", depth)


@dataclass
class GenerationRequest:
    """Everything one generate call asks for, validated."""

    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    draft: DraftParams = field(default_factory=DraftParams)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    acceptance: str = "exact"
    """'exact' (lossless) or 'typical' (Medusa's LOSSY typical acceptance; needs temperature > 0)."""
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise GenerationSettingsError(
                f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        self.sampling.validate()
        if self.acceptance not in ("exact", "typical"):
            raise GenerationSettingsError(f"acceptance={self.acceptance!r}; use 'exact' or 'typical' (lossy)")
        if self.acceptance == "typical" and self.sampling.greedy:
            raise GenerationSettingsError("typical acceptance needs temperature > 0; greedy decoding is always exact")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise GenerationSettingsError("stop strings must be non-empty strings")
