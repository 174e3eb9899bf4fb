"""RMSNorm computed in float32, as DeepSeek's reference does.

x * rsqrt(mean(x^2) + eps) is computed as x * rsqrt(eps + ||x||^2 / d): `vector_norm` and `addcmul` are single
kernels, where mean() and scalar adds each cost as much as a whole small op (a decode step runs four norms per
layer, and this form takes half the time of `F.rms_norm` on a [1, 1, 192] input).
"""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32; eps is a 0-d float32 tensor on x's device."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.register_buffer("eps_tensor", torch.tensor(eps, dtype=torch.float32, device="cpu"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = rms_normalize(x, self.eps_tensor)
        return self.weight * normed.to(x.dtype)
