"""IndexKeys: the DeepSeek Sparse Attention indexer's key cache, one roped key per token and layer.

It lives inside a LatentCache (`LatentCache.index`), slot for slot beside c_kv / k_pe: the forward that writes a
token's latent row writes its indexer key at the same slot, and the cache's commit and keep_rows move and drop
both alike, so after a commit the indexer keys, like the latents, equal a fresh prefill's.

Keys are stored in the model's dtype, or in FP8 (float8_e4m3fn) with one float32 scale per 128 values as DeepSeek
stores them; reads return the dequantized keys.
"""

from __future__ import annotations

import math

import torch

from .config import INDEX_FP8_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., D] -> (float8 [..., D], float32 scales [..., ceil(D / 128)]): scale = block amax / 448."""
    dim = keys.shape[-1]
    blocks = math.ceil(dim / INDEX_FP8_BLOCK)
    padded = torch.nn.functional.pad(keys.float(), (0, blocks * INDEX_FP8_BLOCK - dim))
    grouped = padded.unflatten(-1, (blocks, INDEX_FP8_BLOCK))  # [..., blocks, 128]
    scales = grouped.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX  # [..., blocks]
    quantized = (grouped / scales[..., None]).to(FP8_DTYPE).flatten(-2)[..., :dim]
    return quantized, scales


def dequantize_keys(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 keys [..., D] of quantize_keys' output."""
    dim = quantized.shape[-1]
    return quantized.float() * scales.repeat_interleave(INDEX_FP8_BLOCK, dim=-1)[..., :dim]


class IndexKeys:
    """Indexer keys [layers, B, capacity, D] (plus FP8 scales [layers, B, capacity, ceil(D / 128)])."""

    def __init__(self, num_layers: int, batch_size: int, capacity: int, dim: int, dtype: torch.dtype,
                 device: torch.device | str, fp8: bool = False):
        self.fp8 = fp8
        self.keys = torch.zeros(num_layers, batch_size, capacity, dim, dtype=FP8_DTYPE if fp8 else dtype,
                                device=device)
        self.scales = None
        if fp8:
            blocks = math.ceil(dim / INDEX_FP8_BLOCK)
            self.scales = torch.ones(num_layers, batch_size, capacity, blocks, dtype=torch.float32, device=device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Store keys [B, n, D] at slots [B, n] (the same slots the layer's latent rows go to)."""
        rows = torch.arange(self.keys.shape[1], device=slots.device)[:, None]
        if self.fp8:
            self.keys[layer, rows, slots], self.scales[layer, rows, slots] = quantize_keys(keys)
        else:
            self.keys[layer, rows, slots] = keys.to(self.keys.dtype)

    def read(self, layer: int, span: int) -> torch.Tensor:
        """Keys of slots [0, span): [B, span, D] (float32 when stored in FP8)."""
        if self.fp8:
            return dequantize_keys(self.keys[layer, :, :span], self.scales[layer, :, :span])
        return self.keys[layer, :, :span]

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's entries at slots src [B, m] to slots dst [B, m] (rows [B, 1]): the commit's compaction."""
        self.keys[:, rows, dst] = self.keys[:, rows, src]
        if self.scales is not None:
            self.scales[:, rows, dst] = self.scales[:, rows, src]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows listed in rows."""
        self.keys = self.keys[:, rows].contiguous()
        if self.scales is not None:
            self.scales = self.scales[:, rows].contiguous()

    def bytes_per_token(self) -> int:
        """Bytes one token's keys occupy over all layers."""
        per_token = self.keys.shape[-1] * self.keys.element_size()
        if self.scales is not None:
            per_token += self.scales.shape[-1] * self.scales.element_size()
        return self.keys.shape[0] * per_token
