"""Memory a generate call will need, checked against what the device has free before anything is allocated.

The estimate is a lower bound of what decoding holds at once: the trunk's and the MTP modules' latent caches (the
only memory that grows with the sequence), the prefill's activations over the padded prompts, and the verify
step's logits. A request whose lower bound already exceeds the free memory is refused with both figures, instead
of failing inside the allocator halfway through a prefill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import InsufficientMemoryError
from .params import DraftParams

PREFILL_ACTIVATIONS_PER_TOKEN = 4
"""Hidden-size activations one prefill token holds at once (hidden, residual, a norm, a projection): a lower
bound, attention scores and MoE buffers not counted."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a generate call needs at least, by part."""

    cache: int
    """Trunk + MTP latent caches."""
    activations: int
    """Prefill activations and verify logits."""

    @property
    def total(self) -> int:
        return self.cache + self.activations


def estimate(config: ModelConfig, num_mtp: int, batch: int, longest_prompt: int, capacity: int, draft_nodes: int,
             draft_depth: int, element_size: int) -> MemoryEstimate:
    """The lower bound for `batch` sequences over caches of `capacity` slots (the engine's sizes)."""
    row = config.kv_lora_rank + config.qk_rope_head_dim
    trunk = config.num_hidden_layers * batch * capacity * row * element_size
    mtp = num_mtp * batch * (capacity + draft_depth + 2) * row * element_size if draft_depth else 0
    prefill = batch * longest_prompt * config.hidden_size * element_size * PREFILL_ACTIVATIONS_PER_TOKEN
    logits = batch * (draft_nodes + 1) * config.vocab_size * 4  # float32
    return MemoryEstimate(trunk + mtp, prefill + logits)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CPU: the kernel's MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def ensure_request_fits(model, batch: int, longest_prompt: int, capacity: int, draft: DraftParams) -> None:
    """Raise InsufficientMemoryError when decoding `batch` sequences with `model` (caches of `capacity` slots, drafts
    of `draft`) needs more than the device's free memory."""
    weight = model.lm_head.weight
    num_mtp = model.num_mtp if draft.mode != "none" else 0
    need = estimate(model.config, num_mtp, batch, longest_prompt, capacity, draft.max_nodes, draft.max_depth,
                    weight.element_size())
    free = available_bytes(weight.device)
    if free is None or need.total <= free:
        return
    raise InsufficientMemoryError(
        f"this request needs at least {_size(need.total)} ({_size(need.cache)} of latent cache for {batch} "
        f"sequence(s) x {capacity} positions, {_size(need.activations)} of activations) but {weight.device.type} has "
        f"{_size(free)} free; generate fewer prompts per call, lower max_new_tokens or shorten the prompts")


def _size(n: int) -> str:
    """Bytes as '1.5 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
