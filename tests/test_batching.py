"""Continuous batching (mtp_runtime.batching): sequences that join a running batch between its steps, and leave it,
decode exactly what plain greedy decoding of each prompt alone decodes, for every draft mode.

draft='auto' picks each step's chain depth from measured step times; here its choice is scripted (a fixed cycle
of depths, plain steps included), so that joins meet every case: deferred MTP slots on one side only or on both,
chains of different depths, and a tree on one side only.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from builders import build_model
from mtp_runtime import Runtime
from mtp_runtime.auto_draft import AutoDraft
from mtp_runtime import batching
from mtp_runtime.batching import combine
from mtp_runtime.engine import Engine
from mtp_runtime.params import DraftParams, GenerationRequest
from mtp_runtime.sampling import SamplingParams

NEW_TOKENS = 20
PROMPTS = [[5], [17, 3, 44], [9, 9, 31, 2, 60, 12, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [33, 8], [60] * 5]
JOIN_AT = [0, 0, 1, 3, 4, 9]
"""Decoding step at which each prompt joins (two at the start, then one by one, the last after rows have left)."""
LIMITS = [20, 7, 20, 12, 3, 15]
"""Tokens each sequence may generate (rows leave at different steps)."""
AUTO_DEPTHS = [0, 0, 2, 0, 0, 0, 1, 3, 0, 4, 0, 0, 2]

DRAFTS = {
    "none": dict(mode="none"),
    "chain3": dict(mode="chain", num_draft_tokens=3),
    "tree321": dict(mode="tree", tree="3,2,1"),
    "dynamic": dict(mode="dynamic", num_draft_tokens=6, depth=3, topk=2),
    "auto": dict(mode="auto"),
}


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime(build_model(num_mtp=2, seed=3, context_scale=0.01, norm_std=0.0, eh_noise=0.0))


@pytest.fixture(scope="module")
def alone(rt) -> list[list[int]]:
    """Plain greedy decoding of each prompt on its own."""
    return [rt.generate(input_ids=p, max_new_tokens=n, draft="none", ignore_eos=True).token_ids
            for p, n in zip(PROMPTS, LIMITS)]


def scripted_auto(monkeypatch) -> None:
    depths = itertools.cycle(AUTO_DEPTHS)
    monkeypatch.setattr(AutoDraft, "choose", lambda self, batch: next(depths))


def decode_with_joins(rt: Runtime, draft: dict, sampling: SamplingParams = SamplingParams()):
    """Decode PROMPTS through one engine, prompt i joining the running batch at step JOIN_AT[i]; row limits by
    a stop checker (each row's LIMITS). Returns each prompt's tokens and the rows stepped, summed over steps."""
    out: list[list[int]] = [[] for _ in PROMPTS]
    order: list[int] = []  # prompt of each sequence id of the running batch
    joining: list[int] = []
    checking_join = False  # the stop checker is asked about the joining batch's rows (ids of `joining`)

    def stop(seq: int, tokens: list[int]) -> int | None:
        limit = LIMITS[joining[seq] if checking_join else order[seq]]
        return limit if len(tokens) >= limit else None

    request = GenerationRequest(max_new_tokens=NEW_TOKENS, sampling=sampling, draft=DraftParams.build(**draft))
    engine = Engine(rt.model, request, stop, forwards=rt.forwards, step_costs=rt.step_costs)
    batch, step, row_steps = None, 0, 0
    with torch.inference_mode():
        while step <= max(JOIN_AT) or batch.seq_ids.numel():
            joining = [i for i, at in enumerate(JOIN_AT) if at == step]
            if joining:
                checking_join = True
                new, first = engine.prefill([PROMPTS[i] for i in joining])
                for seq, tokens in first.new_tokens.items():
                    out[joining[seq]] += tokens
                checking_join = False
                old = [] if batch is None else batch.seq_ids.tolist()
                parts = ([] if batch is None else [(batch, old)]) + [(new, new.seq_ids.tolist())]
                batch = combine(engine.drafter, parts)
                order = [order[s] for s in old] + [joining[s] for s in new.seq_ids.tolist()]
            if batch.seq_ids.numel():
                row_steps += batch.seq_ids.numel()
                result = engine.step(batch)
                for seq, tokens in result.new_tokens.items():
                    out[order[seq]] += tokens
            step += 1
    return out, row_steps


@pytest.mark.parametrize("name", DRAFTS)
def test_joining_and_leaving_rows_decode_what_each_prompt_alone_decodes(rt, alone, name, monkeypatch):
    scripted_auto(monkeypatch)
    merges = Counter()
    monkeypatch.setattr(batching, "append_deferred", counting(merges, "appended", batching.append_deferred))
    monkeypatch.setattr(batching, "_first_nodes", counting(merges, "cut", batching._first_nodes))
    out, row_steps = decode_with_joins(rt, DRAFTS[name])
    assert out == alone
    if name != "none":  # drafts were accepted: fewer row-steps than tokens after the first of each row
        assert row_steps < sum(LIMITS) - len(LIMITS)
    if name == "auto":  # joins met deferred slots on one side and chains of different depths
        assert merges["appended"] and merges["cut"], merges


def counting(counter: Counter, key: str, function):
    def wrapper(*args):
        counter[key] += 1
        return function(*args)

    return wrapper


def test_dropping_rows_between_steps_keeps_the_others_exact(rt, alone, monkeypatch):
    """A sequence removed before a step (a cancelled request) leaves the others' output unchanged."""
    scripted_auto(monkeypatch)
    request = GenerationRequest(max_new_tokens=NEW_TOKENS, draft=DraftParams.build("auto"))
    engine = Engine(rt.model, request, forwards=rt.forwards, step_costs=rt.step_costs)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    out = {0: [], 1: [], 2: []}
    with torch.inference_mode():
        batch, first = engine.prefill(prompts)
        order = [0, 1, 2]
        for step in range(NEW_TOKENS):
            if step == 4:  # sequence 1 leaves
                batch = combine(engine.drafter, [(batch, [0, 2])])
                order = [0, 2]
            if not batch.seq_ids.numel():
                break
            for seq, tokens in engine.step(batch).new_tokens.items():
                out[order[seq]] += tokens
    for seq, tokens in first.new_tokens.items():
        out[seq] = tokens + out[seq]
    full = rt.generate(input_ids=[PROMPTS[0], PROMPTS[3]], max_new_tokens=NEW_TOKENS, draft="none", ignore_eos=True)
    assert [out[0], out[2]] == [r.token_ids for r in full]


def test_sampled_rows_join_and_finish(rt, monkeypatch):
    """Under sampling, merged trees carry their draft distributions; every row still ends at its limit."""
    scripted_auto(monkeypatch)
    for name in ("auto", "chain3", "dynamic"):
        out, _ = decode_with_joins(rt, DRAFTS[name], SamplingParams(temperature=1.0, seed=0))
        assert [len(tokens) for tokens in out] == LIMITS
