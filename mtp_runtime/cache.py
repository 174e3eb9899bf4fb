"""LatentCache: the only state that lives across decoding steps (per layer: normalised c_kv and roped k_pe, plus
the sparse-attention indexer keys of DeepSeek-V3.2 models)."""

from __future__ import annotations

import torch

from .index_cache import IndexKeys


class LatentCache:
    """Preallocated MLA latent cache for a batch of sequences with ragged lengths.

    Each slot holds one token's [c_kv | k_pe] in one row of width kv_lora_rank + rope_dim, so a forward writes a
    token with one store and scores it against a query with one matmul. The model writes new entries into slots
    it is given but never changes `lengths`; only the decoding loop commits (`commit`), which is how speculative
    entries stay uncommitted until they are accepted.

    With index_dim > 0 (DeepSeek Sparse Attention) `index` holds each slot's indexer key too, written by the same
    forwards and moved by the same commit (FP8-stored with index_fp8).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", initial_length: int = 0,
                 index_dim: int = 0, index_fp8: bool = False):
        self.capacity = capacity
        self.kv_lora_rank = kv_lora_rank
        self.latent = torch.zeros(num_layers, batch_size, capacity, kv_lora_rank + rope_dim, dtype=dtype,
                                  device=device)
        self.lengths = torch.full((batch_size,), initial_length, dtype=torch.long, device=device)
        self.index = IndexKeys(num_layers, batch_size, capacity, index_dim, dtype, device, index_fp8) if index_dim \
            else None

    @property
    def c_kv(self) -> torch.Tensor:
        """[layers, B, capacity, kv_lora_rank] view of the latents."""
        return self.latent[..., : self.kv_lora_rank]

    @property
    def k_pe(self) -> torch.Tensor:
        """[layers, B, capacity, rope_dim] view of the roped keys."""
        return self.latent[..., self.kv_lora_rank:]

    @property
    def batch_size(self) -> int:
        return self.latent.shape[1]

    @property
    def num_layers(self) -> int:
        return self.latent.shape[0]

    @property
    def max_length(self) -> int:
        """The longest committed row (read from the device: plans are built outside the forwards)."""
        return int(self.lengths.max()) if self.batch_size else 0

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers (indexer keys included)."""
        index = self.index.bytes_per_token() if self.index is not None else 0
        return self.num_layers * self.latent.shape[-1] * self.latent.element_size() + index

    def write(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Store new entries [B, n, kv_lora_rank + rope_dim] at slots [B, n] (uncommitted until `commit`).

        Slots must lie below `capacity`; the plan that names them checks that (AttentionPlan.over_cache).
        """
        rows = torch.arange(self.batch_size, device=slots.device)[:, None]
        self.latent[layer, rows, slots] = entries.to(self.latent.dtype)

    def read(self, layer: int, span: int) -> torch.Tensor:
        """Entries of slots [0, span): [B, span, kv_lora_rank + rope_dim]."""
        return self.latent[layer, :, :span]

    def commit(self, offsets: torch.Tensor | None, counts: torch.Tensor) -> None:
        """Keep, per row b, the entries at lengths[b] + offsets[b, :counts[b]] as the next counts[b] tokens.

        offsets [B, m] are ascending offsets into the uncommitted region (entries past counts[b] are ignored);
        the kept entries move to consecutive slots right after the committed prefix, then lengths grow. None
        means the kept entries already are consecutive (a prefill, a chain) and nothing moves.
        """
        if offsets is not None and offsets.shape[1]:
            m = offsets.shape[1]
            rows = torch.arange(self.batch_size, device=offsets.device)[:, None]
            src = self.lengths[:, None] + offsets
            dst = self.lengths[:, None] + torch.arange(m, device=offsets.device)
            self.latent[:, rows, dst] = self.latent[:, rows, src]
            if self.index is not None:
                self.index.move(rows, src, dst)
        self.lengths += counts.to(self.lengths.device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every batch row not listed in rows (finished sequences stop costing work)."""
        self.latent = self.latent[:, rows].contiguous()
        self.lengths = self.lengths[rows].clone()
        if self.index is not None:
            self.index.keep_rows(rows)
