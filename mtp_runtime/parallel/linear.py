"""Tensor-parallel pieces built from a full layer's weights: sliced linears, the row-parallel output
projection, and SwiGLU MLPs split along their intermediate width (column-parallel gate/up, row-parallel down).

Inference only: the all-reduce runs in place and has no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import DenseMLP
from .group import ParallelGroup

ALL = slice(None)


def local_copy(tensor: torch.Tensor, rows: slice = ALL, cols: slice = ALL) -> nn.Parameter:
    """tensor[rows, cols] (a vector: tensor[rows]) as a parameter that owns its memory, so that the full tensor
    can be freed."""
    part = tensor[rows] if tensor.dim() == 1 else tensor[rows, cols]
    return nn.Parameter(part.clone(memory_format=torch.contiguous_format),
                        requires_grad=tensor.requires_grad)


def sliced_linear(linear: nn.Linear, rows: slice = ALL, cols: slice = ALL) -> nn.Linear:
    """nn.Linear keeping output features `rows` and input features `cols` of `linear` (bias sliced by rows)."""
    weight = local_copy(linear.weight, rows, cols)  # [out_local, in_local]
    with torch.device("meta"):
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out.weight = weight
    if linear.bias is not None:
        out.bias = local_copy(linear.bias, rows)
    return out


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: each rank holds the input columns of its own heads or channels."""

    def __init__(self, linear: nn.Linear, cols: slice, group: ParallelGroup):
        weight = local_copy(linear.weight, cols=cols)  # [out, in / world_size]
        with torch.device("meta"):
            super().__init__(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
        self.weight = weight
        if linear.bias is not None:
            self.bias = local_copy(linear.bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


def _take_channels(target: DenseMLP, mlp: DenseMLP, channels: slice) -> DenseMLP:
    """Fill target with intermediate channels `channels` of mlp: rows of gate/up, columns of down."""
    target.gate_proj = sliced_linear(mlp.gate_proj, rows=channels)
    target.up_proj = sliced_linear(mlp.up_proj, rows=channels)
    target.down_proj = sliced_linear(mlp.down_proj, cols=channels)
    return target


def local_mlp(mlp: DenseMLP, group: ParallelGroup) -> DenseMLP:
    """This rank's share of a SwiGLU MLP's intermediate channels; its output is a partial sum over the ranks."""
    channels = group.local_range(mlp.gate_proj.out_features)
    with torch.device("meta"):
        out = DenseMLP(mlp.gate_proj.in_features, channels.stop - channels.start)
    return _take_channels(out, mlp, channels)


class ParallelDenseMLP(DenseMLP):
    """A dense layer's SwiGLU split over the ranks' intermediate channels, summed by one all-reduce."""

    def __init__(self, mlp: DenseMLP, group: ParallelGroup):
        channels = group.local_range(mlp.gate_proj.out_features)
        with torch.device("meta"):
            super().__init__(mlp.gate_proj.in_features, channels.stop - channels.start)
        _take_channels(self, mlp, channels)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))
