"""ParallelGroup: this process's rank among the ranks that share one model, and the collectives they use.

torchrun starts one process per rank and describes them with environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `init_from_env` joins that process group (gloo on CPU, NCCL on CUDA).
Every rank runs the same engine on the same prompts with the same seeds, so all ranks emit the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ParallelError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, eq=False)
class ParallelGroup:
    """The ranks one model is split over; collectives run on `process_group` (None: the default group)."""

    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where this rank's weights and activations live (cuda:LOCAL_RANK under NCCL)."""
    process_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints and writes reports."""
        return self.rank == 0

    def local_range(self, size: int) -> slice:
        """This rank's contiguous share of `size` items (heads, experts, channels); size % world_size == 0."""
        per_rank = size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; every rank receives the same result."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        return tensor

    def agree_seed(self) -> int:
        """A fresh random seed, drawn on rank 0 and broadcast, so that unseeded sampling agrees on every rank."""
        seed = torch.tensor([torch.seed() % 2**62], dtype=torch.long, device=self.device)
        if self.world_size > 1:
            dist.broadcast(seed, src=0, group=self.process_group)
        return int(seed.item())


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when this process was not started by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device: str | torch.device | None = None) -> ParallelGroup:
    """Join the process group torchrun describes: gloo on CPU, NCCL on CUDA (device cuda:LOCAL_RANK)."""
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ParallelError(f"{', '.join(missing)} not set; start the processes with torchrun "
                            "(e.g. torchrun --nproc-per-node 2 -m mtp_runtime.cli generate ...)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _rank_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return ParallelGroup(rank, world_size, device)


def close() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """cpu as asked; cuda (asked, or by default when available) becomes cuda:LOCAL_RANK unless an index is given."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ParallelError("device 'cuda' was requested but no CUDA device is available; use --device cpu (gloo)")
    index = device.index if device.index is not None else local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
