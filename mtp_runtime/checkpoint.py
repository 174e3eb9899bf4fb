"""Reading and writing HF-layout safetensors checkpoints of DeepSeek-V2/V3 models.

Raw (checkpoint) names differ from our parameter names in two ways:

* Routed experts: ours are fused 3-D tensors `<p>.mlp.experts.{gate,up,down}_proj`; a checkpoint stores
  them per expert (`<p>.mlp.experts.{e}.gate_proj.weight`, ...) or fused as transformers holds them in
  memory (`<p>.mlp.experts.gate_up_proj` [E, 2I, H] and `<p>.mlp.experts.down_proj` [E, H, I]).
* MTP modules: raw `model.layers.{N + k}.<rest>`, N = num_hidden_layers, is ours `mtp.{k}.<rest>`.

FP8 weights (`float8_e4m3fn` plus a `<name>_scale_inv` per 128x128 block) are dequantized at load.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK_SIZE = (128, 128)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
MAX_LISTED = 20
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
FP32_NAMES = ("e_score_correction_bias",)
"""Endings of our names that stay float32 whatever dtype is requested."""

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP_RE = re.compile(r"mtp\.(\d+)\.(.+)")
_RAW_EXPERT_RE = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_RAW_GATE_UP_RE = re.compile(r"(.+\.mlp\.experts)\.gate_up_proj")
_OUR_EXPERT_RE = re.compile(r"(.+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")
_OUR_FILE_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


@dataclass(frozen=True)
class TensorInfo:
    """Where a raw tensor lives and what its header says about it."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Source:
    """How one raw tensor feeds one of our names: whole, one expert's slice, or a half of gate_up_proj."""

    raw: str
    kind: str
    """"whole", "expert", "gate" or "up"."""
    index: int = 0
    """Expert index for kind "expert"."""


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safe_open a file, turning safetensors' errors into CheckpointError."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc}); re-download or re-save it") from None
    with handle:
        yield handle


class CheckpointFiles:
    """An opened checkpoint folder: one model.safetensors, or shards listed by model.safetensors.index.json."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder}: weights folder not found; pass the folder holding {SINGLE_FILE} or {INDEX_FILE}")
        index_map = self._index_map() if not (self.folder / SINGLE_FILE).is_file() else None
        self.files: list[Path] = self._shard_paths(index_map)
        self._entries: dict[str, TensorInfo] = {}
        for path in self.files:
            self._read_header(path)
        if index_map is not None:
            self._check_index(index_map)
        self._our_names_cache: dict[int, set[str]] = {}

    def _index_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            raise CheckpointError(
                f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found; "
                "save the weights with save_pretrained(safe_serialization=True)")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not valid JSON ({exc}); re-download or regenerate the index") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: no \"weight_map\" object of tensor name -> shard file; regenerate the index")
        return weight_map

    def _shard_paths(self, index_map: dict[str, str] | None) -> list[Path]:
        if index_map is None:
            return [self.folder / SINGLE_FILE]
        paths = [self.folder / name for name in sorted(set(index_map.values()))]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(
                    f"{self.folder / INDEX_FILE}: names shard {path.name} which is missing; "
                    "download the missing shard or regenerate the index")
        return paths

    def _read_header(self, path: Path) -> None:
        with _opened(path) as handle:
            for name in handle.keys():
                if name in self._entries:
                    raise CheckpointError(
                        f"{path}: tensor {name} is also stored in {self._entries[name].path.name}; "
                        "remove the duplicate shard")
                info = handle.get_slice(name)
                self._entries[name] = TensorInfo(path, tuple(info.get_shape()), info.get_dtype())

    def _check_index(self, index_map: dict[str, str]) -> None:
        absent = [name for name in index_map if name not in self._entries]
        if absent:
            raise CheckpointError(
                f"{self.folder / INDEX_FILE}: {len(absent)} tensor(s) it lists are in no shard "
                f"(first: {absent[0]} -> {index_map[absent[0]]}); re-download the shards or regenerate the index")

    def raw_names(self) -> set[str]:
        """Every tensor name stored in the checkpoint (from the headers only)."""
        return set(self._entries)

    def __contains__(self, raw: str) -> bool:
        return raw in self._entries

    def entry(self, raw: str) -> TensorInfo:
        """File, shape and safetensors dtype string of one raw tensor."""
        return self._entries[raw]

    def mtp_layer_count(self, num_hidden_layers: int) -> int:
        """Number of contiguous layer indices N, N+1, ... present among the raw names."""
        indices = {int(m[1]) for name in self._entries if (m := _LAYER_RE.fullmatch(name))}
        count = 0
        while num_hidden_layers + count in indices:
            count += 1
        return count

    def has_our_name(self, name: str, num_hidden_layers: int) -> bool:
        """Whether loading would produce `name` (our naming) from the raw tensors."""
        if num_hidden_layers not in self._our_names_cache:
            self._our_names_cache[num_hidden_layers] = set(_sources_by_our_name(self, num_hidden_layers))
        return name in self._our_names_cache[num_hidden_layers]


def weight_block_size(config_dict: dict[str, Any]) -> tuple[int, int]:
    """FP8 block size from a config.json dict's quantization_config, default (128, 128)."""
    quant = config_dict.get("quantization_config") or {}
    block = quant.get("weight_block_size", DEFAULT_BLOCK_SIZE) if isinstance(quant, dict) else DEFAULT_BLOCK_SIZE
    return _checked_block(block)


def _checked_block(block_size: Any) -> tuple[int, int]:
    """block_size as two positive ints, or CheckpointError."""
    if (not isinstance(block_size, (list, tuple)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise CheckpointError(f"FP8 block size {block_size!r} is invalid; expected two positive integers")
    return int(block_size[0]), int(block_size[1])


def _rename_layer(raw: str, num_hidden_layers: int) -> str:
    """`model.layers.{N + k}.<rest>` -> `mtp.{k}.<rest>`; other names unchanged."""
    m = _LAYER_RE.fullmatch(raw)
    if m and int(m[1]) >= num_hidden_layers:
        return f"mtp.{int(m[1]) - num_hidden_layers}.{m[2]}"
    return raw


def _raw_prefix(name: str, num_hidden_layers: int) -> str:
    """`mtp.{k}.<rest>` -> `model.layers.{N + k}.<rest>`; other names unchanged."""
    m = _MTP_RE.fullmatch(name)
    if m:
        return f"model.layers.{num_hidden_layers + int(m[1])}.{m[2]}"
    return name


def _targets(raw: str, num_hidden_layers: int) -> list[tuple[str, _Source]]:
    """Our names a raw tensor feeds, each with how; empty for raw names to ignore."""
    if raw.endswith("rotary_emb.inv_freq"):
        return []
    name = _rename_layer(raw, num_hidden_layers)
    m = _RAW_EXPERT_RE.fullmatch(name)
    if m:
        return [(f"{m[1]}.{m[3]}", _Source(raw, "expert", int(m[2])))]
    m = _RAW_GATE_UP_RE.fullmatch(name)
    if m:
        return [(f"{m[1]}.gate_proj", _Source(raw, "gate")), (f"{m[1]}.up_proj", _Source(raw, "up"))]
    return [(name, _Source(raw, "whole"))]


def _is_scale(raw: str, names: set[str]) -> bool:
    return raw.endswith(SCALE_SUFFIX) and raw[: -len(SCALE_SUFFIX)] in names


def _sources_by_our_name(files: CheckpointFiles, num_hidden_layers: int) -> dict[str, list[_Source]]:
    names = files.raw_names()
    sources: dict[str, list[_Source]] = {}
    for raw in sorted(names):
        if _is_scale(raw, names):
            continue
        for ours, source in _targets(raw, num_hidden_layers):
            sources.setdefault(ours, []).append(source)
    return sources


class _Problems:
    """Every mismatch found between a checkpoint and the expected parameters, by category."""

    KINDS = {"missing": "missing", "unexpected": "unexpected", "wrong shape": "wrong shape",
             "wrong dtype": "wrong dtype", "missing experts": "with missing experts"}

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {kind: [] for kind in self.KINDS}
        self._seen: set[tuple[str, str]] = set()

    def add(self, kind: str, line: str) -> None:
        if (kind, line) not in self._seen:
            self._seen.add((kind, line))
            self.lines[kind].append(line)

    def raise_if_any(self, folder: Path) -> None:
        counts = [f"{len(lines)} {self.KINDS[kind]}" for kind, lines in self.lines.items() if lines]
        if not counts:
            return
        out = [f"checkpoint {folder} does not match the config: {', '.join(counts)}"]
        for kind, lines in self.lines.items():
            out += [f"  {kind}: {line}" for line in lines[:MAX_LISTED]]
            if len(lines) > MAX_LISTED:
                out.append(f"  ... and {len(lines) - MAX_LISTED} more {self.KINDS[kind]}")
        raise CheckpointError("\n".join(out))


def _is_float_dtype(st_dtype: str) -> bool:
    """Whether a safetensors dtype string (F32, BF16, F8_E4M3, I64, ...) is a floating type."""
    return st_dtype.startswith(("F", "BF"))


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return str(list(shape))


class _Planner:
    """Matches raw tensors to the expected names and collects every mismatch."""

    def __init__(self, files: CheckpointFiles, expected: dict[str, tuple[torch.Size, torch.dtype]],
                 num_hidden_layers: int, tie_word_embeddings: bool, block_size: tuple[int, int]):
        self.files = files
        self.expected = expected
        self.block_size = block_size
        self.names = files.raw_names()
        self.sources = _sources_by_our_name(files, num_hidden_layers)
        self.tie = (tie_word_embeddings and LM_HEAD in expected and LM_HEAD not in self.sources
                    and any(s.kind == "whole" for s in self.sources.get(EMBED, [])))
        self.problems = _Problems()
        self.plan: dict[str, list[_Source]] = {}

    def run(self) -> dict[str, list[_Source]]:
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

    def _check_whole(self, name: str, sources: list[_Source], shape: tuple[int, ...]) -> list[_Source]:
        found = self.files.entry(sources[0].raw).shape
        if found != shape:
            label = name if sources[0].raw == name else f"{name} (raw {sources[0].raw})"
            self.problems.add("wrong shape", f"{label}: expected {_fmt(shape)}, found {_fmt(found)}")
        return sources

    def _check_half(self, name: str, sources: list[_Source], shape: tuple[int, ...]) -> list[_Source]:
        raw = sources[0].raw
        found = self.files.entry(raw).shape
        want = (shape[0], 2 * shape[1], *shape[2:]) if len(shape) == 3 else None
        if want is None or found != want:
            expect = _fmt(want) if want else f"a 3-D shape (ours {_fmt(shape)})"
            self.problems.add("wrong shape", f"{raw} (gate_proj and up_proj stacked): expected {expect}, "
                                             f"found {_fmt(found)}")
        return sources

    def _check_experts(self, name: str, sources: list[_Source], shape: tuple[int, ...]) -> list[_Source]:
        if len(shape) != 3:
            self.problems.add("wrong shape", f"{name}: expected {_fmt(shape)}, found per-expert tensors")
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
                                                 f"expected {_fmt(shape[1:])}, found {_fmt(found)}")
        absent = sorted(set(range(shape[0])) - seen)
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
            self.problems.add("missing experts", f"{name}: {len(absent)} of {shape[0]} experts absent "
                                                 f"(indices {shown})")
        return kept

    def _check_dtype(self, name: str, raw: str, dtype: torch.dtype) -> None:
        found = self.files.entry(raw).dtype
        if _is_float_dtype(found) != dtype.is_floating_point:
            want = "a floating type" if dtype.is_floating_point else str(dtype)
            self.problems.add("wrong dtype", f"{raw} (for {name}): expected {want}, found {found}")

    def _check_scale(self, raw: str) -> None:
        scale = raw + SCALE_SUFFIX
        if scale not in self.names:
            if self.files.entry(raw).dtype.startswith("F8"):
                self.problems.add("missing", f"{scale} (block scales of the FP8 weight {raw})")
            return
        shape, found = self.files.entry(raw).shape, self.files.entry(scale)
        if len(shape) < 2:
            self.problems.add("wrong shape", f"{raw}: has {scale} but is not a matrix (shape {_fmt(shape)})")
            return
        want = (*shape[:-2], math.ceil(shape[-2] / self.block_size[0]), math.ceil(shape[-1] / self.block_size[1]))
        if found.shape != want:
            self.problems.add("wrong shape", f"{scale}: expected {_fmt(want)} for blocks of "
                                             f"{_fmt(self.block_size)}, found {_fmt(found.shape)}")
        if not _is_float_dtype(found.dtype):
            self.problems.add("wrong dtype", f"{scale}: expected a floating type, found {found.dtype}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """float32 weight = weight times its block's scale_inv; blocks at the bottom/right edge may be partial."""
    rows, cols = weight.shape[-2:]
    b0, b1 = block_size
    w = weight.to(torch.float32)
    # [..., ceil(rows/b0), ceil(cols/b1)] -> [..., ceil(rows/b0), cols]
    col_scale = scale_inv.to(device=w.device, dtype=torch.float32).repeat_interleave(b1, dim=-1)[..., :cols]
    full = rows // b0 * b0
    if full:
        # [..., full, cols] -> [..., full/b0, b0, cols], scaled in place through the view
        w[..., :full, :].unflatten(-2, (full // b0, b0)).mul_(col_scale[..., : full // b0, None, :])
    if full < rows:
        w[..., full:, :].mul_(col_scale[..., -1:, :])
    return w


def quantize_fp8(weight: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise float8_e4m3fn quantization of a matrix: (fp8 weight, float32 scale_inv per block)."""
    rows, cols = weight.shape
    b0, b1 = block_size
    nb0, nb1 = math.ceil(rows / b0), math.ceil(cols / b1)
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    padded = torch.zeros(nb0 * b0, nb1 * b1)
    padded[:rows, :cols] = w.abs()
    # [nb0*b0, nb1*b1] -> [nb0, b0, nb1, b1] -> amax per block [nb0, nb1]
    amax = padded.view(nb0, b0, nb1, b1).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # [nb0, nb1] -> [rows, cols]
    expanded = scale.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
    quantized = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale.contiguous()


def _target_dtype(name: str, expected: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if name.endswith(FP32_NAMES):
        return torch.float32
    return dtype if expected.is_floating_point else expected


def _get_tensor(handle: Any, path: Path, raw: str) -> torch.Tensor:
    try:
        return handle.get_tensor(raw)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: cannot read {raw} ({exc}); re-download or re-save the file") from None


def _read_raw(handle: Any, files: CheckpointFiles, raw: str, device: torch.device,
              block_size: tuple[int, int]) -> torch.Tensor:
    """One raw tensor on device, dequantized when it has a scale_inv companion."""
    path = files.entry(raw).path
    tensor = _get_tensor(handle, path, raw).to(device)
    scale_name = raw + SCALE_SUFFIX
    if scale_name not in files:
        return tensor
    scale_path = files.entry(scale_name).path
    if scale_path == path:
        scale = _get_tensor(handle, path, scale_name)
    else:
        with _opened(scale_path) as other:
            scale = _get_tensor(other, scale_path, scale_name)
    return dequantize_fp8(tensor, scale, block_size)


class _Filler:
    """Builds the output state dict, placing each raw tensor read into its target(s)."""

    def __init__(self, expected: dict[str, tuple[torch.Size, torch.dtype]], dtype: torch.dtype,
                 device: torch.device):
        self.expected = expected
        self.dtype = dtype
        self.device = device
        self.out: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str) -> torch.Tensor:
        if name not in self.out:
            shape, expected_dtype = self.expected[name]
            target = _target_dtype(name, expected_dtype, self.dtype)
            self.out[name] = torch.empty(shape, dtype=target, device=self.device)
        return self.out[name]

    def place(self, name: str, source: _Source, tensor: torch.Tensor) -> None:
        if source.kind == "whole":
            target = _target_dtype(name, self.expected[name][1], self.dtype)
            self.out[name] = tensor.to(device=self.device, dtype=target).contiguous()
        elif source.kind == "expert":
            self._buffer(name)[source.index].copy_(tensor)
        else:
            half = tensor.shape[1] // 2
            # [E, 2I, H] -> [E, I, H]: gate is the first I rows of dim 1, up the next I
            self._buffer(name).copy_(tensor[:, :half] if source.kind == "gate" else tensor[:, half:])


def load_state_dict(files: CheckpointFiles, expected: dict[str, tuple[torch.Size, torch.dtype]],
                    num_hidden_layers: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                    tie_word_embeddings: bool = False,
                    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """Tensors for exactly the expected names (ours): floats as dtype (e_score_correction_bias float32), on device."""
    block_size = _checked_block(block_size)
    plan = _Planner(files, expected, num_hidden_layers, tie_word_embeddings, block_size).run()
    tied = LM_HEAD in plan and LM_HEAD not in files and plan[LM_HEAD][0].raw == EMBED
    by_file: dict[Path, dict[str, list[tuple[str, _Source]]]] = {}
    for name, sources in plan.items():
        if tied and name == LM_HEAD and EMBED in plan:
            continue
        for source in sources:
            path = files.entry(source.raw).path
            by_file.setdefault(path, {}).setdefault(source.raw, []).append((name, source))
    filler = _Filler(expected, dtype, torch.device(device))
    for path in files.files:
        if path not in by_file:
            continue
        with _opened(path) as handle:
            for raw, targets in by_file[path].items():
                tensor = _read_raw(handle, files, raw, filler.device, block_size)
                for name, source in targets:
                    filler.place(name, source, tensor)
                del tensor
    if tied and EMBED in plan:
        filler.out[LM_HEAD] = filler.out[EMBED]
    return {name: filler.out[name] for name in expected}


@dataclass
class _Unit:
    """Raw tensors written together (a weight and its scale_inv): their names, size and how to make them."""

    names: tuple[str, ...]
    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def _quantizable(raw: str, tensor: torch.Tensor) -> bool:
    """Whether fp8 export quantizes this tensor: a 2-D Linear weight inside self_attn or mlp (not the router)."""
    return (tensor.dim() == 2 and tensor.is_floating_point() and raw.endswith(".weight")
            and (".self_attn." in raw or ".mlp." in raw) and not raw.endswith(".mlp.gate.weight")
            and "norm" not in raw.rsplit(".", 2)[-2])


def _unit(raw: str, get: Callable[[], torch.Tensor], like: torch.Tensor, fp8: bool,
          block_size: tuple[int, int]) -> _Unit:
    """A unit writing `get()` as `raw`, fp8-quantized with a scale_inv when fp8 applies to it."""
    if fp8 and _quantizable(raw, like):
        rows, cols = like.shape
        blocks = math.ceil(rows / block_size[0]) * math.ceil(cols / block_size[1])

        def make() -> dict[str, torch.Tensor]:
            quantized, scale = quantize_fp8(get(), block_size)
            return {raw: quantized, raw + SCALE_SUFFIX: scale}

        return _Unit((raw, raw + SCALE_SUFFIX), like.numel() + 4 * blocks, make)
    return _Unit((raw,), like.numel() * like.element_size(), lambda: {raw: get()})


def _expert_units(raw_fused: str, proj: str, tensor: torch.Tensor, state_dict: dict[str, torch.Tensor],
                  name: str, fused: bool, fp8: bool, block_size: tuple[int, int]) -> list[_Unit]:
    """Units for one of our fused expert tensors [E, ., .]: per-expert hub layout or transformers' fused one."""
    if tensor.dim() != 3:
        raise CheckpointError(f"{name}: fused expert tensor must be 3-D [experts, out, in], got {_fmt(tensor.shape)}")
    prefix = raw_fused[: -len(proj) - 1]
    if not fused:
        return [_unit(f"{prefix}.{e}.{proj}.weight", lambda e=e: tensor[e], tensor[0], fp8, block_size)
                for e in range(tensor.shape[0])]
    if proj == "down_proj":
        return [_unit(raw_fused, lambda: tensor, tensor, False, block_size)]
    gate, up = state_dict.get(name[: -len(proj)] + "gate_proj"), state_dict.get(name[: -len(proj)] + "up_proj")
    if gate is None or up is None or gate.shape != up.shape:
        raise CheckpointError(f"{name}: the fused layout needs gate_proj and up_proj of one shape; "
                              "pass both or save with fused_experts=False")
    if proj == "up_proj":
        return []
    # [E, I, H] + [E, I, H] -> [E, 2I, H]
    return [_Unit((f"{prefix}.gate_up_proj",), 2 * gate.numel() * gate.element_size(),
                  lambda: {f"{prefix}.gate_up_proj": torch.cat([gate, up], dim=1)})]


def _units(state_dict: dict[str, torch.Tensor], num_hidden_layers: int, fused: bool, fp8: bool,
           block_size: tuple[int, int]) -> list[_Unit]:
    units: list[_Unit] = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{name}: state_dict values must be tensors, got {type(tensor).__name__}")
        raw = _raw_prefix(name, num_hidden_layers)
        m = _OUR_EXPERT_RE.fullmatch(raw)
        if m:
            units += _expert_units(raw, m[2], tensor, state_dict, name, fused, fp8, block_size)
        else:
            units.append(_unit(raw, lambda t=tensor: t, tensor, fp8, block_size))
    seen: set[str] = set()
    for unit in units:
        clash = seen.intersection(unit.names)
        if clash:
            raise CheckpointError(f"two state_dict entries map to the raw name {clash.pop()}; keep only one")
        seen.update(unit.names)
    return units


def _shards(units: list[_Unit], max_shard_bytes: int | None) -> list[list[_Unit]]:
    """Units grouped greedily into shards of at most max_shard_bytes (a bigger unit gets a shard alone)."""
    total = sum(u.nbytes for u in units)
    if max_shard_bytes is None or total <= max_shard_bytes:
        return [units]
    shards: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return shards


def _materialize(units: list[_Unit]) -> dict[str, torch.Tensor]:
    """The tensors of one shard: on CPU, contiguous, none sharing storage with another."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for unit in units:
        for raw, tensor in unit.make().items():
            tensor = tensor.detach().cpu().contiguous()
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in storages or tensor.untyped_storage().nbytes() != tensor.nbytes:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            out[raw] = tensor
    return out


def _remove_stale(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file() and _OUR_FILE_RE.fullmatch(path.name):
            path.unlink()


def save_checkpoint(folder: str | Path, config_dict: dict, state_dict: dict[str, torch.Tensor],
                    num_hidden_layers: int, *, max_shard_bytes: int | None = None, fp8: bool = False,
                    fused_experts: bool = False, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> None:
    """Write config.json and the weights of a state dict (our names) in the HF layout."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes} must be positive (or None for one file)")
    block_size = _checked_block(block_size)
    units = _units(state_dict, num_hidden_layers, fused_experts, fp8, block_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config_dict)
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "weight_block_size": list(block_size), "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _remove_stale(folder)
    shards = _shards(units, max_shard_bytes)
    if len(shards) == 1:
        save_file(_materialize(shards[0]), str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _materialize(shard)
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
