"""One model saved in every supported layout loads to the same logits; broken folders fail with named errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import mtp_runtime
from hf_fixtures import (
    INDEX_NAME, copy_folder, hf_logits, max_abs_diff, random_ids, read_config, read_tensors, resave, weight_files,
    write_config, write_tensors,
)
from mtp_runtime.errors import CheckpointError, ConfigError, MTPRuntimeError

LOSSLESS_ATOL = 1e-5
HF_ATOL = 1e-4
FP8_REL_BOUND = 0.5
SOURCES = ["v3_grouped", "v2_grouped"]


def logits_of(folder, ids):
    return mtp_runtime.load(folder).logits(ids)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- lossless layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded", "fused"])
@pytest.mark.parametrize("source", SOURCES)
def test_lossless_layouts_give_the_same_logits(hf_case, tmp_path, source, layout):
    model, folder = hf_case(source)
    ids = random_ids(model.config.vocab_size)
    dst = resave(folder, tmp_path / layout, layout)
    ours = logits_of(dst, ids)
    assert max_abs_diff(ours, logits_of(folder, ids)) <= LOSSLESS_ATOL
    assert max_abs_diff(ours, hf_logits(model, ids)) <= HF_ATOL


def test_sharded_fixture_has_three_shards_and_an_index(hf_case, tmp_path):
    _, folder = hf_case("v3_grouped")
    dst = resave(folder, tmp_path / "sharded", "sharded")
    assert (dst / INDEX_NAME).is_file()
    assert len(weight_files(dst)) >= 3
    assert not (dst / "model.safetensors").exists()


def test_fused_fixture_holds_3d_experts(hf_case, tmp_path):
    model, folder = hf_case("v3_grouped")
    tensors = read_tensors(resave(folder, tmp_path / "fused", "fused"))
    c = model.config
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (
        c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    assert not any(".mlp.experts.0." in k for k in tensors)


# ---- FP8 -----------------------------------------------------------------------------------


def test_fp8_fixture_is_block_quantized(fp8_case):
    tensors = read_tensors(fp8_case.fp8_folder)
    kv_b = tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    assert kv_b.dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"].shape == (2, 1)
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32


def test_fp8_matches_transformers_on_dequantized_weights(fp8_case):
    ids = random_ids(fp8_case.model.config.vocab_size)
    ours = logits_of(fp8_case.fp8_folder, ids)
    assert max_abs_diff(ours, hf_logits(fp8_case.dequantized_model, ids)) <= HF_ATOL


def test_fp8_stays_close_to_the_float_model(fp8_case):
    ids = random_ids(fp8_case.model.config.vocab_size)
    ours = logits_of(fp8_case.fp8_folder, ids)
    assert relative_error(ours, hf_logits(fp8_case.model, ids)) < FP8_REL_BOUND


def test_fp8_sharded_equals_fp8_single(fp8_case, tmp_path):
    ids = random_ids(fp8_case.model.config.vocab_size)
    dst = resave(fp8_case.fp8_folder, tmp_path / "fp8_sharded", "sharded")
    assert max_abs_diff(logits_of(dst, ids), logits_of(fp8_case.fp8_folder, ids)) <= LOSSLESS_ATOL


def test_fp8_weight_without_scale_is_named(fp8_case, tmp_path):
    dst = copy_folder(fp8_case.fp8_folder, tmp_path / "no_scale")
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    tensors = read_tensors(dst)
    del tensors[name]
    write_tensors(dst, tensors)
    with pytest.raises(CheckpointError, match="kv_b_proj"):
        mtp_runtime.load(dst)


# ---- broken weights ------------------------------------------------------------------------

MISSING = "model.layers.1.self_attn.kv_b_proj.weight"
EXTRA = "model.layers.0.self_attn.unexpected_proj.weight"
RESHAPED = "model.layers.1.post_attention_layernorm.weight"


@pytest.fixture
def single(hf_case, tmp_path):
    """A fresh per-expert single-file copy of the V3 model to break."""
    _, folder = hf_case("v3_grouped")
    return copy_folder(folder, tmp_path / "single")


@pytest.fixture
def sharded(hf_case, tmp_path):
    _, folder = hf_case("v3_grouped")
    return resave(folder, tmp_path / "sharded", "sharded")


def edit_tensors(folder, missing=False, extra=False, reshaped=False):
    tensors = read_tensors(folder)
    hidden = read_config(folder)["hidden_size"]
    if missing:
        del tensors[MISSING]
    if extra:
        tensors[EXTRA] = torch.zeros(4, hidden)
    if reshaped:
        tensors[RESHAPED] = torch.ones(hidden + 3)
    write_tensors(folder, tensors)


def load_error(folder, error=CheckpointError) -> str:
    with pytest.raises(error) as info:
        mtp_runtime.load(folder)
    assert isinstance(info.value, MTPRuntimeError)
    return str(info.value)


def test_missing_shard_file(sharded):
    victim = weight_files(sharded)[1]
    victim.unlink()
    assert victim.name in load_error(sharded)


def test_index_naming_a_missing_shard(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())
    index["weight_map"][MISSING] = "model-00009-of-00009.safetensors"
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    assert "model-00009-of-00009.safetensors" in load_error(sharded)


@pytest.mark.parametrize("edit, name", [("missing", MISSING), ("extra", EXTRA), ("reshaped", RESHAPED)])
def test_bad_tensor_is_named(single, edit, name):
    edit_tensors(single, **{edit: True})
    assert name in load_error(single)


def test_all_tensor_problems_in_one_error(single):
    edit_tensors(single, missing=True, extra=True, reshaped=True)
    message = load_error(single)
    assert all(name in message for name in (MISSING, EXTRA, RESHAPED)), message


def test_truncated_safetensors(single):
    path = single / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    load_error(single)


def test_garbage_header(single):
    garbage = b"\xff\xfe not a json header at all \x00\x01"
    (single / "model.safetensors").write_bytes(struct.pack("<Q", len(garbage)) + garbage)
    load_error(single)


def test_no_weight_files(single):
    (single / "model.safetensors").unlink()
    load_error(single)


# ---- broken config -------------------------------------------------------------------------


def test_config_not_json(single):
    (single / "config.json").write_text("{ this is not json")
    load_error(single, ConfigError)


def test_config_missing(single):
    (single / "config.json").unlink()
    load_error(single, ConfigError)


def test_config_missing_field_is_named(single):
    config = read_config(single)
    del config["kv_lora_rank"]
    write_config(single, config)
    assert "kv_lora_rank" in load_error(single, ConfigError)


def test_unsupported_model_type_is_named(single):
    config = read_config(single)
    config["model_type"] = "llama"
    write_config(single, config)
    assert "llama" in load_error(single, ConfigError)


def test_errors_share_one_base_class():
    assert issubclass(ConfigError, MTPRuntimeError) and issubclass(CheckpointError, MTPRuntimeError)
