"""Loading the planned tensors into a state dict of our names, dequantizing FP8 weights on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import CheckpointError
from .files import CheckpointFiles, opened
from .fp8 import DEFAULT_BLOCK_SIZE, checked_block, dequantize_fp8
from .names import EMBED, LM_HEAD, SCALE_SUFFIX, Source
from .plan import Planner

FP32_NAMES = ("e_score_correction_bias", "indexer.weights_proj.weight")
"""Endings of our names that stay float32 whatever dtype is requested."""


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
        with opened(scale_path) as other:
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

    def place(self, name: str, source: Source, tensor: torch.Tensor) -> None:
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
                    tie_word_embeddings: bool = False, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
                    num_mtp: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors for exactly the expected names (ours): floats as dtype (e_score_correction_bias float32), on device.

    num_mtp: MTP layers beyond this many are left unread (config.json promises fewer than the weights hold)."""
    block_size = checked_block(block_size)
    plan = Planner(files, expected, num_hidden_layers, tie_word_embeddings, block_size, num_mtp).run()
    tied = LM_HEAD in plan and LM_HEAD not in files and plan[LM_HEAD][0].raw == EMBED
    by_file: dict[Path, dict[str, list[tuple[str, Source]]]] = {}
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
        with opened(path) as handle:
            for raw, targets in by_file[path].items():
                tensor = _read_raw(handle, files, raw, filler.device, block_size)
                for name, source in targets:
                    filler.place(name, source, tensor)
                del tensor
    if tied and EMBED in plan:
        filler.out[LM_HEAD] = filler.out[EMBED]
    return {name: filler.out[name] for name in expected}
