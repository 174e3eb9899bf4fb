"""CacheLayout: what a model's latent caches hold per slot, so that the decoding loop allocates them without
knowing the architecture (dense MLA: c_kv and k_pe; DeepSeek Sparse Attention: the indexer keys too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import LatentCache
from .config import ModelConfig


@dataclass(frozen=True)
class CacheLayout:
    """Per-slot widths of a model's caches, and the run-time choice of how indexer keys are stored."""

    kv_lora_rank: int
    rope_dim: int
    index_dim: int = 0
    """Width of the indexer key per slot; 0 for dense attention."""
    index_fp8: bool = False
    """Store indexer keys in FP8 with a float32 scale per 128 values (less memory, slightly different selection)."""

    @classmethod
    def for_config(cls, config: ModelConfig, index_fp8: bool = False) -> "CacheLayout":
        """The layout of `config`'s caches; index_fp8 only applies to models with an indexer."""
        index_dim = config.indexer.head_dim if config.indexer is not None else 0
        return cls(config.kv_lora_rank, config.qk_rope_head_dim, index_dim, index_fp8 and index_dim > 0)

    def allocate(self, num_layers: int, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, initial_length: int = 0) -> LatentCache:
        """An empty cache of this layout (lengths = initial_length)."""
        return LatentCache(num_layers, batch_size, capacity, self.kv_lora_rank, self.rope_dim, dtype, device,
                           initial_length, index_dim=self.index_dim, index_fp8=self.index_fp8)
