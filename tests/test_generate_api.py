"""Runtime.generate as a user calls it: statistics, streaming, batching, draft defaults and typed errors."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from builders import build_checkpoint, build_mostly_right
from helpers import check_stats
from mtp_runtime.errors import (CacheCapacityError, GenerationSettingsError, MTPRuntimeError, NoMTPModulesError)

PROMPTS = [[5], [17, 3, 44], [9, 9, 31, 2, 60, 12, 7]]


@pytest.fixture(scope="module")
def api_runtime(tmp_path_factory):
    return mtp_runtime.load(build_mostly_right(tmp_path_factory.mktemp("api"), num_mtp=2, seed=3), device="cpu")


@pytest.fixture(scope="module")
def rt_no_mtp(tmp_path_factory):
    return mtp_runtime.load(build_checkpoint(tmp_path_factory.mktemp("no_mtp"), num_mtp=0, seed=1), device="cpu")


# --- statistics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft, kw, nodes", [
    ("chain", dict(num_draft_tokens=3), 3),
    ("tree", dict(tree="3,2,1"), 3 + 6 + 6),
    ("tree", dict(tree=[[0], [1], [0, 0]]), 3),
    ("dynamic", dict(num_draft_tokens=6), 6),
])
def test_stats_are_consistent(api_runtime, draft, kw, nodes):
    out = api_runtime.generate(input_ids=PROMPTS, max_new_tokens=40, draft=draft, **kw)
    for result in out:
        assert len(result.token_ids) == 40
        assert result.stats.new_tokens == len(result.token_ids)
        check_stats(result.stats, nodes_per_step=nodes)
        assert result.stats.mean_accepted_length > 1.5


def test_plain_decoding_stats(api_runtime):
    out = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=10, draft="none")
    s = out.stats
    assert (s.steps, s.new_tokens, s.draft_steps, s.drafted_tokens) == (10, 10, 0, 0)
    assert s.mean_accepted_length == 1.0
    assert s.accepted_length_histogram == {} and s.acceptance_per_depth == []


def test_stats_to_dict_matches_properties(api_runtime):
    s = api_runtime.generate(input_ids=PROMPTS[2], max_new_tokens=20, draft="chain").stats
    d = s.to_dict()
    assert d["steps"] == s.steps and d["new_tokens"] == s.new_tokens
    assert d["mean_accepted_length"] == s.mean_accepted_length
    assert d["acceptance_per_depth"] == s.acceptance_per_depth
    assert sum(d["accepted_length_histogram"].values()) == s.draft_steps


# --- streaming and batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("draft", ["none", "chain", "tree", "dynamic"])
def test_stream_concatenates_to_the_non_streaming_result(api_runtime, draft):
    expected = api_runtime.generate(input_ids=PROMPTS, max_new_tokens=25, draft=draft)
    stream = api_runtime.generate(input_ids=PROMPTS, max_new_tokens=25, draft=draft, stream=True)
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


def test_single_stream_prompt(api_runtime):
    stream = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=9, draft="chain", stream=True)
    tokens = [t for chunk in stream for t in chunk.token_ids]
    assert len(stream.results) == 1 and stream.results[0].token_ids == tokens and len(tokens) == 9


def test_list_of_prompts_returns_a_list(api_runtime):
    one = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=4)
    assert isinstance(one, mtp_runtime.GenerationResult)
    assert one.prompt_token_ids == PROMPTS[1]
    many = api_runtime.generate(input_ids=PROMPTS, max_new_tokens=4)
    assert isinstance(many, list) and len(many) == len(PROMPTS)
    assert [r.prompt_token_ids for r in many] == PROMPTS
    single_batch = api_runtime.generate(input_ids=[PROMPTS[1]], max_new_tokens=4)
    assert isinstance(single_batch, list) and single_batch[0].token_ids == one.token_ids
    as_tensor = api_runtime.generate(input_ids=torch.tensor([PROMPTS[1]]), max_new_tokens=4)
    assert isinstance(as_tensor, list) and as_tensor[0].token_ids == one.token_ids


def test_module_level_generate_accepts_a_runtime(api_runtime):
    out = mtp_runtime.generate(None, model=api_runtime, input_ids=PROMPTS[1], max_new_tokens=5, draft="chain")
    assert out.token_ids == api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=5, draft="none").token_ids


# --- draft defaults -------------------------------------------------------------------------------------


def test_default_draft_is_auto_with_mtp_modules(api_runtime):
    default = api_runtime.generate(input_ids=PROMPTS[2], max_new_tokens=30)
    auto = api_runtime.generate(input_ids=PROMPTS[2], max_new_tokens=30, draft="auto")
    plain = api_runtime.generate(input_ids=PROMPTS[2], max_new_tokens=30, draft="none")
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
def test_bad_settings_raise_generation_settings_error(api_runtime, kwargs):
    kwargs = dict(dict(input_ids=PROMPTS[1], max_new_tokens=4), **kwargs)
    with pytest.raises(GenerationSettingsError):
        api_runtime.generate(**kwargs)


@pytest.mark.parametrize("input_ids", [[], [[1, 2], []], [1, 64], [[3], [-1]], [1, 2.0]],
                         ids=["empty", "empty_in_batch", "vocab", "negative", "float"])
def test_bad_prompts_raise_generation_settings_error(api_runtime, input_ids):
    with pytest.raises(GenerationSettingsError):
        api_runtime.generate(input_ids=input_ids, max_new_tokens=4)


def test_prompt_and_input_ids_are_exclusive(api_runtime):
    with pytest.raises(GenerationSettingsError):
        api_runtime.generate(max_new_tokens=4)


@pytest.mark.parametrize("draft", ["none", "chain", "dynamic"])
def test_too_long_raises_cache_capacity_error(api_runtime, draft):
    limit = api_runtime.config.max_position_embeddings
    with pytest.raises(CacheCapacityError):
        api_runtime.generate(input_ids=[1] * 10, max_new_tokens=limit - 9, draft=draft)
    with pytest.raises(CacheCapacityError):
        api_runtime.generate(input_ids=[[1], [1] * (limit - 2)], max_new_tokens=3, draft=draft)


def test_exactly_at_the_position_limit_works(api_runtime):
    limit = api_runtime.config.max_position_embeddings
    out = api_runtime.generate(input_ids=[1] * (limit - 3), max_new_tokens=3, draft="chain")
    assert len(out.token_ids) == 3


def test_errors_are_runtime_errors():
    for error in (GenerationSettingsError, NoMTPModulesError, CacheCapacityError):
        assert issubclass(error, MTPRuntimeError)


# --- argument kinds, the draft resolver, memory ---------------------------------------------------------


def test_token_ids_may_be_numpy_or_torch_integers(api_runtime):
    import numpy as np

    a, b = PROMPTS[1], PROMPTS[2]
    first, second = [o.token_ids for o in api_runtime.generate(input_ids=[a, b], max_new_tokens=6, draft="chain")]
    for ids, expected in ((np.array([a, a]), [first, first]), (torch.tensor([b, b]), [second, second]),
                          ([np.array(a), torch.tensor(b)], [first, second]),
                          ([[np.int64(t) for t in a], b], [first, second]), (np.array(a, dtype=np.int32), first)):
        out = api_runtime.generate(input_ids=ids, max_new_tokens=6, draft="chain")
        assert ([o.token_ids for o in out] if isinstance(out, list) else out.token_ids) == expected


def test_tree_argument_implies_draft_tree(api_runtime):
    implied = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=10, tree="2,1")
    explicit = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=10, draft="tree", tree="2,1")
    assert implied.token_ids == explicit.token_ids and implied.stats.drafted_tokens == explicit.stats.drafted_tokens
    assert implied.stats.drafted_tokens == 4 * implied.stats.draft_steps  # 2 + 2 nodes per step: the tree's


def test_topk_is_the_old_name_of_draft_topk(api_runtime):
    new = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=10, draft="dynamic", draft_topk=2)
    with pytest.warns(DeprecationWarning, match="draft_topk"):
        old = api_runtime.generate(input_ids=PROMPTS[1], max_new_tokens=10, draft="dynamic", topk=2)
    assert old.token_ids == new.token_ids and old.stats.drafted_tokens == new.stats.drafted_tokens


def test_the_cli_and_the_runtime_resolve_draft_defaults_alike():
    """One resolver (params.resolve_draft): what the CLI checks before loading is what the runtime runs."""
    from mtp_runtime.cli.common import NUM_DRAFT_TOKENS_HELP
    from mtp_runtime.params import AUTO_MAX_DEPTH, DEFAULT_CHAIN_TOKENS, DEFAULT_DRAFT_MODE, resolve_draft

    assert resolve_draft(None, None).mode == resolve_draft(None, 3).mode == DEFAULT_DRAFT_MODE == "auto"
    assert resolve_draft(None, 3).num_draft_tokens == AUTO_MAX_DEPTH
    assert resolve_draft("chain", 3).num_draft_tokens == DEFAULT_CHAIN_TOKENS
    assert (f"per step (default {DEFAULT_CHAIN_TOKENS})" in NUM_DRAFT_TOKENS_HELP
            and f"may choose (default {AUTO_MAX_DEPTH})" in NUM_DRAFT_TOKENS_HELP)  # --help says what runs
    assert resolve_draft(None, 0).mode == "none" and resolve_draft(None, 3, tree="2,1").mode == "tree"
    with pytest.raises(NoMTPModulesError):
        resolve_draft(None, 0, num_draft_tokens=2)  # asks to draft, on a checkpoint that cannot
    with pytest.raises(GenerationSettingsError, match="num_draft_tokens=20 is out of range for a chain"):
        resolve_draft(None, None, num_draft_tokens=20)


def test_memory_is_checked_before_anything_is_allocated(api_runtime, monkeypatch):
    from mtp_runtime import memory
    from mtp_runtime.errors import InsufficientMemoryError

    allocated = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)  # a 1 GiB machine
    monkeypatch.setattr("mtp_runtime.engine.LatentCache", lambda *a, **k: allocated.append(a))
    with pytest.raises(InsufficientMemoryError, match=r"needs at least [\d.]+ GiB .* 20000 sequence.* has 1\.0 GiB "
                                                      r"free; generate fewer prompts"):
        api_runtime.generate(input_ids=[[1, 2, 3]] * 20000, max_new_tokens=400, draft="chain")
    assert not allocated


def test_why_each_sequence_stopped_comes_from_the_engine(api_runtime):
    """StepOutput.finished names the reason; the runtime reports it unchanged."""
    from mtp_runtime.engine import Engine
    from mtp_runtime.params import GenerationRequest, resolve_draft

    plain = api_runtime.generate(input_ids=PROMPTS, max_new_tokens=12, draft="none")
    eos = plain[1].token_ids[4]
    request = GenerationRequest(max_new_tokens=12, draft=resolve_draft("chain", 2), eos_token_ids=(eos,))
    finished = {}
    for step in Engine(api_runtime.model, request).run(PROMPTS):
        finished.update(step.finished)
    assert finished[1] == "eos"
    for seq, result in enumerate(api_runtime.generate(input_ids=PROMPTS, max_new_tokens=12, draft="chain",
                                                      eos_token_id=eos)):
        assert result.finish_reason == finished[seq] == ("eos" if eos in plain[seq].token_ids else "length")
