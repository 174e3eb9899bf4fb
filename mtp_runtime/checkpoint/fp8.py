"""Blockwise FP8 (float8_e4m3fn with a float32 scale_inv per block): block size, quantize, dequantize."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError
from ..validate import is_int, show

DEFAULT_BLOCK_SIZE = (128, 128)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def weight_block_size(config_dict: dict[str, Any]) -> tuple[int, int]:
    """FP8 block size from a config.json dict's quantization_config, default (128, 128)."""
    quant = config_dict.get("quantization_config") or {}
    block = quant.get("weight_block_size", DEFAULT_BLOCK_SIZE) if isinstance(quant, dict) else DEFAULT_BLOCK_SIZE
    try:
        return checked_block(block)
    except CheckpointError:
        raise CheckpointError(f"config.json: quantization_config.weight_block_size {show(block)} is invalid; "
                              "expected two positive integers such as [128, 128]") from None


def checked_block(block_size: Any) -> tuple[int, int]:
    """block_size as two positive ints, or CheckpointError."""
    if (not isinstance(block_size, (list, tuple)) or len(block_size) != 2
            or not all(is_int(b, 1) for b in block_size)):
        raise CheckpointError(f"FP8 block size {show(block_size)} is invalid; expected two positive integers")
    return int(block_size[0]), int(block_size[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """float32 weight = weight times its block's scale_inv; blocks at the bottom/right edge may be partial."""
    rows, cols = weight.shape[-2:]
    # a block larger than the matrix is one block: clamping keeps repeat_interleave from allocating the excess
    b0, b1 = min(block_size[0], max(rows, 1)), min(block_size[1], max(cols, 1))
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
