"""GPU paths (CUDA, flash-attn): skipped without a CUDA device; on CPU only the dispatch is checked."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from mtp_runtime.errors import DeviceError
from mtp_runtime.model import flash

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_flash_attention_is_never_chosen_for_cpu_tensors():
    assert not flash.flash_available(torch.zeros(1, 2, 3, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_request_without_a_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA device"):
        mtp_runtime.load(device="cuda")


@needs_cuda
def test_bf16_cuda_generation_is_lossless_against_plain():
    rt = mtp_runtime.load(device="cuda", dtype="bfloat16")
    prompt = rt.encode("def parse(line):\n    ")
    plain = rt.generate(input_ids=prompt, max_new_tokens=32, draft="none", ignore_eos=True)
    for draft in ("chain", "tree", "dynamic"):
        assert rt.generate(input_ids=prompt, max_new_tokens=32, draft=draft, ignore_eos=True).token_ids == \
            plain.token_ids


@needs_cuda
@pytest.mark.skipif(flash.flash_attn_func is None, reason="flash-attn is not installed")
def test_flash_causal_matches_sdpa():
    torch.manual_seed(0)
    q, k = (torch.randn(2, 37, 4, 48, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 37, 4, 32, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.1).transpose(1, 2)
    assert (flash.causal_attention(q, k, v, 0.1) - expected).abs().max() < 2e-2
