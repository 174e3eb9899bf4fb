"""DeepSeek-V3.2 configs and checkpoints: the indexer fields, `mtp-runtime info`, and the one-line errors for bad
V3.2 input (no q_lora_rank, index_topk < 1, missing indexer tensors, compiled decoding, FP8 keys on V3)."""

from __future__ import annotations

import json

import pytest
import torch

import mtp_runtime
from builders import TINY_V3, TINY_V32, build_checkpoint
from hf_fixtures import read_config, read_tensors, write_config, write_tensors
from mtp_runtime.config import IndexerConfig, ModelConfig
from mtp_runtime.errors import CheckpointError, ConfigError
from test_cli import assert_one_line_error, run, run_json

V32 = dict(TINY_V3, **TINY_V32)


@pytest.fixture(scope="module")
def sparse_folder(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("v32"), num_mtp=1, **TINY_V32)


def test_the_indexer_fields_are_read():
    cfg = ModelConfig.from_dict(V32)
    assert cfg.indexer == IndexerConfig(n_heads=2, head_dim=8, topk=3)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", True)  # V3's defaults
    assert ModelConfig.from_dict(TINY_V3).indexer is None
    defaults = {k: v for k, v in V32.items() if not k.startswith("index_")}
    assert ModelConfig.from_dict(defaults).indexer == IndexerConfig(64, 128, 2048)  # transformers' defaults
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("edit, fragment", [
    (dict(index_topk=0), "index_topk=0"),
    (dict(index_topk=-5), "index_topk=-5"),
    (dict(index_n_heads="8"), "index_n_heads='8'"),
    (dict(index_head_dim=2), "index_head_dim must be at least qk_rope_head_dim"),
    (dict(q_lora_rank=None), "needs q_lora_rank"),
])
def test_bad_indexer_configs_are_one_line_errors(edit, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        ModelConfig.from_dict(dict(V32, **edit))
    assert "\n" not in str(info.value)


def test_a_v32_config_without_q_lora_rank_is_refused():
    raw = {k: v for k, v in V32.items() if k != "q_lora_rank"}
    with pytest.raises(ConfigError, match="required field.*q_lora_rank"):
        ModelConfig.from_dict(raw)


def _strip(folder, dst, keep):
    """A copy of folder whose tensors are those for which keep(name) holds."""
    dst.mkdir()
    write_config(dst, read_config(folder))
    write_tensors(dst, {k: v for k, v in read_tensors(folder).items() if keep(k)})
    return dst


def test_dense_weights_under_a_v32_config_say_what_is_wrong(sparse_folder, tmp_path):
    folder = _strip(sparse_folder, tmp_path / "dense", lambda name: ".indexer." not in name)
    with pytest.raises(CheckpointError, match="no indexer tensors.*deepseek_v3") as info:
        mtp_runtime.load(folder)
    assert "\n" not in str(info.value)
    assert_one_line_error(run("generate", "--model", folder, "x"), "no indexer tensors")


def test_some_missing_indexer_tensors_are_listed(sparse_folder, tmp_path):
    gone = "model.layers.1.self_attn.indexer.k_norm.bias"
    folder = _strip(sparse_folder, tmp_path / "partial", lambda name: name != gone)
    with pytest.raises(CheckpointError, match=f"1 missing \\[{gone}\\]") as info:
        mtp_runtime.load(folder)
    assert "\n" not in str(info.value)


def test_compiled_decoding_is_refused_for_sparse_attention(sparse_folder):
    with pytest.raises(ConfigError, match="not implemented for deepseek_v32"):
        mtp_runtime.load(sparse_folder, compile=True)


def test_fp8_indexer_keys_are_refused_for_dense_models(tmp_path):
    with pytest.raises(ConfigError, match="index_keys_fp8 applies to sparse-attention models"):
        mtp_runtime.load(build_checkpoint(tmp_path, num_mtp=0), index_keys_fp8=True)


def test_weights_proj_stays_float32_in_bfloat16(sparse_folder):
    rt = mtp_runtime.load(sparse_folder, dtype="bfloat16")
    indexer = rt.model.model.layers[0].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32 and indexer.wk.weight.dtype == torch.bfloat16
    out = rt.generate(input_ids=list(range(1, 12)), max_new_tokens=6, draft="chain", num_draft_tokens=2)
    assert len(out.token_ids) == 6


def test_info_shows_the_indexer_and_its_key_cache(sparse_folder):
    summary = run_json("info", sparse_folder)
    rt = mtp_runtime.load(sparse_folder)
    state = rt.model.state_dict()
    assert summary["parameters"]["total"] == sum(v.numel() for k, v in state.items() if not k.startswith("mtp."))
    assert summary["parameters"]["mtp_total"] == sum(v.numel() for k, v in state.items() if k.startswith("mtp."))
    cache = summary["cache_bytes_per_token"]
    assert cache["index_keys"] == 2 * 8 * 2 and cache["index_keys_fp8"] == 2 * (8 + 4)
    assert cache["total"] == cache["latent"] + cache["index_keys"]
    text = run("info", sparse_folder)
    assert text.exit_code == 0
    assert "top 3 keys" in text.stdout and "indexer keys" in text.stdout


def test_info_on_the_published_deepseek_v32_config(tmp_path):
    """DeepSeek-V3.2-Exp: V3's 671B plus 61 indexers of ~14M parameters; 128 B of indexer keys per token and layer
    in bf16, 132 B in FP8."""
    config = dict(
        model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840,
        index_n_heads=64, index_head_dim=128, index_topk=2048, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096})
    (tmp_path / "config.json").write_text(json.dumps(config))
    summary = run_json("info", tmp_path)
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    assert summary["indexer"]["parameters_per_layer"] == per_layer
    assert round(summary["parameters"]["total"] / 1e9) == 672
    cache = summary["cache_bytes_per_token"]
    assert (cache["latent"], cache["index_keys"], cache["index_keys_fp8"]) == (61 * 576 * 2, 61 * 256, 61 * 132)
