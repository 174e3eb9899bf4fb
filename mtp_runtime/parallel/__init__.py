"""Scale-out on torch.distributed: tensor parallelism of MLA heads and expert parallelism of DeepSeekMoE.

    group = init_from_env()                              # under torchrun: gloo on CPU, NCCL on CUDA
    rt = mtp_runtime.load(path, device=group.device, parallel=group)
    out = rt.generate("def f(x):")                        # every rank runs it; every rank gets the same tokens

* `group.py`: ParallelGroup (rank, world size, device, process group) and joining torchrun's group.
* `linear.py`: sliced and row-parallel linears, SwiGLU MLPs split by channel.
* `experts.py`: local routed experts and the MoE layer with one all-reduce.
* `shard.py`: shard_model, which converts a loaded full model in place.
"""

from .group import ParallelGroup, close, init_from_env, launched_world_size
from .shard import check_shardable, shard_model

__all__ = ["ParallelGroup", "check_shardable", "close", "init_from_env", "launched_world_size", "shard_model"]
