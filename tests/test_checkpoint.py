"""Tests of checkpoint.py: HF-layout save/load round trips, renaming, FP8 and error reporting."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_runtime.checkpoint import (
    CheckpointFiles, dequantize_fp8, load_state_dict, quantize_fp8, save_checkpoint, weight_block_size,
)
from mtp_runtime.errors import CheckpointError

N_LAYERS = 2
E, I, H, V = 4, 8, 16, 32


def _moe(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.mlp.gate.weight": torch.randn(E, H, generator=gen),
        f"{prefix}.mlp.gate.e_score_correction_bias": torch.randn(E, generator=gen),
        f"{prefix}.mlp.experts.gate_proj": torch.randn(E, I, H, generator=gen),
        f"{prefix}.mlp.experts.up_proj": torch.randn(E, I, H, generator=gen),
        f"{prefix}.mlp.experts.down_proj": torch.randn(E, H, I, generator=gen),
        f"{prefix}.mlp.shared_experts.gate_proj.weight": torch.randn(I, H, generator=gen),
    }


def _attn(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.input_layernorm.weight": torch.randn(H, generator=gen),
        f"{prefix}.self_attn.q_a_proj.weight": torch.randn(12, H, generator=gen),
        f"{prefix}.self_attn.q_a_layernorm.weight": torch.randn(12, generator=gen),
        f"{prefix}.self_attn.kv_a_proj_with_mqa.weight": torch.randn(10, H, generator=gen),
    }


def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=gen),
        "model.norm.weight": torch.randn(H, generator=gen),
        "lm_head.weight": torch.randn(V, H, generator=gen),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(20, H, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(20, H, generator=gen),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, 20, generator=gen),
        "mtp.0.enorm.weight": torch.randn(H, generator=gen),
        "mtp.0.hnorm.weight": torch.randn(H, generator=gen),
        "mtp.0.eh_proj.weight": torch.randn(H, 2 * H, generator=gen),
        "mtp.0.shared_head.norm.weight": torch.randn(H, generator=gen),
    }
    for prefix in ("model.layers.0", "model.layers.1", "mtp.0"):
        sd.update(_attn(prefix, gen))
    for prefix in ("model.layers.1", "mtp.0"):
        sd.update(_moe(prefix, gen))
    return sd


def expected_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {name: (t.shape, t.dtype) for name, t in sd.items()}


def raw_dtypes(folder) -> dict[str, torch.dtype]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name).dtype for name in handle.keys()})
    return out


def load(folder, sd, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return load_state_dict(CheckpointFiles(folder), expected_of(sd), N_LAYERS, **kwargs)


def assert_equal_dicts(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name].float(), want[name].float(), msg=name)


def test_round_trip_single_file_per_expert(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {"model_type": "deepseek_v3"}, sd, N_LAYERS)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "deepseek_v3"}
    raw = CheckpointFiles(tmp_path).raw_names()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in raw
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in raw
    assert "model.layers.2.enorm.weight" in raw and not any(n.startswith("mtp.") for n in raw)
    assert_equal_dicts(load(tmp_path, sd), sd)


def test_dtype_conversion_keeps_bias_fp32(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    got = load(tmp_path, sd, dtype=torch.bfloat16)
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert got["mtp.0.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert got["model.layers.1.mlp.experts.gate_proj"].dtype == torch.bfloat16
    assert got["model.norm.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["mtp.0.mlp.experts.down_proj"], sd["mtp.0.mlp.experts.down_proj"].bfloat16())


def test_round_trip_sharded(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, max_shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    files = CheckpointFiles(tmp_path)
    assert len(files.files) == len(shards)
    assert_equal_dicts(load(tmp_path, sd), sd)


def test_round_trip_fused_experts(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, fused_experts=True)
    files = CheckpointFiles(tmp_path)
    raw = files.raw_names()
    assert files.entry("model.layers.1.mlp.experts.gate_up_proj").shape == (E, 2 * I, H)
    assert files.entry("model.layers.2.mlp.experts.down_proj").shape == (E, H, I)
    assert not any(".experts.0." in n for n in raw)
    assert_equal_dicts(load(tmp_path, sd), sd)


def test_fused_experts_sharded_across_files(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, max_shard_bytes=700)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards_of_layer1 = {f for n, f in index["weight_map"].items() if "layers.1.mlp.experts." in n}
    assert len(shards_of_layer1) > 1
    assert_equal_dicts(load(tmp_path, sd), sd)


@pytest.mark.parametrize("block", [(128, 128), (4, 8), (5, 3)])
def test_round_trip_fp8(tmp_path, block):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {"a": 1}, sd, N_LAYERS, fp8=True, block_size=block)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "weight_block_size": list(block), "activation_scheme": "dynamic"}
    assert weight_block_size(config) == block
    dtypes = raw_dtypes(tmp_path)
    fp8 = torch.float8_e4m3fn
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
                 "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"):
        assert dtypes[name] == fp8, name
        assert dtypes[name + "_scale_inv"] == torch.float32
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.2.eh_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight", "model.norm.weight"):
        assert dtypes[name] == torch.float32, name
        assert name + "_scale_inv" not in dtypes
    got = load(tmp_path, sd, block_size=block)
    assert set(got) == set(sd)
    for name, want in sd.items():
        err = (got[name] - want).abs().max() / want.abs().max()
        assert err < 0.1, name
    assert (got["model.layers.0.self_attn.q_a_proj.weight"] != sd["model.layers.0.self_attn.q_a_proj.weight"]).any()


def test_fp8_quantize_dequantize_partial_blocks():
    w = torch.randn(13, 19) * torch.logspace(-2, 2, 19)
    q, scale = quantize_fp8(w, (4, 8))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 3)
    back = dequantize_fp8(q, scale, (4, 8))
    for r in range(0, 13, 4):
        for c in range(0, 19, 8):
            block, orig = back[r:r + 4, c:c + 8], w[r:r + 4, c:c + 8]
            assert (block - orig).abs().max() <= 0.07 * orig.abs().max()
    stacked = dequantize_fp8(torch.stack([q, q]), torch.stack([scale, scale]), (4, 8))
    torch.testing.assert_close(stacked[1], back)


def test_fp8_zero_block():
    q, scale = quantize_fp8(torch.zeros(3, 5), (128, 128))
    assert torch.equal(dequantize_fp8(q, scale, (128, 128)), torch.zeros(3, 5))


def test_fp8_block_size_mismatch_is_reported(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, fp8=True, block_size=(4, 8))
    with pytest.raises(CheckpointError, match="wrong shape") as info:
        load(tmp_path, sd, block_size=(8, 8))
    assert "q_a_proj.weight_scale_inv: expected [2, 2]" in str(info.value)
    assert "unexpected" not in str(info.value)


def test_mtp_renaming_and_queries(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    files = CheckpointFiles(tmp_path)
    assert files.mtp_layer_count(N_LAYERS) == 1
    assert files.mtp_layer_count(3) == 0
    assert files.mtp_layer_count(1) == 2
    assert files.has_our_name("mtp.0.eh_proj.weight", N_LAYERS)
    assert files.has_our_name("mtp.0.mlp.experts.gate_proj", N_LAYERS)
    assert files.has_our_name("model.layers.1.mlp.experts.down_proj", N_LAYERS)
    assert not files.has_our_name("mtp.0.shared_head.head.weight", N_LAYERS)
    assert not files.has_our_name("mtp.1.eh_proj.weight", N_LAYERS)
    assert not files.has_our_name("model.layers.2.enorm.weight", N_LAYERS)
    assert files.has_our_name("model.layers.2.enorm.weight", 3)


def test_mtp_shared_head_and_embed_round_trip(tmp_path):
    sd = make_state_dict()
    sd["mtp.0.shared_head.head.weight"] = torch.randn(V, H)
    sd["mtp.0.embed_tokens.weight"] = torch.randn(V, H)
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, fp8=True)
    raw = CheckpointFiles(tmp_path).raw_names()
    assert {"model.layers.2.shared_head.head.weight", "model.layers.2.embed_tokens.weight"} <= raw
    assert CheckpointFiles(tmp_path).has_our_name("mtp.0.shared_head.head.weight", N_LAYERS)
    got = load(tmp_path, sd)
    assert torch.equal(got["mtp.0.shared_head.head.weight"], sd["mtp.0.shared_head.head.weight"])


def test_tied_lm_head(tmp_path):
    sd = make_state_dict()
    del sd["lm_head.weight"]
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    expected = expected_of(sd) | {"lm_head.weight": (torch.Size([V, H]), torch.float32)}
    got = load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32,
                          tie_word_embeddings=True)
    assert torch.equal(got["lm_head.weight"], sd["model.embed_tokens.weight"])
    del expected["model.embed_tokens.weight"]
    got = load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32,
                          tie_word_embeddings=True)
    assert "model.embed_tokens.weight" not in got
    assert torch.equal(got["lm_head.weight"], sd["model.embed_tokens.weight"])
    with pytest.raises(CheckpointError, match="1 missing"):
        load_state_dict(CheckpointFiles(tmp_path), expected_of(sd) | {"lm_head.weight": (torch.Size([V, H]),
                        torch.float32)}, N_LAYERS, dtype=torch.float32)


def test_tied_storage_is_saved(tmp_path):
    sd = make_state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    assert_equal_dicts(load(tmp_path, sd), sd)


def test_all_problems_reported_at_once(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    expected = expected_of(sd)
    expected["model.layers.0.self_attn.q_b_proj.weight"] = (torch.Size([4, 12]), torch.float32)
    expected["model.layers.0.self_attn.kv_b_proj.weight"] = (torch.Size([4, 12]), torch.float32)
    del expected["model.norm.weight"]
    expected["model.layers.0.self_attn.q_a_proj.weight"] = (torch.Size([11, H]), torch.float32)
    expected["model.layers.1.mlp.experts.up_proj"] = (torch.Size([6, I, H]), torch.float32)
    expected["mtp.0.mlp.experts.gate_proj"] = (torch.Size([3, I, H]), torch.float32)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"checkpoint {tmp_path} does not match the config: 2 missing [")
    assert "2 missing [model.layers.0.self_attn.q_b_proj.weight; model.layers.0.self_attn.kv_b_proj.weight]" in text
    assert "2 unexpected [" in text and "model.norm.weight" in text
    assert "model.layers.2.mlp.experts.3.gate_proj.weight" in text
    assert "1 wrong shape [" in text and "1 with missing experts [" in text
    assert "model.layers.0.self_attn.q_a_proj.weight: expected [11, 16], found [12, 16]" in text
    assert "model.layers.1.mlp.experts.up_proj: 2 of 6 experts absent (indices 4, 5)" in text


def test_unexpected_mtp_layers_listed_by_raw_name(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    trunk = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    with pytest.raises(CheckpointError) as info:
        load(tmp_path, trunk)
    text = str(info.value)
    assert "unexpected [" in text and "model.layers.2.enorm.weight (as mtp.0.enorm.weight)" in text
    assert " missing [" not in text


def test_fused_expert_wrong_shape(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, fused_experts=True)
    expected = expected_of(sd)
    expected["model.layers.1.mlp.experts.gate_proj"] = (torch.Size([E, I + 1, H]), torch.float32)
    expected["model.layers.1.mlp.experts.up_proj"] = (torch.Size([E, I + 1, H]), torch.float32)
    with pytest.raises(CheckpointError, match=r"1 wrong shape") as info:
        load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32)
    assert "gate_up_proj (gate_proj and up_proj stacked): expected [4, 18, 16], found [4, 16, 16]" in str(info.value)


def test_wrong_dtype_reported(tmp_path):
    sd = make_state_dict()
    sd["model.norm.weight"] = torch.arange(H)
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    expected = expected_of(sd)
    expected["model.norm.weight"] = (torch.Size([H]), torch.float32)
    with pytest.raises(CheckpointError, match="1 wrong dtype") as info:
        load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32)
    assert "model.norm.weight (for model.norm.weight): expected a floating type, found I64" in str(info.value)


def test_problem_lists_truncated(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    expected = expected_of(sd) | {f"extra.{i}.weight": (torch.Size([1]), torch.float32) for i in range(25)}
    with pytest.raises(CheckpointError) as info:
        load_state_dict(CheckpointFiles(tmp_path), expected, N_LAYERS, dtype=torch.float32)
    text = str(info.value)
    assert "25 missing [" in text and "\n" not in text
    assert sum(f"extra.{i}.weight" in text for i in range(25)) == 20
    assert "; and 5 more]" in text


def test_ignores_rotary_inv_freq(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, N_LAYERS)
    assert_equal_dicts(load(tmp_path, sd), sd)


def test_hub_style_fp8_per_expert_and_fused_gate_up(tmp_path):
    """A hand-written checkpoint: FP8 per-expert weights with their own scales next to a fused gate_up layer."""
    gen = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    raw = {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down}
    experts = {}
    for e in range(E):
        w = torch.randn(I, H, generator=gen)
        q, s = quantize_fp8(w, (128, 128))
        raw[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] = q
        raw[f"model.layers.1.mlp.experts.{e}.gate_proj.weight_scale_inv"] = s
        experts[e] = dequantize_fp8(q, s, (128, 128))
    save_file(raw, str(tmp_path / "model.safetensors"))
    expected = {
        "model.layers.0.mlp.experts.gate_proj": (torch.Size([E, I, H]), torch.float32),
        "model.layers.0.mlp.experts.up_proj": (torch.Size([E, I, H]), torch.float32),
        "model.layers.0.mlp.experts.down_proj": (torch.Size([E, H, I]), torch.float32),
        "model.layers.1.mlp.experts.gate_proj": (torch.Size([E, I, H]), torch.float32),
    }
    got = load_state_dict(CheckpointFiles(tmp_path), expected, 2, dtype=torch.float32)
    assert torch.equal(got["model.layers.0.mlp.experts.gate_proj"], gate_up[:, :I])
    assert torch.equal(got["model.layers.0.mlp.experts.up_proj"], gate_up[:, I:])
    assert torch.equal(got["model.layers.0.mlp.experts.down_proj"], down)
    assert torch.equal(got["model.layers.1.mlp.experts.gate_proj"], torch.stack([experts[e] for e in range(E)]))


def test_stale_shards_removed_on_resave(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, max_shard_bytes=4096)
    save_checkpoint(tmp_path, {}, sd, N_LAYERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="weights folder not found"):
        CheckpointFiles(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointFiles(tmp_path)


def test_truncated_file(tmp_path):
    save_checkpoint(tmp_path, {}, make_state_dict(), N_LAYERS)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        CheckpointFiles(tmp_path)


@pytest.mark.parametrize("payload", [b"\x01", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"\xff" * 16])
def test_garbage_header(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        CheckpointFiles(tmp_path)


def test_index_problems(tmp_path):
    sd = make_state_dict()
    save_checkpoint(tmp_path, {}, sd, N_LAYERS, max_shard_bytes=4096)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard} which is missing"):
        CheckpointFiles(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointFiles(tmp_path)
    index_path.write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointFiles(tmp_path)


def test_index_listing_absent_tensor(tmp_path):
    save_checkpoint(tmp_path, {}, make_state_dict(), N_LAYERS, max_shard_bytes=4096)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 tensor\\(s\\) it lists are in no shard"):
        CheckpointFiles(tmp_path)


def test_save_rejects_bad_inputs(tmp_path):
    sd = make_state_dict()
    bad = dict(sd)
    del bad["model.layers.1.mlp.experts.up_proj"]
    with pytest.raises(CheckpointError, match="needs gate_proj and up_proj"):
        save_checkpoint(tmp_path, {}, bad, N_LAYERS, fused_experts=True)
    bad = sd | {"model.layers.1.mlp.experts.down_proj": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match="must be 3-D"):
        save_checkpoint(tmp_path, {}, bad, N_LAYERS)
    with pytest.raises(CheckpointError, match="map to the raw name model.layers.2.enorm.weight"):
        save_checkpoint(tmp_path, {}, sd | {"model.layers.2.enorm.weight": torch.ones(H)}, N_LAYERS)
    with pytest.raises(CheckpointError, match="max_shard_bytes"):
        save_checkpoint(tmp_path, {}, sd, N_LAYERS, max_shard_bytes=0)


def test_weight_block_size_config():
    assert weight_block_size({}) == (128, 128)
    assert weight_block_size({"quantization_config": {"weight_block_size": [64, 32]}}) == (64, 32)
    with pytest.raises(CheckpointError):
        weight_block_size({"quantization_config": {"weight_block_size": [0]}})
