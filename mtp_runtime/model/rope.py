"""Decoupled RoPE for the k_pe / q_pe parts of MLA, with YaRN scaling and DeepSeek's interleaved layout."""

from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies [dim // 2] (YaRN-blended when rope.type == 'yarn')."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    extrapolated = 1.0 / (rope.theta ** exponents)
    if rope.type != "yarn":
        return extrapolated
    interpolated = extrapolated / rope.factor
    low, high = _yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


def _yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        wavelength_ratio = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(wavelength_ratio) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


class Rotary:
    """Computes cos/sin for explicit positions and rotates q_pe / k_pe."""

    def __init__(self, rope: RopeConfig, dim: int, device: torch.device | str = "cpu"):
        self.rope = rope
        self.dim = dim
        self.inv_freq = inverse_frequencies(rope, dim).to(device)
        self.scale = rope.cos_sin_scale

    def to(self, device: torch.device | str) -> "Rotary":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, dim // 2] for positions [B, T]."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, ..., dim]; the result is in half-split layout (same for q and k, so dots agree)."""
        if self.rope.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2:]
        extra = x.dim() - cos.dim()
        cos = cos.reshape(*cos.shape[:2], *([1] * extra), cos.shape[-1])
        sin = sin.reshape(*sin.shape[:2], *([1] * extra), sin.shape[-1])
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
