"""CompiledForwards: the step forwards of batch-1 decoding compiled with torch.compile (inductor).

A decode step of a small model is bound by per-op overhead in eager PyTorch (thousands of small ops, each a few
microseconds); compiled, the trunk and each MTP module run as one graph each, with their element-wise work fused.
Every forward of a step has a shape fixed by the draft shape: n tokens against a cache whose attended span and
capacity are marked dynamic, so the span growing step after step never recompiles, and a one-token MoE step reads
its chosen experts by unbacked integer indices inside the graph (no host sync, no graph break). Shapes seen once
stay compiled for the process; inductor's on-disk caches keep the generated code across processes, so a second
process pays only tracing (20-45 s per graph of the shipped 20-layer model, against about 75 s cold).

Only batch-1 forwards are compiled (a batch shrinks as rows finish, and each size would be a new graph); larger
batches and prefills run eagerly. A graph compiles the first time its shape is met (`bench` runs one untimed
warm-up call per configuration for that).
"""

from __future__ import annotations

import time

import torch

from .forwards import Forwards, mtp_step, trunk_step
from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan

COMPILE_OPTIONS: dict = {}
"""Inductor's default Python wrapper. Its C++ wrapper (cpp_wrapper) calls the kernels without going back to Python
between them, 1.3x faster steps on the shipped 20-layer model (plain decoding 140-170 vs 110-115 tokens/s), but
it builds each graph as one large C++ file: 5.5 minutes per step shape instead of 75 s, cold (both measured on
this project's 2-core CPU), and a drafting runtime needs one graph per verify width."""


RECOMPILE_LIMIT = 64
"""Graphs kept per step function. Each verify width is a graph (and may compile twice, as dynamo turns a size it
first saw as static dynamic), and past dynamo's default of 8 every new shape silently ran eagerly: measured with
benchmarks/step_costs.py, whose widths 1, 2, 4 and 8 filled the 8 and left 16 eager."""


def _mark_dynamic(plan: AttentionPlan) -> None:
    """The attended span grows every step and the capacity differs per request: neither may recompile."""
    torch._dynamo.maybe_mark_dynamic(plan.mask, 2)
    torch._dynamo.maybe_mark_dynamic(plan.cache.latent, 2)


class CompiledForwards(Forwards):
    """Batch-1 trunk and MTP forwards through torch.compile; other batch sizes fall back to eager."""

    compiled = True

    def __init__(self, model: DeepseekForCausalLM):
        super().__init__(model)
        self._trunk = torch.compile(trunk_step, dynamic=False, options=COMPILE_OPTIONS)
        self._mtp = torch.compile(mtp_step, dynamic=False, options=COMPILE_OPTIONS)

    def trunk(self, tokens: torch.Tensor, plan: AttentionPlan):
        if tokens.shape[0] != 1:
            return super().trunk(tokens, plan)
        _mark_dynamic(plan)
        return self._call(self._trunk, self.model, tokens, plan)

    def mtp(self, k: int, prev_hidden: torch.Tensor, tokens: torch.Tensor, plan: AttentionPlan,
            step: bool = True) -> torch.Tensor:
        if tokens.shape[0] != 1 or not step:
            return super().mtp(k, prev_hidden, tokens, plan)
        _mark_dynamic(plan)
        return self._call(self._mtp, self.model, k, prev_hidden, tokens, plan)

    def _call(self, fn, *args):
        before = _compiled_frames()
        start = time.perf_counter()
        with torch._dynamo.config.patch(capture_scalar_outputs=True, recompile_limit=RECOMPILE_LIMIT):
            out = fn(*args)
        if _compiled_frames() != before:
            self.compile_seconds += time.perf_counter() - start
        return out


def _compiled_frames() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
