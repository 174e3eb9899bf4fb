"""The shipped default model: it loads with no path, drafts with its MTP modules, and stays lossless."""

from __future__ import annotations

import pytest

import mtp_runtime
from mtp_runtime import prompts


@pytest.fixture(scope="module")
def shipped_runtime():
    return mtp_runtime.load()


@pytest.fixture(scope="module")
def held_out_prompts(shipped_runtime):
    """Three prompts cut from held-out files (never trained on), shortened to keep the test fast."""
    texts = prompts.default_prompts(3, roots=None)
    return [shipped_runtime.encode(t)[-48:] for t in texts]


def test_default_model_loads_with_mtp_modules_and_tokenizer(shipped_runtime):
    assert shipped_runtime.path == mtp_runtime.DEFAULT_MODEL
    assert shipped_runtime.config.model_type == "deepseek_v3" and shipped_runtime.num_mtp_modules >= 1
    assert shipped_runtime.tokenizer is not None
    text = "def f(x):\n    return x\n"
    assert shipped_runtime.tokenizer.decode(shipped_runtime.encode(text)) == text == shipped_runtime.decode(
        shipped_runtime.encode(text))


@pytest.mark.parametrize("draft, kwargs", [
    ("chain", {"num_draft_tokens": 3}),
    ("tree", {"tree": "3,2,1"}),
    ("dynamic", {}),
])
def test_speculative_greedy_equals_plain_on_held_out_prompts(shipped_runtime, held_out_prompts, draft, kwargs):
    plain = shipped_runtime.generate(input_ids=held_out_prompts, max_new_tokens=48, draft="none", ignore_eos=True)
    spec = shipped_runtime.generate(input_ids=held_out_prompts, max_new_tokens=48, draft=draft, ignore_eos=True,
                                    **kwargs)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    merged = spec[0].stats
    for result in spec[1:]:
        merged = merged.merge(result.stats)
    assert merged.tau > 1.5  # the trained MTP modules really draft: several tokens per verify forward


def test_default_generate_one_liner_streams_text(shipped_runtime):
    stream = shipped_runtime.generate("def greet(name):\n", max_new_tokens=16, stream=True)
    text = "".join(chunk.text for chunk in stream)
    assert text == stream.results[0].text and len(stream.results[0].token_ids) <= 16
