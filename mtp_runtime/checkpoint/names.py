"""Raw (checkpoint) tensor names <-> our parameter names.

Raw names differ from ours in two ways:

* Routed experts: ours are fused 3-D tensors `<p>.mlp.experts.{gate,up,down}_proj`; a checkpoint stores
  them per expert (`<p>.mlp.experts.{e}.gate_proj.weight`, ...) or fused as transformers holds them in
  memory (`<p>.mlp.experts.gate_up_proj` [E, 2I, H] and `<p>.mlp.experts.down_proj` [E, H, I]).
* MTP modules: raw `model.layers.{N + k}.<rest>`, N = num_hidden_layers, is ours `mtp.{k}.<rest>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .files import CheckpointFiles

SCALE_SUFFIX = "_scale_inv"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP_RE = re.compile(r"mtp\.(\d+)\.(.+)")
_RAW_EXPERT_RE = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_RAW_GATE_UP_RE = re.compile(r"(.+\.mlp\.experts)\.gate_up_proj")
OUR_EXPERT_RE = re.compile(r"(.+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")


@dataclass(frozen=True)
class Source:
    """How one raw tensor feeds one of our names: whole, one expert's slice, or a half of gate_up_proj."""

    raw: str
    kind: str
    """"whole", "expert", "gate" or "up"."""
    index: int = 0
    """Expert index for kind "expert"."""


def _rename_layer(raw: str, num_hidden_layers: int) -> str:
    """`model.layers.{N + k}.<rest>` -> `mtp.{k}.<rest>`; other names unchanged."""
    m = LAYER_RE.fullmatch(raw)
    if m and int(m[1]) >= num_hidden_layers:
        return f"mtp.{int(m[1]) - num_hidden_layers}.{m[2]}"
    return raw


def mtp_index(name: str) -> int | None:
    """k of one of our `mtp.{k}.<rest>` names; None for trunk names."""
    m = _MTP_RE.fullmatch(name)
    return int(m[1]) if m else None


def raw_prefix(name: str, num_hidden_layers: int) -> str:
    """`mtp.{k}.<rest>` -> `model.layers.{N + k}.<rest>`; other names unchanged."""
    m = _MTP_RE.fullmatch(name)
    if m:
        return f"model.layers.{num_hidden_layers + int(m[1])}.{m[2]}"
    return name


def _targets(raw: str, num_hidden_layers: int) -> list[tuple[str, Source]]:
    """Our names a raw tensor feeds, each with how; empty for raw names to ignore."""
    if raw.endswith("rotary_emb.inv_freq"):
        return []
    name = _rename_layer(raw, num_hidden_layers)
    m = _RAW_EXPERT_RE.fullmatch(name)
    if m:
        return [(f"{m[1]}.{m[3]}", Source(raw, "expert", int(m[2])))]
    m = _RAW_GATE_UP_RE.fullmatch(name)
    if m:
        return [(f"{m[1]}.gate_proj", Source(raw, "gate")), (f"{m[1]}.up_proj", Source(raw, "up"))]
    return [(name, Source(raw, "whole"))]


def _is_scale(raw: str, names: set[str]) -> bool:
    return raw.endswith(SCALE_SUFFIX) and raw[: -len(SCALE_SUFFIX)] in names


def sources_by_our_name(files: CheckpointFiles, num_hidden_layers: int) -> dict[str, list[Source]]:
    names = files.raw_names()
    sources: dict[str, list[Source]] = {}
    for raw in sorted(names):
        if _is_scale(raw, names):
            continue
        for ours, source in _targets(raw, num_hidden_layers):
            sources.setdefault(ours, []).append(source)
    return sources

