"""Run-time knobs of one generate call (draft shape, lengths, stops), separate from the architecture."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .errors import GenerationSettingsError, NoMTPModulesError
from .sampling import SamplingParams
from .validate import check_text, is_int, show, wrong_type
from .verify.tree import MAX_TREE_DEPTH, StaticTreeShape, parse_tree_spec, tree_from_branching

DRAFT_MODES = ("auto", "none", "chain", "tree", "dynamic")
DEFAULT_DRAFT_MODE = "auto"
DEFAULT_CHAIN_TOKENS = 1
AUTO_MAX_DEPTH = 8
"""auto: the deepest chain it considers (num_draft_tokens overrides). On the shipped model a chain of 8 is still
faster than one of 4 (verifying 9 nodes reads little more expert weight than 5 do), and auto shortens the chain
where the text is harder (BENCHMARKS.md §13)."""
MAX_DRAFT_TOKENS = 256
DRAFT_KNOBS = {
    "auto": ("num_draft_tokens",),
    "none": (),
    "chain": ("num_draft_tokens",),
    "tree": ("tree",),
    "dynamic": ("num_draft_tokens", "depth", "draft_topk"),
}
"""The draft arguments each mode reads."""
NOT_READ_BECAUSE = {
    "auto": "auto drafts chains of at most num_draft_tokens",
    "none": "plain decoding drafts nothing",
    "chain": "a chain's depth is num_draft_tokens",
    "tree": "the tree shape decides what is drafted",
    "dynamic": "dynamic trees are grown, not given",
}


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
        """Validated params from user-facing arguments (tree: a spec string, list, or StaticTreeShape).

        An argument given (not None) that `mode` does not read is an error, never silently ignored."""
        if not isinstance(mode, str):
            raise wrong_type("draft", mode, f"one of {', '.join(map(repr, DRAFT_MODES))}, or None")
        if mode not in DRAFT_MODES:
            raise GenerationSettingsError(f"unknown draft mode {show(mode)}; use one of {', '.join(DRAFT_MODES)}")
        given = {"num_draft_tokens": num_draft_tokens, "tree": tree, "depth": depth, "draft_topk": topk}
        for name, value in given.items():
            if value is not None and name not in DRAFT_KNOBS[mode]:
                users = " or ".join(repr(m) for m in DRAFT_MODES if name in DRAFT_KNOBS[m])
                raise GenerationSettingsError(f"{name}={show(value)} does not apply to draft={mode!r} "
                                              f"({NOT_READ_BECAUSE[mode]}); drop it, or use draft={users}")
        defaults = cls()
        n = defaults.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        if mode == "chain" and num_draft_tokens is None:
            n = DEFAULT_CHAIN_TOKENS
        if mode == "auto" and num_draft_tokens is None:
            n = AUTO_MAX_DEPTH
        if not is_int(n):
            raise wrong_type("num_draft_tokens", n, f"an integer in 1..{MAX_DRAFT_TOKENS}, or None")
        if not 1 <= n <= MAX_DRAFT_TOKENS:
            raise GenerationSettingsError(
                f"num_draft_tokens={n!r} is out of range; use an integer in 1..{MAX_DRAFT_TOKENS}")
        if mode in ("chain", "auto") and n > MAX_TREE_DEPTH:
            raise GenerationSettingsError(
                f"num_draft_tokens={n} is out of range for a chain (one token per depth); use 1..{MAX_TREE_DEPTH}")
        shape = None
        if mode == "tree":
            shape = tree if isinstance(tree, StaticTreeShape) else parse_tree_spec(tree if tree is not None else "3,2,1")
        depth = defaults.depth if depth is None else depth
        topk = defaults.topk if topk is None else topk
        for name, value in (("depth", depth), ("draft_topk", topk)):
            if not is_int(value):
                raise wrong_type(name, value, "an integer in 1..16, or None")
            if not 1 <= value <= 16:
                raise GenerationSettingsError(f"{name}={value!r} is out of range; use an integer in 1..16")
        return cls(mode=mode, num_draft_tokens=int(n), tree=shape, depth=int(depth), topk=int(topk))

    def knobs(self) -> dict:
        """The arguments this mode reads, with their values (what a report of this configuration shows)."""
        values = {"num_draft_tokens": self.num_draft_tokens, "tree": self.tree, "depth": self.depth,
                  "draft_topk": self.topk}
        return {name: values[name] for name in DRAFT_KNOBS[self.mode]}

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


def resolve_draft(draft: str | None, num_mtp_modules: int | None, num_draft_tokens=None, tree=None, depth=None,
                  topk=None) -> DraftParams:
    """The draft of one generate call: the one rule for the defaults, used by Runtime.generate and by the CLI's
    check before the model loads (num_mtp_modules None: not known yet, assumed present).

    draft None means 'tree' when a tree is given, 'none' on a checkpoint without MTP modules (unless other draft
    arguments ask for drafting), else DEFAULT_DRAFT_MODE."""
    if draft is None:
        asks_to_draft = any(v is not None for v in (num_draft_tokens, depth, topk))
        if tree is not None:
            draft = "tree"
        elif num_mtp_modules == 0 and not asks_to_draft:
            draft = "none"
        else:
            draft = DEFAULT_DRAFT_MODE
    params = DraftParams.build(draft, num_draft_tokens, tree, depth, topk)
    if params.mode != "none" and num_mtp_modules == 0:
        raise NoMTPModulesError()
    return params


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
        """Raise GenerationSettingsError when a field is of the wrong type or out of range."""
        if not is_int(self.max_new_tokens):
            raise wrong_type("max_new_tokens", self.max_new_tokens, "a positive integer")
        if self.max_new_tokens <= 0:
            raise GenerationSettingsError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        self.sampling.validate()
        if not isinstance(self.acceptance, str) or self.acceptance not in ("exact", "typical"):
            raise GenerationSettingsError(f"acceptance={show(self.acceptance)} is unknown; use 'exact' or 'typical' "
                                          "(lossy)")
        if self.acceptance == "typical" and self.sampling.greedy:
            raise GenerationSettingsError("typical acceptance needs temperature > 0; greedy decoding is always exact")
        for stop in self.stop_strings:
            if not isinstance(stop, str):
                raise wrong_type("stop", stop, "a non-empty string or a list of them")
            if not stop:
                raise GenerationSettingsError("stop strings must be non-empty strings")
            check_text(stop, f"stop string {show(stop)}")
        if not all(is_int(t, 0) for t in self.eos_token_ids):
            raise wrong_type("eos_token_id", self.eos_token_ids, "a token id >= 0 or a list of them")
