"""LatentCache: the only state that lives across decoding steps (per layer: normalised c_kv and roped k_pe)."""

from __future__ import annotations

import torch

from .errors import CacheCapacityError


class LatentCache:
    """Preallocated MLA latent cache for a batch of sequences with ragged lengths.

    The model writes new entries into slots it is given but never changes `lengths`; only the decoding loop
    commits (`commit`), which is how speculative entries stay uncommitted until they are accepted.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.c_kv = torch.zeros(num_layers, batch_size, capacity, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch_size, capacity, rope_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.c_kv.shape[1]

    @property
    def num_layers(self) -> int:
        return self.c_kv.shape[0]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers."""
        per_layer = self.c_kv.shape[-1] + self.k_pe.shape[-1]
        return self.num_layers * per_layer * self.c_kv.element_size()

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store new entries c_kv [B, n, R] and k_pe [B, n, dr] at slots [B, n] (uncommitted until `commit`)."""
        if int(slots.max()) >= self.capacity:
            raise CacheCapacityError(
                f"cache capacity {self.capacity} exceeded (slot {int(slots.max())}); "
                "lower max_new_tokens or the prompt length")
        rows = torch.arange(self.batch_size, device=slots.device)[:, None]
        self.c_kv[layer, rows, slots] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer, rows, slots] = k_pe.to(self.k_pe.dtype)

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of slots [0, upto): c_kv [B, upto, R], k_pe [B, upto, dr]."""
        return self.c_kv[layer, :, :upto], self.k_pe[layer, :, :upto]

    def commit(self, offsets: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep, per row b, the entries at lengths[b] + offsets[b, :counts[b]] as the next counts[b] tokens.

        offsets [B, m] are ascending offsets into the uncommitted region (entries past counts[b] are ignored);
        the kept entries move to consecutive slots right after the committed prefix, then lengths grow.
        """
        m = offsets.shape[1]
        if m:
            rows = torch.arange(self.batch_size, device=offsets.device)[:, None]
            src = self.lengths[:, None] + offsets
            dst = self.lengths[:, None] + torch.arange(m, device=offsets.device)
            self.c_kv[:, rows, dst] = self.c_kv[:, rows, src]
            self.k_pe[:, rows, dst] = self.k_pe[:, rows, src]
        self.lengths += counts.to(self.lengths.device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every batch row not listed in rows (finished sequences stop costing work)."""
        self.c_kv = self.c_kv[:, rows].contiguous()
        self.k_pe = self.k_pe[:, rows].contiguous()
        self.lengths = self.lengths[rows].clone()
