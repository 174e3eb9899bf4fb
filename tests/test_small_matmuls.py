"""The compiled graphs' small-matmul pass: products over at most MAX_ROWS rows become inductor's own loops (no
extern gemm left in the generated code) with the eager results; larger products keep the gemm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from mtp_runtime.small_matmuls import MAX_ROWS, SmallMatmulsAsReductions

GEMMS = ("extern_kernels.mm(", "extern_kernels.addmm(", "extern_kernels.bmm(")


def _projections(x, weight, bias, stacked):
    """A linear without and with bias, and a batched product, as a decoding step has them."""
    return F.linear(x, weight) + F.linear(x, weight, bias), torch.bmm(x.expand(stacked.shape[0], -1, -1), stacked)


def _compiled_code(rows: int):
    generator = torch.Generator().manual_seed(rows)
    x, weight, bias = torch.randn(rows, 24, generator=generator), torch.randn(40, 24, generator=generator), \
        torch.randn(40, generator=generator)
    stacked = torch.randn(3, 24, 8, generator=generator)
    compiled = torch.compile(_projections, fullgraph=True, dynamic=False,
                             options={"post_grad_custom_post_pass": SmallMatmulsAsReductions()})
    torch._dynamo.reset()
    got, code = run_and_get_code(compiled, x, weight, bias, stacked)
    expected = _projections(x, weight, bias, stacked)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    return "\n".join(code)


@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_products_over_few_rows_become_generated_loops_with_the_eager_results(rows):
    code = _compiled_code(rows)
    assert not any(gemm in code for gemm in GEMMS)


def test_products_over_more_rows_keep_the_gemm():
    code = _compiled_code(MAX_ROWS + 1)
    linears = code.count("extern_kernels.addmm(") + code.count("extern_kernels.mm(")
    assert linears == 2  # inductor may fold the first into the second's bias: addmm twice
    assert "extern_kernels.bmm(" in code
