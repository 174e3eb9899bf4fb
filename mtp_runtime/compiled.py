"""CompiledForwards: the step forwards of batch-1 decoding compiled ahead of time (torch.compile's aot_compile,
inductor), called without dynamo's per-call guards, and kept on disk across processes.

A decode step of a small model is bound by per-op overhead in eager PyTorch (thousands of small ops, each a few
microseconds); compiled, the trunk and each MTP module run as one graph each, with their element-wise work fused
and their products over a step's few rows generated as loops of inductor's own (small_matmuls.py).
Every forward of a step has a shape fixed by the draft shape: n tokens against a cache whose attended span and
capacity are marked dynamic, so the span growing step after step never recompiles, and a one-token MoE step reads
its chosen experts by unbacked integer indices inside the graph (no host sync, no graph break).

Each graph is one `StepGraph`, found by a key that fixes what its code depends on (which network, module k, n,
the plan's kind, dtypes, thread count). A call through torch.compile evaluates dynamo's guards first (about 400
tensor and 1,000 type checks for the shipped 20-layer trunk); a StepGraph is compiled ahead of time
(`aot_compile`), checks its guards on its first calls against each new cache, where a failure compiles the key
afresh, and then calls the graph directly (benchmarks/vs_commit.py against the guarded calls of the commit
before: plain decoding 1.04x; `auto` 1.08x, the change of moe.PAIRS_MAX included).

Graphs are saved under inductor's cache directory (`torch._inductor` cache_dir, TORCHINDUCTOR_CACHE_DIR), keyed
also by the torch version and a digest of the source they are traced from, so a new process loads a step shape
in seconds instead of compiling it again (about a minute per shape of the shipped model on this project's 2-core
CPU). Callers whose inputs differ in what a key does not fix (a mask built another way, int32 token ids) fail
each other's guards; each key keeps up to SAVED_VARIANTS graphs on disk, so that each caller loads its own instead
of compiling again and overwriting the other's. Torch's own on-disk caches do not serve here: in
torch 2.13 an ahead-of-time compile puts a fresh uuid (its backend id) into AOTAutograd's cache key, so every
process misses them.

Only batch-1 forwards are compiled (a batch shrinks as rows finish, and each size would be a new graph); larger
batches and prefills run eagerly. A graph is built or loaded the first time its shape is met (`bench` runs one
untimed warm-up call per configuration for that); `compile_seconds` counts that time. Inductor's generated code
does not assert the sizes and strides of its inputs (COMPILE_OPTIONS); instead a graph evaluates its guards again
whenever a step's own tensors (tokens, hidden states, the plan's positions, slots and mask) come in a layout it has
not yet been checked against (`StepGraph.admits`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import time
import warnings
from pathlib import Path

import torch

from .forwards import Forwards, mtp_step, trunk_step
from .model import DeepseekForCausalLM
from .model.plan import AttentionPlan
from .small_matmuls import SmallMatmulsAsReductions

COMPILE_OPTIONS: dict = {"post_grad_custom_post_pass": SmallMatmulsAsReductions(), "size_asserts": False,
                         "alignment_asserts": False}
"""Products over a few rows become inductor's own loops (small_matmuls.py). The generated wrapper asserts no input
layouts: it asserted every input's sizes and strides (parameters included, about 450 checks for the shipped 20-layer
trunk), 0.55 ms of a 6.5 ms plain step (BENCHMARKS.md §16); `StepGraph.admits` checks the layouts that can change.
Inductor keeps its default Python wrapper. Its C++ wrapper (cpp_wrapper) was no faster than this one without the
asserts (a 4-layer cut of the trunk: 1.356 vs 1.358 ms a step), and it builds each graph as one large C++ file: 5.5
minutes per step shape instead of 75 s, cold (measured on this project's 2-core CPU)."""

SAVED_VARIANTS = 4
"""Graphs kept per key for inputs that fail each other's guards; once every one is taken, the last is replaced."""

GUARD_CHECKS = 2
"""Calls per new cache on which a graph's guards are still evaluated: the first one, and one with a longer span
(a graph that had specialised the span would fail there and be compiled afresh)."""


def default_cache_dir() -> Path:
    """Where compiled step graphs are kept: beside inductor's own on-disk caches."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "mtp_runtime_steps"


TRACED_SOURCES = ("model", "forwards.py", "cache.py", "index_cache.py", "config.py", "compiled.py",
                  "small_matmuls.py")
"""The package's files a step graph is traced from (the networks, their cache and config, the step functions),
relative to the package: a saved graph is reused only while they are unchanged."""


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of TRACED_SOURCES."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in TRACED_SOURCES:
        paths = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        for path in paths:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _traced_copy(plan: AttentionPlan) -> AttentionPlan:
    """The plan a graph is traced on: copies of its mask and cache latents, marked dynamic in the attended span
    (it grows every step) and the capacity (it differs per request). A mark stays on its tensor, and a graph
    loaded from disk rejects a marked tensor (its saved guards expect none), so the caller's cache, used by every
    graph of a request, stays unmarked."""
    cache = copy.copy(plan.cache)
    cache.latent = _copy(plan.cache.latent)
    traced = dataclasses.replace(plan, mask=_copy(plan.mask), cache=cache)
    torch._dynamo.maybe_mark_dynamic(traced.mask, 2)
    torch._dynamo.maybe_mark_dynamic(cache.latent, 2)
    return traced


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy that is an inference tensor exactly when the original is (guards check that too)."""
    with torch.inference_mode(tensor.is_inference()):
        return tensor.clone()


class StepGraph:
    """One compiled step shape; its guards are evaluated on its first GUARD_CHECKS calls per cache, and again on a
    call whose step tensors come in a layout not yet checked."""

    def __init__(self, function, path: Path):
        self.function = function
        self.path = path
        """The file it was loaded from or saved to."""
        function.disable_guard_check()
        self._checked: dict[tuple, int] = {}
        self._layouts: set[tuple] = set()

    def admits(self, args: tuple, plan: AttentionPlan) -> bool:
        """Whether the graph is valid for these inputs: known for a cache it already ran on and step tensors in a
        layout it already ran on, else its guards."""
        cache = (id(plan.cache.latent), tuple(plan.cache.latent.shape))
        calls = self._checked.get(cache, 0)
        layout = _layout(args, plan)
        if calls >= GUARD_CHECKS and layout in self._layouts:
            return True
        if not self.function.guard_check(*args):
            return False
        self._checked[cache] = calls + 1
        self._layouts.add(layout)
        return True

    def __call__(self, *args):
        return self.function(*args)


def _layout(args: tuple, plan: AttentionPlan) -> tuple:
    """The layout of a step's own tensors (its tensor arguments, the plan's positions, slots and mask): dtype and
    rank of a contiguous one (sizes are fixed by the graph's key, the mask's span aside), strides of any other."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [plan.positions, plan.slots, plan.mask]
    return tuple((t.dtype, t.dim()) if t.is_contiguous() else (t.dtype, t.stride()) for t in tensors
                 if t is not None)


class CompiledForwards(Forwards):
    """Batch-1 trunk and MTP forwards through compiled step graphs; other batch sizes fall back to eager."""

    compiled = True

    def __init__(self, model: DeepseekForCausalLM, cache_dir: str | Path | None = None):
        super().__init__(model)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._graphs: dict[tuple, StepGraph] = {}
        self._model_facts = (torch.__version__, _source_digest(), repr(model.config), repr(model),
                             str(next(model.parameters()).dtype))
        self.graphs_built = 0
        """Graphs compiled so far, those whose guards later failed included."""
        self.graphs_loaded = 0
        """Graphs read from the disk cache instead of compiled."""

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
            graph = self._graphs[key] = self._build(fn, key, args, plan, failed=graph.path if graph else None)
            self.compile_seconds += time.perf_counter() - start
        return graph(*args)

    def _build(self, fn, key: tuple, args: tuple, plan: AttentionPlan, failed: Path | None) -> StepGraph:
        """A saved graph of this key that admits these inputs (not the `failed` one, whose guards just failed),
        else a newly compiled one, saved in a free variant file (a missing or unreadable one; the last when none
        is). The graph found replaces the key's graph in memory: a key holds one graph at a time, checked by its
        guards on its first calls per cache."""
        digest = hashlib.sha256(repr(self._model_facts + key).encode()).hexdigest()[:40]
        paths = [self.cache_dir / f"{digest}{f'-{i}' if i else ''}.graph" for i in range(SAVED_VARIANTS)]
        free = None
        for path in paths:
            if path == failed:
                continue
            graph = self._load(path) if path.exists() else None
            if graph is None:
                free = free or path
            elif graph.admits(args, plan):
                self.graphs_loaded += 1
                return graph
        traced = args[:-1] + (_traced_copy(plan),)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            function = torch.compile(fn, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS).aot_compile(
                (traced, {}))
        self.graphs_built += 1
        path = free or paths[-1]
        self._save(function, path)
        return StepGraph(function, path)

    @staticmethod
    def _load(path: Path) -> StepGraph | None:
        """A saved graph, or None when the file cannot be read as one (it is then compiled and saved afresh)."""
        try:
            with open(path, "rb") as file:
                return StepGraph(torch.compiler.load_compiled_function(file), path)
        except Exception:  # a truncated or incompatible file is a cache miss, not an error
            return None

    @staticmethod
    def _save(function, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            function.save_compiled_function(str(path))
        except Exception as error:  # a graph that cannot be kept still serves this process
            warnings.warn(f"compiled step graph not saved to {path} ({error}); the next process compiles it again",
                          stacklevel=3)
