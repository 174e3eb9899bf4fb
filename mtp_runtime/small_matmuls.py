"""Matrix products over a few rows, rewritten inside compiled step graphs as a product and a sum that inductor
generates its own loop for (a post-grad pass of torch.compile; eager steps keep MKL).

A decoding step multiplies each weight matrix by the step's one to a few tokens. A model that does not fit in the
last-level cache reads every weight from memory once per step, and those reads are the step's cost. MKL reads
them once for one row (sgemv), but from two rows on its sgemm first packs the weight into a blocked copy, which
costs as much again: on this project's 2-core CPU, a [128, 160] float32 matrix out of cache took 20 us for 1 row
and 24-36 us for 2-9 rows, where inductor's loop over [rows, out, in] (vectorised along `in`, the contiguous
dimension of both operands) needs no packed copy and is fused with the work around it. That loop reads the
weight once per row and is bound by its one accumulator and lane sum per output, so its cost still grows with the
rows (BENCHMARKS.md §16; reading each weight row once for all rows was no faster in the trunk). Compiled trunk of
the shipped 20-layer model over 256 cached tokens (§15): a plain step 1.4-1.5x faster, a 5-node verify 1.6x.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

MAX_ROWS = 16
"""Products over at most this many rows are rewritten (a step verifies up to 16-32 nodes; past a few dozen rows
a blocked gemm reuses each weight element enough to pay for its packing)."""

aten = torch.ops.aten
_PATTERNS = PatternMatcherPass(pass_name="mtp_runtime_small_matmuls")


def _few_rows(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    """A float product on the CPU over static shapes with at most MAX_ROWS rows."""
    a, b = rows.meta.get("val"), weight.meta.get("val")
    if a is None or b is None or a.device.type != "cpu" or not a.dtype.is_floating_point:
        return False
    return all(isinstance(d, int) for d in (*a.shape, *b.shape)) and a.shape[-2] <= MAX_ROWS


def _as_reduction(match: Match, inputs: list[torch.fx.Node], product) -> None:
    match.replace_by_example(product, inputs)
    for node in inputs:  # keep their layout: the loop is generated for it
        node.meta["inductor_realize_to_strides"] = True


def _rows_times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] as a product and a sum: [M, K, N] -> [M, N]."""
    return (a[:, :, None] * b[None, :, :]).sum(1)


@register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=_PATTERNS)
def _mm(match: Match, a: torch.fx.Node, b: torch.fx.Node) -> None:
    if _few_rows(a, b):
        _as_reduction(match, [a, b], _rows_times)


@register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=_PATTERNS)
def _addmm(match: Match, bias: torch.fx.Node, a: torch.fx.Node, b: torch.fx.Node) -> None:
    if _few_rows(a, b):
        _as_reduction(match, [bias, a, b], lambda bias, a, b: _rows_times(a, b) + bias)


@register_graph_pattern(CallFunction(aten.bmm, Arg(), Arg()), pass_dict=_PATTERNS)
def _bmm(match: Match, a: torch.fx.Node, b: torch.fx.Node) -> None:
    if _few_rows(a, b):
        _as_reduction(match, [a, b], lambda a, b: (a[:, :, :, None] * b[:, None, :, :]).sum(2))  # [B, M, K, N]


class SmallMatmulsAsReductions(CustomGraphPass):
    """The pass, for inductor's `post_grad_custom_post_pass`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        _PATTERNS.apply(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
