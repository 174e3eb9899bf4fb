"""Ours vs transformers' reference DeepseekV2/V3ForCausalLM: full-forward logits and greedy tokens, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from hf_fixtures import CASES, add_mtp_layers, copy_folder, hf_logits, max_abs_diff, random_ids

LOGITS_ATOL = 1e-4
NEW_TOKENS = 16
DRAFTS = ["chain", "tree", "dynamic"]
DEPTH = {"chain": 3, "tree": None, "dynamic": None}  # chain drafts 3 tokens, so multi-token commits can happen
PARTIAL_DAMPING = 0.04
"""Trunk damping at which bigram drafts are accepted at every length 0..depth (measured on these fixtures)."""


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, exactly `max_new_tokens` new ids."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def prompt_for(model, seed: int = 3) -> list[int]:
    return random_ids(model.config.vocab_size, batch=1, length=7, seed=seed)[0].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(hf_case, name):
    model, folder = hf_case(name)
    ids = random_ids(model.config.vocab_size)  # [2, 12]
    ours = mtp_runtime.load(folder).logits(ids)
    ref = hf_logits(model, ids)
    assert ours.shape == ref.shape
    assert max_abs_diff(ours, ref) <= LOGITS_ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_tokens_match_transformers(hf_case, name):
    model, folder = hf_case(name)
    prompt = prompt_for(model)
    ours = mtp_runtime.load(folder).generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids
    assert list(ours) == hf_greedy(model, prompt, NEW_TOKENS)


def test_logits_accept_lists_and_tensors(hf_case):
    model, folder = hf_case("v3_q_lora")
    rt = mtp_runtime.load(folder)
    ids = random_ids(model.config.vocab_size)
    batched = rt.logits(ids)
    assert max_abs_diff(rt.logits(ids.tolist()), batched) == 0.0
    single = rt.logits(ids[0].tolist())
    assert single.shape == (1, ids.shape[1], model.config.vocab_size)
    assert max_abs_diff(single[0], batched[0]) <= 1e-5


@pytest.mark.parametrize("name", ["v3_q_lora", "v2_greedy"])
def test_runtime_reports_checkpoint(hf_case, name):
    model, folder = hf_case(name)
    rt = mtp_runtime.load(folder)
    hf = model.config
    assert (rt.config.hidden_size, rt.config.num_hidden_layers) == (hf.hidden_size, hf.num_hidden_layers)
    assert (rt.config.kv_lora_rank, rt.config.q_lora_rank) == (hf.kv_lora_rank, hf.q_lora_rank)
    assert rt.tokenizer is None
    assert rt.num_mtp_modules == 0


def test_cache_bytes_are_the_latent_size(hf_case):
    model, folder = hf_case("v3_q_lora")
    rt = mtp_runtime.load(folder)
    c = model.config
    per_element_layer = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert rt.cache_bytes_per_token() in (2 * per_element_layer, 4 * per_element_layer)
    assert rt.cache_bytes_per_token() < rt.config.expanded_cache_bytes_per_token(4)


@pytest.mark.parametrize("name, num_layers, own_head", [("v3_q_lora", 1, False), ("v3_grouped", 2, True)])
def test_mtp_layers_load_without_changing_the_trunk(hf_case, tmp_path, name, num_layers, own_head):
    model, folder = hf_case(name)
    dst = copy_folder(folder, tmp_path / "mtp")
    added = add_mtp_layers(dst, num_layers, seed=11, own_head=own_head)
    assert f"model.layers.{model.config.num_hidden_layers + num_layers - 1}.eh_proj.weight" in added
    rt = mtp_runtime.load(dst)
    assert rt.num_mtp_modules == num_layers
    ids = random_ids(model.config.vocab_size)
    assert max_abs_diff(rt.logits(ids), hf_logits(model, ids)) <= LOGITS_ATOL
    prompt = prompt_for(model, seed=4)
    ours = rt.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids
    assert list(ours) == hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_speculative_greedy_is_lossless_with_random_drafters(hf_case, tmp_path, num_layers, draft):
    model, folder = hf_case("v3_grouped")
    dst = copy_folder(folder, tmp_path / "mtp")
    add_mtp_layers(dst, num_layers, seed=13, own_head=num_layers == 2)
    prompt = prompt_for(model, seed=5)
    rt = mtp_runtime.load(dst)
    ours = rt.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft=draft, num_draft_tokens=DEPTH[draft]).token_ids
    assert list(ours) == hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_speculative_greedy_is_lossless_when_drafts_partly_accepted(drafter_case, num_layers, draft):
    model, folder = drafter_case(PARTIAL_DAMPING, num_layers)
    rt = mtp_runtime.load(folder)
    histogram = {}
    for seed in (5, 6):
        prompt = prompt_for(model, seed=seed)
        result = rt.generate(input_ids=prompt, max_new_tokens=2 * NEW_TOKENS, draft=draft,
                             num_draft_tokens=DEPTH[draft])
        assert list(result.token_ids) == hf_greedy(model, prompt, 2 * NEW_TOKENS)
        for length, count in result.stats.accepted_length_histogram.items():
            histogram[length] = histogram.get(length, 0) + count
    assert histogram.get(0, 0) > 0 and max(histogram) >= 2, histogram


@pytest.mark.parametrize("draft", DRAFTS)
def test_drafts_that_agree_with_the_trunk_are_all_accepted(drafter_case, draft):
    model, folder = drafter_case(0.0, 2)
    prompt = prompt_for(model, seed=5)
    rt = mtp_runtime.load(folder)
    result = rt.generate(input_ids=prompt, max_new_tokens=2 * NEW_TOKENS, draft=draft, num_draft_tokens=DEPTH[draft])
    assert list(result.token_ids) == hf_greedy(model, prompt, 2 * NEW_TOKENS)
    assert 0 not in result.stats.accepted_length_histogram
    assert result.stats.mean_accepted_length > 2.0
