"""CompiledForwards: the step forwards of batch-1 decoding compiled ahead of time (torch.compile's aot_compile,
inductor) and called without dynamo's per-call guards.

A decode step of a small model is bound by per-op overhead in eager PyTorch (thousands of small ops, each a few
microseconds); compiled, the trunk and each MTP module run as one graph each, with their element-wise work fused.
Every forward of a step has a shape fixed by the draft shape: n tokens against a cache whose attended span and
capacity are marked dynamic, so the span growing step after step never recompiles, and a one-token MoE step reads
its chosen experts by unbacked integer indices inside the graph (no host sync, no graph break).

Each graph is one `StepGraph`, found by a key that fixes what its code depends on (which network, module k, n,
the plan's kind, dtypes, thread count). A call through torch.compile evaluates dynamo's guards first (about 400
tensor and 1,000 type checks for the shipped 20-layer trunk); a StepGraph is compiled ahead of time
(`aot_compile`), checks its guards on its first calls against each new cache, where a failure compiles the key
afresh, and then calls the graph directly (benchmarks/vs_commit.py against the guarded calls of the commit
before: plain decoding 1.04x; `auto` 1.08x, the change of moe.PAIRS_MAX included). Inductor's and AOTAutograd's
on-disk caches keep the compiled code across processes: a process that finds them warm builds the plain step in
about 4 s, the shapes of an `auto` call in about 6.5 s; cold, each shape of the shipped model takes about a
minute on this 2-core CPU.

Only batch-1 forwards are compiled (a batch shrinks as rows finish, and each size would be a new graph); larger
batches and prefills run eagerly. A graph is built the first time its shape is met (`bench` runs one untimed
warm-up call per configuration for that); `compile_seconds` counts that time. An input whose layout differs
from the traced one without a guard check still fails loudly: inductor's generated code asserts the sizes and
strides of the inputs it indexes.
"""

from __future__ import annotations

import dataclasses
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

GUARD_CHECKS = 2
"""Calls per new cache on which a graph's guards are still evaluated: the first one, and one with a longer span
(a graph that had specialised the span would fail there and be compiled afresh)."""


def _mark_dynamic(plan: AttentionPlan) -> None:
    """The attended span grows every step and the capacity differs per request: neither may recompile."""
    torch._dynamo.maybe_mark_dynamic(plan.mask, 2)
    torch._dynamo.maybe_mark_dynamic(plan.cache.latent, 2)


class StepGraph:
    """One compiled step shape; its guards are evaluated on its first GUARD_CHECKS calls per cache only."""

    def __init__(self, function):
        self.function = function
        function.disable_guard_check()
        self._checked: dict[tuple, int] = {}

    def admits(self, args: tuple, plan: AttentionPlan) -> bool:
        """Whether the graph is valid for these inputs: known for a cache it already ran on, else its guards."""
        cache = (id(plan.cache.latent), tuple(plan.cache.latent.shape))
        calls = self._checked.get(cache, 0)
        if calls >= GUARD_CHECKS:
            return True
        if not self.function.guard_check(*args):
            return False
        self._checked[cache] = calls + 1
        return True

    def __call__(self, *args):
        return self.function(*args)


class CompiledForwards(Forwards):
    """Batch-1 trunk and MTP forwards through compiled step graphs; other batch sizes fall back to eager."""

    compiled = True

    def __init__(self, model: DeepseekForCausalLM):
        super().__init__(model)
        self._graphs: dict[tuple, StepGraph] = {}
        self.graphs_built = 0
        """Graphs compiled so far, those whose guards later failed included."""

    def trunk(self, tokens: torch.Tensor, plan: AttentionPlan):
        if tokens.shape[0] != 1:
            return super().trunk(tokens, plan)
        return self._call(trunk_step, ("trunk", tokens.shape[1]), (self.model, tokens), plan)

    def mtp(self, k: int, prev_hidden: torch.Tensor, tokens: torch.Tensor, plan: AttentionPlan,
            step: bool = True) -> torch.Tensor:
        if tokens.shape[0] != 1 or not step:
            return super().mtp(k, prev_hidden, tokens, plan)
        return self._call(mtp_step, ("mtp", k, tokens.shape[1]), (self.model, k, prev_hidden, tokens), plan)

    def _call(self, fn, shape: tuple, leading: tuple, plan: AttentionPlan):
        """fn(*leading, plan) through the graph of its key. The graph gets a copy of the plan whose memo of
        per-head biases is empty, as when it was traced: a plan the graph ran on holds one, and every guard
        check on it would fail."""
        plan = dataclasses.replace(plan, _biases={})
        args = leading + (plan,)
        key = shape + (plan.impl, plan.causal_only, plan.cache.num_layers, str(plan.cache.latent.dtype),
                       torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        graph = self._graphs.get(key)
        if graph is None or not graph.admits(args, plan):
            start = time.perf_counter()
            graph = self._graphs[key] = self._build(fn, args, plan)
            self.compile_seconds += time.perf_counter() - start
        return graph(*args)

    def _build(self, fn, args: tuple, plan: AttentionPlan) -> StepGraph:
        _mark_dynamic(plan)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            function = torch.compile(fn, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS).aot_compile(
                (args, {}))
        self.graphs_built += 1
        return StepGraph(function)
