"""The configurations a benchmark sweeps: plain decoding first, then each draft mode and size."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import GenerationSettingsError
from ..params import DraftParams

DEFAULT_DRAFTS = ("auto", "chain", "tree", "dynamic")
"""The full sweep's draft modes (bench --full)."""
QUICK_DRAFTS = ("auto", "chain")
"""bench's default: plain decoding, auto and a one-token chain."""


@dataclass(frozen=True)
class DraftConfig:
    """One configuration of a sweep; mode 'none' is the plain-decoding baseline."""

    mode: str
    num_draft_tokens: int | None = None
    tree: str | None = None
    depth: int | None = None
    topk: int | None = None

    @functools.cached_property
    def params(self) -> DraftParams:
        return DraftParams.build(self.mode, self.num_draft_tokens, self.tree, self.depth, self.topk)

    @property
    def name(self) -> str:
        p = self.params
        if p.mode == "none":
            return "plain"
        if p.mode == "chain":
            return f"chain k={p.num_draft_tokens}"
        if p.mode == "auto":
            return f"auto k<={p.num_draft_tokens}"
        if p.mode == "tree":
            spec = self.tree if self.tree and not self.tree.lstrip().startswith("[") else None
            return f"tree {spec}" if spec else f"tree {p.tree.num_nodes - 1} nodes"
        return f"dynamic n={p.num_draft_tokens} d={p.depth} k={p.topk}"

    def generate_kwargs(self) -> dict:
        return {"draft": self.mode, "num_draft_tokens": self.num_draft_tokens, "tree": self.tree,
                "depth": self.depth, "draft_topk": self.topk}

    def knobs(self) -> dict:
        """The draft arguments this configuration's mode reads, with the values it ran with (plain: none)."""
        knobs = self.params.knobs()
        if "tree" in knobs:
            knobs["tree"] = self.tree or "3,2,1"
        return knobs


def sweep(drafts=DEFAULT_DRAFTS, num_draft_tokens: list[int] | None = None, trees: list[str] | None = None,
          depth: int | None = None, topk: int | None = None) -> list[DraftConfig]:
    """Plain decoding first, then every requested mode x num_draft_tokens (chain, dynamic) or tree shape."""
    drafts = list(dict.fromkeys(drafts))
    if trees and "tree" not in drafts:
        raise GenerationSettingsError("a tree shape was given but no --draft tree is benchmarked; add --draft tree")
    if num_draft_tokens and not {"auto", "chain", "dynamic"} & set(drafts):
        raise GenerationSettingsError("--num-draft-tokens was given but no benchmarked mode reads it (auto, chain "
                                      "and dynamic do); add one, or drop it")
    for name, value in (("--depth", depth), ("--draft-topk", topk)):
        if value is not None and "dynamic" not in drafts:
            raise GenerationSettingsError(f"{name} was given but only dynamic trees read it; add --draft dynamic, "
                                          "or drop it")
    configs = [DraftConfig("none")]
    for mode in drafts:
        if mode == "none":
            continue
        if mode == "tree":
            configs += [DraftConfig("tree", tree=spec) for spec in trees or ["3,2,1"]]
        elif mode == "dynamic":
            configs += [DraftConfig(mode, n, depth=depth, topk=topk) for n in num_draft_tokens or [None]]
        else:
            configs += [DraftConfig(mode, n) for n in num_draft_tokens or [None]]
    for config in configs:
        config.params  # validate every configuration before anything runs
    return configs
