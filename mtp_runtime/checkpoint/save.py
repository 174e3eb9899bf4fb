"""Writing a state dict (our names) as an HF-layout checkpoint: raw names, optional FP8, optional shards."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .files import INDEX_FILE, SINGLE_FILE
from .fp8 import DEFAULT_BLOCK_SIZE, checked_block, quantize_fp8
from .names import OUR_EXPERT_RE, SCALE_SUFFIX, raw_prefix
from .plan import fmt_shape

_OUR_FILE_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


@dataclass
class _Unit:
    """Raw tensors written together (a weight and its scale_inv): their names, size and how to make them."""

    names: tuple[str, ...]
    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def _quantizable(raw: str, tensor: torch.Tensor) -> bool:
    """Whether fp8 export quantizes this tensor: a 2-D Linear weight inside self_attn or mlp (not the router, nor the
    sparse-attention indexer's head weights, which DeepSeek-V3.2 keeps in bf16)."""
    return (tensor.dim() == 2 and tensor.is_floating_point() and raw.endswith(".weight")
            and (".self_attn." in raw or ".mlp." in raw)
            and not raw.endswith((".mlp.gate.weight", ".indexer.weights_proj.weight"))
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
        raise CheckpointError(f"{name}: fused expert tensor must be 3-D [experts, out, in], got {fmt_shape(tensor.shape)}")
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
        raw = raw_prefix(name, num_hidden_layers)
        m = OUR_EXPERT_RE.fullmatch(raw)
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


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, then the permissions config.json got (safetensors writes 0600; the umask decides the others')."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    shutil.copymode(path.parent / "config.json", path)


def save_checkpoint(folder: str | Path, config_dict: dict, state_dict: dict[str, torch.Tensor],
                    num_hidden_layers: int, *, max_shard_bytes: int | None = None, fp8: bool = False,
                    fused_experts: bool = False, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> None:
    """Write config.json and the weights of a state dict (our names) in the HF layout."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes} must be positive (or None for one file)")
    block_size = checked_block(block_size)
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
        _save(_materialize(shards[0]), folder / SINGLE_FILE)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _materialize(shard)
        _save(tensors, folder / filename)
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
