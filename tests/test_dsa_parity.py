"""DeepSeek-V3.2 (sparse attention) vs transformers' DeepseekV32ForCausalLM: logits, greedy tokens, layouts, and
speculative greedy decoding, fp32 on CPU. Every fixture's index_topk is below the sequence lengths, so the
indexer's selection decides the output (checked: the same weights attended densely give other logits)."""

from __future__ import annotations

import pytest
import torch

import mtp_runtime
from hf_fixtures import (
    V32_CASES, add_mtp_layers, copy_folder, hf_logits, load_reference, max_abs_diff, random_ids, read_config,
    resave, write_config, write_dequantized,
)
from test_parity_hf import DEPTH, DRAFTS, LOGITS_ATOL, NEW_TOKENS, hf_greedy, prompt_for

SELECTION_EFFECT = 1e-2
"""Attending to every key instead of the selected ones moves the logits by at least this much on these fixtures."""
V32_PARTIAL_DAMPING = 0.04
"""Trunk damping at which the bigram drafters are accepted at lengths 0 and >= 2 on the V3.2 fixture."""


@pytest.mark.parametrize("name", list(V32_CASES))
def test_logits_match_transformers(hf_case, name):
    model, folder = hf_case(name)
    ids = random_ids(model.config.vocab_size)  # [2, 12]
    ours = mtp_runtime.load(folder).logits(ids)
    assert max_abs_diff(ours, hf_logits(model, ids)) <= LOGITS_ATOL


@pytest.mark.parametrize("name", list(V32_CASES))
def test_greedy_tokens_match_transformers(hf_case, name):
    model, folder = hf_case(name)
    prompt = prompt_for(model)
    ours = mtp_runtime.load(folder).generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids
    assert list(ours) == hf_greedy(model, prompt, NEW_TOKENS)


def test_the_selection_matters(hf_case, tmp_path):
    """Power check: with index_topk above the sequence length (dense attention) the logits are far from the
    reference's, so the parity above really tests the selection."""
    model, folder = hf_case("v32")
    dense = copy_folder(folder, tmp_path / "dense")
    config = read_config(dense)
    config["index_topk"] = 1024
    write_config(dense, config)
    ids = random_ids(model.config.vocab_size)
    assert max_abs_diff(mtp_runtime.load(dense).logits(ids), hf_logits(model, ids)) > SELECTION_EFFECT


@pytest.mark.parametrize("layout", ["sharded", "fused"])
def test_layouts_match_transformers(hf_case, tmp_path, layout):
    model, folder = hf_case("v32_grouped_yarn")
    rt = mtp_runtime.load(resave(folder, tmp_path / layout, layout))
    ids = random_ids(model.config.vocab_size)
    assert max_abs_diff(rt.logits(ids), hf_logits(model, ids)) <= LOGITS_ATOL
    prompt = prompt_for(model)
    assert list(rt.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids) == \
        hf_greedy(model, prompt, NEW_TOKENS)


def test_fp8_matches_transformers_on_the_dequantized_weights(hf_case, tmp_path):
    """FP8 block-scaled weights (the indexer's wq_b and wk included, weights_proj kept float as DeepSeek does)."""
    model, folder = hf_case("v32")
    fp8 = resave(folder, tmp_path / "fp8", "fp8")
    assert "model.layers.0.self_attn.indexer.wk.weight_scale_inv" in _raw_names(fp8)
    assert "model.layers.0.self_attn.indexer.weights_proj.weight_scale_inv" not in _raw_names(fp8)
    reference = load_reference(write_dequantized(fp8, tmp_path / "dequantized"), "v32")
    ids = random_ids(model.config.vocab_size)
    assert max_abs_diff(mtp_runtime.load(fp8).logits(ids), hf_logits(reference, ids)) <= LOGITS_ATOL


@pytest.mark.parametrize("num_layers, own_head", [(1, False), (2, True)])
def test_mtp_layers_with_indexers_load_without_changing_the_trunk(hf_case, tmp_path, num_layers, own_head):
    model, folder = hf_case("v32")
    dst = copy_folder(folder, tmp_path / "mtp")
    added = add_mtp_layers(dst, num_layers, seed=11, own_head=own_head)
    assert f"model.layers.{model.config.num_hidden_layers}.self_attn.indexer.wq_b.weight" in added
    rt = mtp_runtime.load(dst)
    assert rt.num_mtp_modules == num_layers
    ids = random_ids(model.config.vocab_size)
    assert max_abs_diff(rt.logits(ids), hf_logits(model, ids)) <= LOGITS_ATOL
    prompt = prompt_for(model, seed=4)
    assert list(rt.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids) == \
        hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("draft", DRAFTS)
def test_speculative_greedy_is_lossless_with_random_drafters(hf_case, tmp_path, draft):
    model, folder = hf_case("v32_grouped_yarn")
    dst = copy_folder(folder, tmp_path / "mtp")
    add_mtp_layers(dst, 2, seed=13, own_head=True)
    prompt = prompt_for(model, seed=5)
    rt = mtp_runtime.load(dst)
    ours = rt.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, draft=draft, num_draft_tokens=DEPTH[draft])
    assert list(ours.token_ids) == hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("draft", DRAFTS)
def test_speculative_greedy_is_lossless_when_drafts_partly_accepted(drafter_case, draft):
    model, folder = drafter_case(V32_PARTIAL_DAMPING, 2, case="v32")
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


@pytest.mark.parametrize("draft", ["chain", "tree"])
def test_batched_ragged_speculative_greedy_equals_transformers(drafter_case, draft):
    """A batch of prompts of different lengths (rows finish and are dropped at different steps)."""
    model, folder = drafter_case(V32_PARTIAL_DAMPING, 2, case="v32")
    prompts = [random_ids(model.config.vocab_size, batch=1, length=length, seed=20 + length)[0].tolist()
               for length in (3, 9, 6)]
    results = mtp_runtime.load(folder).generate(input_ids=prompts, max_new_tokens=NEW_TOKENS, draft=draft,
                                                num_draft_tokens=DEPTH[draft])
    for prompt, result in zip(prompts, results):
        assert list(result.token_ids) == hf_greedy(model, prompt, NEW_TOKENS)
    assert any(result.stats.mean_accepted_length > 1.0 for result in results)


def _raw_names(folder) -> set[str]:
    from mtp_runtime.checkpoint import CheckpointFiles

    return CheckpointFiles(folder).raw_names()


@torch.no_grad()
def test_runtime_counts_the_indexer_key_cache(hf_case):
    model, folder = hf_case("v32")
    rt = mtp_runtime.load(folder)
    c = model.config
    latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert rt.cache_bytes_per_token() == latent + c.num_hidden_layers * c.index_head_dim * 4
    fp8 = mtp_runtime.load(folder, index_keys_fp8=True)
    assert fp8.cache_bytes_per_token() == latent + c.num_hidden_layers * (c.index_head_dim + 4)
