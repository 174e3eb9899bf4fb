"""Checking a checkpoint against the expected parameters: which raw tensors feed which name, and every mismatch."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..validate import printable
from .files import CheckpointFiles
from .names import EMBED, LM_HEAD, SCALE_SUFFIX, Source, mtp_index, sources_by_our_name

MAX_LISTED = 20


class _Problems:
    """Every mismatch found between a checkpoint and the expected parameters, by category."""

    KINDS = {"missing": "missing", "unexpected": "unexpected", "wrong shape": "wrong shape",
             "wrong dtype": "wrong dtype", "missing experts": "with missing experts"}

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {kind: [] for kind in self.KINDS}
        self._seen: set[tuple[str, str]] = set()

    def add(self, kind: str, line: str) -> None:
        line = printable(line)  # raw tensor names are arbitrary strings
        if (kind, line) not in self._seen:
            self._seen.add((kind, line))
            self.lines[kind].append(line)

    def raise_if_any(self, folder: Path) -> None:
        """One error, on one line, listing every problem (up to MAX_LISTED of each kind)."""
        parts = []
        for kind, lines in self.lines.items():
            if lines:
                more = f"; and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
                parts.append(f"{len(lines)} {self.KINDS[kind]} [{'; '.join(lines[:MAX_LISTED])}{more}]")
        if parts:
            raise CheckpointError(f"checkpoint {folder} does not match the config: {', '.join(parts)}; re-export "
                                  "the checkpoint for this config.json (or fix config.json to match the weights)")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")
"""safetensors floating types that torch converts to float32 (not the packed F4 / F6 formats)."""
INT_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")


def is_float_dtype(st_dtype: str) -> bool:
    """Whether a safetensors dtype string (F32, BF16, F8_E4M3, I64, ...) is a floating type we can load."""
    return st_dtype in FLOAT_DTYPES


def _dtype_text(st_dtype: str) -> str:
    """The dtype, with the supported ones listed where it is a floating type torch cannot convert (F4, F6_*)."""
    if st_dtype.startswith("F") and not is_float_dtype(st_dtype):
        return f"{st_dtype} (unsupported; store it as one of {', '.join(FLOAT_DTYPES)})"
    return st_dtype


def fmt_shape(shape: tuple[int, ...] | torch.Size) -> str:
    return str(list(shape))


class Planner:
    """Matches raw tensors to the expected names and collects every mismatch."""

    def __init__(self, files: CheckpointFiles, expected: dict[str, tuple[torch.Size, torch.dtype]],
                 num_hidden_layers: int, tie_word_embeddings: bool, block_size: tuple[int, int],
                 num_mtp: int | None = None):
        self.files = files
        self.expected = expected
        self.block_size = block_size
        self.names = files.raw_names()
        self.sources = {name: sources for name, sources in sources_by_our_name(files, num_hidden_layers).items()
                        if num_mtp is None or mtp_index(name) is None or mtp_index(name) < num_mtp}
        self.tie = (tie_word_embeddings and LM_HEAD in expected and LM_HEAD not in self.sources
                    and any(s.kind == "whole" for s in self.sources.get(EMBED, [])))
        self.problems = _Problems()
        self.plan: dict[str, list[Source]] = {}

    def run(self) -> dict[str, list[Source]]:
        """The sources of every expected name; raises CheckpointError listing all problems."""
        for name, sources in self.sources.items():
            if name not in self.expected and not (self.tie and name == EMBED):
                for source in sources:
                    self._unexpected(source.raw, "" if source.raw == name else f"as {name}")
        for name, (shape, dtype) in self.expected.items():
            self._plan_name(name, tuple(shape), dtype)
        self.problems.raise_if_any(self.files.folder)
        return self.plan

    def _unexpected(self, raw: str, note: str) -> None:
        self.problems.add("unexpected", f"{raw} ({note})" if note else raw)
        if raw + SCALE_SUFFIX in self.names:
            self.problems.add("unexpected", f"{raw + SCALE_SUFFIX} (scale of {raw})")

    def _plan_name(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        sources = self.sources.get(name, [])
        if not sources and name == LM_HEAD and self.tie:
            sources = [s for s in self.sources[EMBED] if s.kind == "whole"][:1]
        if not sources:
            self.problems.add("missing", name)
            return
        kind = next(k for k in ("whole", "gate", "up", "expert") if any(s.kind == k for s in sources))
        chosen = [s for s in sources if s.kind == kind][: None if kind == "expert" else 1]
        for source in sources:
            if source not in chosen:
                self._unexpected(source.raw, f"a second source of {name}")
        checks = {"whole": self._check_whole, "gate": self._check_half, "up": self._check_half,
                  "expert": self._check_experts}
        self.plan[name] = checks[kind](name, chosen, shape)
        for source in self.plan[name]:
            self._check_dtype(name, source.raw, dtype)
            self._check_scale(source.raw)

    def _check_whole(self, name: str, sources: list[Source], shape: tuple[int, ...]) -> list[Source]:
        found = self.files.entry(sources[0].raw).shape
        if found != shape:
            label = name if sources[0].raw == name else f"{name} (raw {sources[0].raw})"
            self.problems.add("wrong shape", f"{label}: expected {fmt_shape(shape)}, found {fmt_shape(found)}")
        return sources

    def _check_half(self, name: str, sources: list[Source], shape: tuple[int, ...]) -> list[Source]:
        raw = sources[0].raw
        found = self.files.entry(raw).shape
        want = (shape[0], 2 * shape[1], *shape[2:]) if len(shape) == 3 else None
        if want is None or found != want:
            expect = fmt_shape(want) if want else f"a 3-D shape (ours {fmt_shape(shape)})"
            self.problems.add("wrong shape", f"{raw} (gate_proj and up_proj stacked): expected {expect}, "
                                             f"found {fmt_shape(found)}")
        return sources

    def _check_experts(self, name: str, sources: list[Source], shape: tuple[int, ...]) -> list[Source]:
        if len(shape) != 3:
            self.problems.add("wrong shape", f"{name}: expected {fmt_shape(shape)}, found per-expert tensors")
            return sources
        kept, seen = [], set()
        for source in sources:
            if source.index >= shape[0] or source.index in seen:
                self._unexpected(source.raw, f"expert {source.index}, but {name} has {shape[0]} experts")
                continue
            seen.add(source.index)
            kept.append(source)
            found = self.files.entry(source.raw).shape
            if found != shape[1:]:
                self.problems.add("wrong shape", f"{source.raw} (expert {source.index} of {name}): "
                                                 f"expected {fmt_shape(shape[1:])}, found {fmt_shape(found)}")
        absent = sorted(set(range(shape[0])) - seen)
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
            self.problems.add("missing experts", f"{name}: {len(absent)} of {shape[0]} experts absent "
                                                 f"(indices {shown})")
        return kept

    def _check_dtype(self, name: str, raw: str, dtype: torch.dtype) -> None:
        found = self.files.entry(raw).dtype
        loadable = is_float_dtype(found) if dtype.is_floating_point else found in INT_DTYPES
        if not loadable:
            want = "a floating type" if dtype.is_floating_point else str(dtype)
            self.problems.add("wrong dtype", f"{raw} (for {name}): expected {want}, found {_dtype_text(found)}")

    def _check_scale(self, raw: str) -> None:
        scale = raw + SCALE_SUFFIX
        if scale not in self.names:
            if self.files.entry(raw).dtype.startswith("F8"):
                self.problems.add("missing", f"{scale} (block scales of the FP8 weight {raw})")
            return
        shape, found = self.files.entry(raw).shape, self.files.entry(scale)
        if len(shape) < 2:
            self.problems.add("wrong shape", f"{raw}: has {scale} but is not a matrix (shape {fmt_shape(shape)})")
            return
        want = (*shape[:-2], math.ceil(shape[-2] / self.block_size[0]), math.ceil(shape[-1] / self.block_size[1]))
        if found.shape != want:
            self.problems.add("wrong shape", f"{scale}: expected {fmt_shape(want)} for blocks of "
                                             f"{fmt_shape(self.block_size)}, found {fmt_shape(found.shape)}")
        if not is_float_dtype(found.dtype):
            self.problems.add("wrong dtype", f"{scale}: expected a floating type, found {_dtype_text(found.dtype)}")
