"""Decoupled RoPE for the k_pe / q_pe parts of MLA, with YaRN scaling and DeepSeek's interleaved layout.

`Rotary.tables(positions)` computes one forward's cos/sin once for every layer. Cache-free forwards (training,
full-sequence logits) rotate element-wise (`RopeTables.apply`); forwards over a cache rotate with one small
matmul per tensor against per-token rotation matrices (`RopeTables.rotate`), which costs one op instead of ten.
Both give the same half-split output layout, so q . k agree whichever wrote the cached k_pe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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


def _pair_indices(dim: int, interleave: bool) -> tuple[list[int], list[int]]:
    """Input index of the first and second member of each rotated pair."""
    half = dim // 2
    if interleave:
        return list(range(0, dim, 2)), list(range(1, dim, 2))
    return list(range(half)), list(range(half, dim))


def _rotation_selectors(dim: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[dim, dim] matrices C, S with x @ (C * cos_j + S * sin_j) = the rotated x in half-split layout, where output
    column j < dim/2 is x1 cos - x2 sin and column j + dim/2 is x2 cos + x1 sin of pair j."""
    half = dim // 2
    first, second = _pair_indices(dim, interleave)
    cos_sel = torch.zeros(dim, dim, device="cpu")
    sin_sel = torch.zeros(dim, dim, device="cpu")
    for j in range(half):
        cos_sel[first[j], j] = cos_sel[second[j], j + half] = 1.0
        sin_sel[second[j], j] = -1.0
        sin_sel[first[j], j + half] = 1.0
    return cos_sel, sin_sel


@dataclass
class RopeTables:
    """One forward's rotation tables for positions [B, T]."""

    cos: torch.Tensor
    """[B, T, dim // 2] (YaRN-scaled)."""
    sin: torch.Tensor
    interleave: bool
    rotation: torch.Tensor | None = None
    """[B, T, dim, dim] per-token rotation matrices (built when the forward runs over a cache)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, ..., dim] element-wise; the result is in half-split layout."""
        return self._apply(x, self.interleave)

    def apply_half_split(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, ..., dim] element-wise, reading it in half-split layout whatever the checkpoint's (the
        DeepSeek-V3.2 indexer's RoPE is never interleaved)."""
        return self._apply(x, False)

    def _apply(self, x: torch.Tensor, interleave: bool) -> torch.Tensor:
        dim = x.shape[-1]
        first, second = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., : dim // 2], x[..., dim // 2:])
        extra = x.dim() - self.cos.dim()
        cos = self.cos.reshape(*self.cos.shape[:2], *([1] * extra), self.cos.shape[-1])
        sin = self.sin.reshape(*self.sin.shape[:2], *([1] * extra), self.sin.shape[-1])
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, k, dim] with the per-token matrices: one batched matmul; half-split layout."""
        return x @ self.rotation


class Rotary(nn.Module):
    """Computes cos/sin (and rotation matrices) for explicit positions; its buffers follow the model's device."""

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        self.rope = rope
        self.dim = dim
        self.scale = rope.cos_sin_scale
        self.register_buffer("inv_freq", inverse_frequencies(rope, dim), persistent=False)
        cos_sel, sin_sel = _rotation_selectors(dim, rope.interleave)
        self.register_buffer("cos_sel", cos_sel, persistent=False)
        self.register_buffer("sin_sel", sin_sel, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, matrices: bool = False) -> RopeTables:
        """Tables for positions [B, T]; `matrices` also builds the per-token rotation matrices."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, T, dim // 2]
        cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
        rotation = None
        if matrices:
            cos_full, sin_full = cos.repeat(1, 1, 2), sin.repeat(1, 1, 2)  # [B, T, dim]: pair j at j and j + dim/2
            rotation = (cos_full[..., None, :] * self.cos_sel + sin_full[..., None, :] * self.sin_sel).to(dtype)
        return RopeTables(cos.to(dtype), sin.to(dtype), self.rope.interleave, rotation)
