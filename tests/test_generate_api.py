"""Runtime.generate as a user calls it: statistics, streaming, batching, draft defaults and typed errors."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from builders import build_checkpoint, build_mostly_right
from mtp_runtime.errors import (CacheCapacityError, GenerationSettingsError, MTPRuntimeError, NoMTPModulesError)

PROMPTS = [[5], [17, 3, 44], [9, 9, 31, 2, 60, 12, 7]]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return mtp_runtime.load(build_mostly_right(tmp_path_factory.mktemp("api"), num_mtp=2, seed=3), device="cpu")


@pytest.fixture(scope="module")
def rt_no_mtp(tmp_path_factory):
    return mtp_runtime.load(build_checkpoint(tmp_path_factory.mktemp("no_mtp"), num_mtp=0, seed=1), device="cpu")


# --- statistics -----------------------------------------------------------------------------------------


def check_stats(result, max_new_tokens: int, nodes_per_step: int | None = None) -> None:
    s = result.stats
    assert s.new_tokens == len(result.token_ids)
    assert s.steps >= 1
    assert s.mean_accepted_length == pytest.approx(s.new_tokens / s.steps)
    assert all(0.0 <= r <= 1.0 for r in s.acceptance_per_depth)
    assert all(0 <= a <= t for a, t in zip(s.depth_accepts, s.depth_attempts))
    hist = s.accepted_length_histogram
    assert sum(hist.values()) == s.draft_steps == s.steps - 1  # every verify step after the prefill drafted
    cumulative = s.cumulative_acceptance
    assert all(0.0 <= c <= 1.0 for c in cumulative)
    assert all(a >= b for a, b in zip(cumulative, cumulative[1:]))  # P(at least d accepted) is non-increasing
    # prefill emits one token, each verify step its accepted drafts plus a bonus; the last step may be cut
    emitted = 1 + sum((k + 1) * count for k, count in hist.items())
    assert s.new_tokens <= emitted
    assert emitted - s.new_tokens <= (max(hist) if hist else 0)
    if nodes_per_step is not None:
        assert s.drafted_tokens == nodes_per_step * s.draft_steps
    d = len(s.depth_attempts)
    assert s.depth_accepts[:d] == [sum(c for k, c in hist.items() if k >= i + 1) for i in range(d)]


@pytest.mark.parametrize("draft, kw, nodes", [
    ("chain", dict(num_draft_tokens=3), 3),
    ("tree", dict(tree="3,2,1"), 3 + 6 + 6),
    ("tree", dict(tree=[[0], [1], [0, 0]]), 3),
    ("dynamic", dict(num_draft_tokens=6), 6),
])
def test_stats_are_consistent(rt, draft, kw, nodes):
    out = rt.generate(input_ids=PROMPTS, max_new_tokens=40, draft=draft, **kw)
    for result in out:
        assert len(result.token_ids) == 40
        check_stats(result, 40, nodes)
        assert result.stats.mean_accepted_length > 1.5


def test_plain_decoding_stats(rt):
    out = rt.generate(input_ids=PROMPTS[1], max_new_tokens=10, draft="none")
    s = out.stats
    assert (s.steps, s.new_tokens, s.draft_steps, s.drafted_tokens) == (10, 10, 0, 0)
    assert s.mean_accepted_length == 1.0
    assert s.accepted_length_histogram == {} and s.acceptance_per_depth == []


def test_stats_to_dict_matches_properties(rt):
    s = rt.generate(input_ids=PROMPTS[2], max_new_tokens=20, draft="chain").stats
    d = s.to_dict()
    assert d["steps"] == s.steps and d["new_tokens"] == s.new_tokens
    assert d["mean_accepted_length"] == s.mean_accepted_length
    assert d["acceptance_per_depth"] == s.acceptance_per_depth
    assert sum(d["accepted_length_histogram"].values()) == s.draft_steps


# --- streaming and batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("draft", ["none", "chain", "tree", "dynamic"])
def test_stream_concatenates_to_the_non_streaming_result(rt, draft):
    expected = rt.generate(input_ids=PROMPTS, max_new_tokens=25, draft=draft)
    stream = rt.generate(input_ids=PROMPTS, max_new_tokens=25, draft=draft, stream=True)
    assert isinstance(stream, mtp_runtime.GenerationStream)
    assert stream.results == []  # nothing runs before iteration
    pieces: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    chunks = 0
    for chunk in stream:
        assert isinstance(chunk, mtp_runtime.StreamChunk)
        pieces[chunk.index].extend(chunk.token_ids)
        chunks += 1
    assert [pieces[i] for i in range(len(PROMPTS))] == [r.token_ids for r in expected]
    assert [r.token_ids for r in stream.results] == [r.token_ids for r in expected]
    assert [r.stats.steps for r in stream.results] == [r.stats.steps for r in expected]
    if draft != "none":
        assert chunks < 25 * len(PROMPTS)  # several tokens per chunk


def test_single_stream_prompt(rt):
    stream = rt.generate(input_ids=PROMPTS[1], max_new_tokens=9, draft="chain", stream=True)
    tokens = [t for chunk in stream for t in chunk.token_ids]
    assert len(stream.results) == 1 and stream.results[0].token_ids == tokens and len(tokens) == 9


def test_list_of_prompts_returns_a_list(rt):
    one = rt.generate(input_ids=PROMPTS[1], max_new_tokens=4)
    assert isinstance(one, mtp_runtime.GenerationResult)
    assert one.prompt_token_ids == PROMPTS[1]
    many = rt.generate(input_ids=PROMPTS, max_new_tokens=4)
    assert isinstance(many, list) and len(many) == len(PROMPTS)
    assert [r.prompt_token_ids for r in many] == PROMPTS
    single_batch = rt.generate(input_ids=[PROMPTS[1]], max_new_tokens=4)
    assert isinstance(single_batch, list) and single_batch[0].token_ids == one.token_ids
    as_tensor = rt.generate(input_ids=torch.tensor([PROMPTS[1]]), max_new_tokens=4)
    assert isinstance(as_tensor, list) and as_tensor[0].token_ids == one.token_ids


def test_module_level_generate_accepts_a_runtime(rt):
    out = mtp_runtime.generate(None, model=rt, input_ids=PROMPTS[1], max_new_tokens=5, draft="chain")
    assert out.token_ids == rt.generate(input_ids=PROMPTS[1], max_new_tokens=5, draft="none").token_ids


# --- draft defaults -------------------------------------------------------------------------------------


def test_default_draft_is_auto_with_mtp_modules(rt):
    default = rt.generate(input_ids=PROMPTS[2], max_new_tokens=30)
    auto = rt.generate(input_ids=PROMPTS[2], max_new_tokens=30, draft="auto")
    plain = rt.generate(input_ids=PROMPTS[2], max_new_tokens=30, draft="none")
    assert default.stats.draft_steps > 0 and default.stats.drafted_tokens > 0  # it tries every depth first
    assert default.token_ids == auto.token_ids == plain.token_ids


def test_default_draft_is_none_without_mtp_modules(rt_no_mtp):
    assert rt_no_mtp.num_mtp_modules == 0
    out = rt_no_mtp.generate(input_ids=PROMPTS[1], max_new_tokens=8)
    assert out.stats.drafted_tokens == 0 and out.stats.steps == 8
    assert out.token_ids == rt_no_mtp.generate(input_ids=PROMPTS[1], max_new_tokens=8, draft="none").token_ids


def test_plain_sampling_runs(rt_no_mtp):
    """Sampling without drafting (the only sampling a checkpoint without MTP modules can do)."""
    out = rt_no_mtp.generate(input_ids=PROMPTS[1], max_new_tokens=8, temperature=0.8, seed=0)
    assert len(out.token_ids) == 8
    assert out.token_ids == rt_no_mtp.generate(input_ids=PROMPTS[1], max_new_tokens=8, temperature=0.8,
                                               seed=0).token_ids


def test_drafting_without_mtp_modules_names_the_fix(rt_no_mtp):
    for draft in ("chain", "tree", "dynamic"):
        with pytest.raises(NoMTPModulesError, match="train --mtp-only"):
            rt_no_mtp.generate(input_ids=PROMPTS[1], max_new_tokens=4, draft=draft)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(draft="medusa"),
    dict(draft="tree", tree="3,x"),
    dict(draft="tree", tree="3,0"),
    dict(draft="tree", tree=[[1]]),
    dict(draft="tree", tree=[[0], [0]]),
    dict(draft="tree", tree=[[0, 0]]),
    dict(draft="tree", tree="[[0], [1"),
    dict(draft="tree", tree=[]),
    dict(draft="chain", tree="3,2,1"),
    dict(draft="chain", num_draft_tokens=0),
    dict(draft="dynamic", num_draft_tokens=0),
    dict(draft="dynamic", depth=0),
    dict(temperature=-0.5),
    dict(temperature=float("nan")),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_k=-1),
    dict(max_new_tokens=0),
    dict(max_new_tokens=-3),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_settings_raise_generation_settings_error(rt, kwargs):
    kwargs = dict(dict(input_ids=PROMPTS[1], max_new_tokens=4), **kwargs)
    with pytest.raises(GenerationSettingsError):
        rt.generate(**kwargs)


@pytest.mark.parametrize("input_ids", [[], [[1, 2], []], [1, 64], [[3], [-1]], [1, 2.0]],
                         ids=["empty", "empty_in_batch", "vocab", "negative", "float"])
def test_bad_prompts_raise_generation_settings_error(rt, input_ids):
    with pytest.raises(GenerationSettingsError):
        rt.generate(input_ids=input_ids, max_new_tokens=4)


def test_prompt_and_input_ids_are_exclusive(rt):
    with pytest.raises(GenerationSettingsError):
        rt.generate(max_new_tokens=4)


@pytest.mark.parametrize("draft", ["none", "chain", "dynamic"])
def test_too_long_raises_cache_capacity_error(rt, draft):
    limit = rt.config.max_position_embeddings
    with pytest.raises(CacheCapacityError):
        rt.generate(input_ids=[1] * 10, max_new_tokens=limit - 9, draft=draft)
    with pytest.raises(CacheCapacityError):
        rt.generate(input_ids=[[1], [1] * (limit - 2)], max_new_tokens=3, draft=draft)


def test_exactly_at_the_position_limit_works(rt):
    limit = rt.config.max_position_embeddings
    out = rt.generate(input_ids=[1] * (limit - 3), max_new_tokens=3, draft="chain")
    assert len(out.token_ids) == 3


def test_errors_are_runtime_errors():
    for error in (GenerationSettingsError, NoMTPModulesError, CacheCapacityError):
        assert issubclass(error, MTPRuntimeError)
