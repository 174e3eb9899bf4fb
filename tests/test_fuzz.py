"""Fuzzing the loaders (malformed safetensors files, shard indexes and config.json files) and the arguments of
generate() and load() (values of every type).

Every outcome must be a success or a clean typed error: ConfigError or CheckpointError whose first line names
the file (or folder) at fault; a ConfigError is one line. Never a raw KeyError, TypeError, struct.error,
SafetensorError, UnicodeDecodeError, RecursionError, OverflowError, hang or crash. The entry points are the
public ones: ModelConfig.from_file, CheckpointFiles + load_state_dict, and Runtime.from_folder. Inputs are
random bytes, random JSON, and structured mutations of a valid tiny checkpoint; the regressions at the end are
the inputs that once escaped as raw exceptions. Every test is derandomized.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mtp_runtime
from builders import build_model
from mtp_runtime.checkpoint import CheckpointFiles, load_state_dict, quantize_fp8, save_checkpoint
from mtp_runtime.config import ModelConfig
from mtp_runtime.errors import CheckpointError, ConfigError, MTPRuntimeError
from mtp_runtime.runtime import Runtime

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
SLOW_FUZZ = settings(max_examples=200, deadline=None, derandomize=True)

INDEX = "model.safetensors.index.json"
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
        "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
        "U64": 64, "F64": 64, "C64": 64}
"""Every dtype safetensors 0.8 parses, with its size in bits."""
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@dataclass(repr=False)
class Base:
    """A valid tiny checkpoint (one file and a sharded copy) and folders the tests overwrite files in."""

    folder: Path
    config: dict
    header: dict
    data: bytes
    sharded: Path
    index: dict
    work: Path
    work_sharded: Path
    small: Path

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"Base({self.folder.parent})"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = build_model(num_mtp=1, seed=0)
    config = model.config.to_hf_dict()
    save_checkpoint(tmp / "base", config, model.state_dict(), 2)
    save_checkpoint(tmp / "sharded", config, model.state_dict(), 2, max_shard_bytes=60_000)
    raw = (tmp / "base" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    shutil.copytree(tmp / "base", tmp / "work")
    shutil.copytree(tmp / "sharded", tmp / "work_sharded")
    (tmp / "small").mkdir()
    return Base(folder=tmp / "base", config=json.loads((tmp / "base" / "config.json").read_text()),
                header=json.loads(raw[8: 8 + n]), data=raw[8 + n:], sharded=tmp / "sharded",
                index=json.loads((tmp / "sharded" / INDEX).read_text()), work=tmp / "work",
                work_sharded=tmp / "work_sharded", small=tmp / "small")


def outcome(call, names: tuple[str, ...]) -> str:
    """Run call(); 'ok', or the name of the clean error it raised (anything else propagates and fails the test)."""
    try:
        call()
    except (ConfigError, CheckpointError) as error:
        message = str(error)
        first = message.splitlines()[0] if message else ""
        assert any(name in first for name in names), f"the message does not name the file: {message!r}"
        if isinstance(error, ConfigError):
            assert "\n" not in message, f"a ConfigError must be one line: {message!r}"
        else:  # CheckpointError: a one-line summary, then one indented line per problem
            assert all(line.startswith("  ") for line in message.splitlines()[1:]), message
        return type(error).__name__
    return "ok"


def load_folder(folder: Path) -> str:
    """Runtime.from_folder, then one forward when it loads (a config that passes must also run)."""

    def call():
        runtime = Runtime.from_folder(folder, device="cpu")
        runtime.logits([[1, 2, 3]])

    return outcome(call, (str(folder), "config.json"))


# ---------------------------------------------------------------------------- JSON garbage

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from([0, -1, 1, 2, 3, 2**20 + 1, 2**31, 2**63, 10**30, 10**400, 1e308, "7", "", "silu", "yarn"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def dumps(value) -> bytes:
    """JSON text as Python writes it (NaN and Infinity included, which json.loads reads back)."""
    return json.dumps(value).encode()


# ---------------------------------------------------------------------------- config.json

CONFIG_KEYS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "attention_bias", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "topk_method",
    "scoring_func", "norm_topk_prob", "routed_scaling_factor", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "num_nextn_predict_layers", "num_mtp_layers", "bos_token_id", "eos_token_id", "rope_theta", "rope_interleave",
    "rope_parameters", "rope_scaling", "quantization_config",
] + [f"rope_parameters.{key}" for key in YARN] + ["rope_parameters.type", "rope_parameters.attention_factor",
                                                  "rope_parameters.truncate", "quantization_config.weight_block_size"]


@st.composite
def mutated_configs(draw, config: dict) -> dict:
    """The valid config (default or YaRN rope) with 1-3 fields deleted or set to garbage."""
    config = copy.deepcopy(config)
    if draw(st.booleans()):
        config["rope_parameters"] = dict(YARN)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS))
        outer, _, inner = key.partition(".")
        target = config
        if inner:
            if not isinstance(config.get(outer), dict):
                config[outer] = {}
            target, key = config[outer], inner
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(json_values)
    return config


@FUZZ
@given(st.binary(max_size=300))
def test_config_random_bytes(base, blob):
    path = base.small / "config.json"
    path.write_bytes(blob)
    event(outcome(lambda: ModelConfig.from_file(path), (str(path),)))


@FUZZ
@given(json_values)
def test_config_random_json(base, value):
    path = base.small / "config.json"
    path.write_bytes(dumps(value))
    event(outcome(lambda: ModelConfig.from_file(path), (str(path),)))


@SLOW_FUZZ
@given(st.data())
def test_config_mutated_fields(base, data):
    config = data.draw(mutated_configs(base.config))
    (base.work / "config.json").write_bytes(dumps(config))
    outcome(lambda: ModelConfig.from_file(base.work / "config.json"), (str(base.work),))
    event(load_folder(base.work))


def test_config_mutations_each_field_alone(base):
    """Every field deleted, then set to each hand-picked bad value: all rejected (or harmless), all clean."""
    bad_values = [None, "7", -1, 0, 2**31, 10**30, 1.5, True, [], {"a": 1}, float("nan"), float("inf")]
    counts: dict[str, int] = {}
    for key in CONFIG_KEYS:
        outer, _, inner = key.partition(".")
        for value in ["<delete>"] + bad_values:
            config = copy.deepcopy(base.config)
            if inner:
                config[outer] = dict(YARN)
                target, name = config[outer], inner
            else:
                target, name = config, key
            if value == "<delete>":
                target.pop(name, None)
            else:
                target[name] = value
            (base.work / "config.json").write_bytes(dumps(config))
            result = load_folder(base.work)
            counts[result] = counts.get(result, 0) + 1
    assert counts.get("ConfigError", 0) > 200, counts  # the bad values are mostly caught by the config itself


# ---------------------------------------------------------------------------- safetensors files

@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_safetensors_random_bytes(base, blob, with_length):
    """Random bytes, or random bytes behind a length field that matches them."""
    if with_length:
        blob = struct.pack("<Q", len(blob)) + blob
    (base.work / "config.json").write_bytes(dumps(base.config))
    (base.work / "model.safetensors").write_bytes(blob)
    outcome(lambda: CheckpointFiles(base.work), (str(base.work),))
    event(load_folder(base.work))


@st.composite
def mutated_safetensors(draw, header: dict, data: bytes) -> bytes:
    """The valid file with its header entries, length field, encoding or data mutated."""
    header = copy.deepcopy(header)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "entry", "drop", "metadata", "rename",
                                     "resize"]))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(sorted(BITS) + ["Q4", "", "f32", "F8"]) | json_values)
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 2**64), max_size=4) | json_values)
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-2, len(data) + 8), max_size=3) | json_values)
        elif kind == "overlap":
            other = header.get(draw(st.sampled_from(names)))
            entry["data_offsets"] = other.get("data_offsets") if isinstance(other, dict) else [0, 4]
        elif kind == "entry":
            header[name] = draw(json_values)
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "rename":
            header[draw(st.text(max_size=20))] = header.pop(name)
        elif isinstance(entry.get("shape"), list) and entry["shape"] and entry.get("dtype") == "F32":
            # same bytes, another dtype: a header safetensors accepts but the config does not
            width = {"F16": 2, "BF16": 2, "U8": 4, "I8": 4, "F8_E4M3": 4, "F4": 8, "I32": 1, "U32": 1}
            dtype = draw(st.sampled_from(sorted(width)))
            entry["dtype"], entry["shape"] = dtype, [*entry["shape"][:-1], entry["shape"][-1] * width[dtype]]
    text = dumps(header)
    if draw(st.booleans()):  # non-UTF-8 bytes somewhere in the header
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"])) + text[at:]
    length = draw(st.sampled_from(["exact", "exact", "exact", "off", "huge", "random"]))
    size = {"exact": len(text), "off": max(0, len(text) + draw(st.integers(-8, 8))), "huge": 2**63,
            "random": draw(st.integers(0, 2**64 - 1))}[length]
    body = data
    if draw(st.booleans()):
        body = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return struct.pack("<Q", size) + text + body


@SLOW_FUZZ
@given(st.data())
def test_safetensors_mutated_header(base, data):
    blob = data.draw(mutated_safetensors(base.header, base.data))
    (base.work / "config.json").write_bytes(dumps(base.config))
    (base.work / "model.safetensors").write_bytes(blob)
    event(load_folder(base.work))


def tensor_bytes(dtype: str, shape: list[int]) -> bytes:
    numel = 1
    for size in shape:
        numel *= size
    return bytes((7 * i + 1) % 251 for i in range(numel * BITS[dtype] // 8))


def write_tensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A hand-written safetensors file: any dtype, byte sizes consistent with the shapes."""
    header, data = {}, b""
    for name, (dtype, shape) in tensors.items():
        payload = tensor_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = dumps(header)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


WEIGHT = "model.layers.0.self_attn.q_a_proj.weight"
shapes = st.lists(st.integers(0, 6), max_size=3).map(lambda s: [x * 2 for x in s])  # even: F4 / F6 stay whole bytes


@FUZZ
@given(st.sampled_from(sorted(BITS)), shapes, shapes, st.none() | st.tuples(st.sampled_from(sorted(BITS)), shapes),
       st.sampled_from([(128, 128), (2, 2), (1, 4), (10**12, 10**15)]))
def test_load_state_dict_any_dtype_and_scale(base, dtype, shape, expected_shape, scale, block):
    """One tensor of any dtype and shape, maybe with a scale_inv of any dtype, against an expected float shape."""
    tensors = {WEIGHT: (dtype, shape)}
    if scale is not None:
        tensors[WEIGHT + "_scale_inv"] = scale
    write_tensors(base.small / "model.safetensors", tensors)
    expected = {WEIGHT: (torch.Size(expected_shape if expected_shape != [] else shape), torch.float32)}

    def call():
        out = load_state_dict(CheckpointFiles(base.small), expected, 2, dtype=torch.float32, block_size=block)
        assert out[WEIGHT].dtype == torch.float32 and out[WEIGHT].shape == expected[WEIGHT][0]

    event(outcome(call, (str(base.small),)))


# ---------------------------------------------------------------------------- shard index

@st.composite
def mutated_indexes(draw, index: dict) -> bytes:
    index = copy.deepcopy(index)
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    kind = draw(st.sampled_from(["value", "value", "add", "drop", "map", "whole", "bytes", "point"]))
    if kind == "value":
        weight_map[draw(st.sampled_from(sorted(weight_map)))] = draw(
            st.text(max_size=30) | st.sampled_from(["/etc/hostname", "../base/model.safetensors", ".", "", "x" * 300,
                                                    "config.json", INDEX, "a\x00b"]) | json_values)
    elif kind == "add":
        weight_map[draw(st.text(max_size=20))] = draw(st.sampled_from(shards))
    elif kind == "drop":
        del weight_map[draw(st.sampled_from(sorted(weight_map)))]
    elif kind == "map":
        index["weight_map"] = draw(json_values)
    elif kind == "whole":
        return dumps(draw(json_values))
    elif kind == "bytes":
        return draw(st.binary(max_size=200))
    else:  # every tensor said to be in one shard
        index["weight_map"] = dict.fromkeys(weight_map, draw(st.sampled_from(shards)))
    return dumps(index)


@FUZZ
@given(st.data())
def test_index_mutated(base, data):
    (base.work_sharded / INDEX).write_bytes(data.draw(mutated_indexes(base.index)))
    event(load_folder(base.work_sharded))


# ---------------------------------------------------------------------------- regressions

DEEP = b"[" * 100_000 + b"]" * 100_000


def _config_edit(**fields):
    def edit(folder: Path, base: Base) -> None:
        config = copy.deepcopy(base.config)
        for key, value in fields.items():
            outer, _, inner = key.partition("__")
            if inner:
                config[outer] = dict(YARN, **{inner: value})
            elif value is _DELETE:
                del config[key]
            else:
                config[key] = value
        (folder / "config.json").write_bytes(dumps(config))
    return edit


_DELETE = object()


def _write(name: str, blob: bytes):
    def edit(folder: Path, base: Base) -> None:
        (folder / name).write_bytes(blob)
    return edit


def _index_value(value: str):
    def edit(folder: Path, base: Base) -> None:
        index = copy.deepcopy(base.index)
        index["weight_map"][sorted(index["weight_map"])[0]] = value
        (folder / INDEX).write_bytes(dumps(index))
    return edit


def _replace_tensor(base: Base, folder: Path, dtype: str, payload: bytes, extra: dict | None = None) -> None:
    """The base file with q_a_proj's bytes replaced by payload (as dtype, same [24, 32] shape), offsets moved."""
    header = copy.deepcopy(base.header)
    begin, end = header[WEIGHT]["data_offsets"]
    data = base.data[:begin] + payload + base.data[end:]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [offset + len(payload) - (end - begin) for offset in entry["data_offsets"]]
    header[WEIGHT].update(dtype=dtype, data_offsets=[begin, begin + len(payload)])
    for name, (extra_dtype, shape, extra_payload) in (extra or {}).items():
        offsets = [len(data), len(data) + len(extra_payload)]
        header[name] = {"dtype": extra_dtype, "shape": shape, "data_offsets": offsets}
        data += extra_payload
    text = dumps(header)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)


def _index_extra_tensor(name: str):
    def edit(folder: Path, base: Base) -> None:
        index = copy.deepcopy(base.index)
        index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]
        (folder / INDEX).write_bytes(dumps(index))
    return edit


def _renamed_tensor(name: str):
    def edit(folder: Path, base: Base) -> None:
        header = copy.deepcopy(base.header)
        header[name] = header.pop("model.norm.weight")
        text = dumps(header)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + base.data)
    return edit


def _f4_weight(folder: Path, base: Base) -> None:
    """q_a_proj stored as F4 with the right shape: torch cannot convert F4, so it must be refused up front."""
    _replace_tensor(base, folder, "F4", tensor_bytes("F4", [24, 32]))


def _fp8_block(block):
    """An FP8 q_a_proj (one 128 x 128 block) with a config naming `block` as the weight block size."""
    def edit(folder: Path, base: Base) -> None:
        config = copy.deepcopy(base.config)
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block}
        (folder / "config.json").write_bytes(dumps(config))
        weight, scale = quantize_fp8(torch.randn(24, 32), (128, 128))
        _replace_tensor(base, folder, "F8_E4M3", weight.view(torch.uint8).numpy().tobytes(),
                        {WEIGHT + "_scale_inv": ("F32", [1, 1], scale.numpy().tobytes())})
    return edit


# (id, which base folder, edit, expected error class or None for success, a fragment of the message)
REGRESSIONS = [
    ("config nested 100000 deep", "work", _write("config.json", DEEP), ConfigError, "nested too deeply"),
    ("config integer of 5001 digits", "work", _write("config.json", b'{"vocab_size": 1' + b"0" * 5000 + b"}"),
     ConfigError, "too many digits"),
    ("config vocab_size 10**30", "work", _config_edit(vocab_size=10**30), ConfigError, "vocab_size="),
    ("config hidden_size 2**31", "work", _config_edit(hidden_size=2**31), ConfigError, "hidden_size="),
    ("config num_hidden_layers 2**31", "work", _config_edit(num_hidden_layers=2**31), ConfigError,
     "num_hidden_layers="),
    ("config qk_rope_head_dim 2**31", "work", _config_edit(qk_rope_head_dim=2**31), ConfigError, "qk_rope_head_dim="),
    ("config moe_layer_freq 0", "work", _config_edit(moe_layer_freq=0), ConfigError, "moe_layer_freq"),
    ("config q_lora_rank 0", "work", _config_edit(q_lora_rank=0), ConfigError, "q_lora_rank=0"),
    ("config routed_scaling_factor 10**400 (int)", "work", _config_edit(routed_scaling_factor=10**400), ConfigError,
     "routed_scaling_factor="),
    ("config rms_norm_eps Infinity", "work", _config_edit(rms_norm_eps=float("inf")), ConfigError, "rms_norm_eps=inf"),
    ("config rms_norm_eps NaN", "work", _config_edit(rms_norm_eps=float("nan")), ConfigError, "rms_norm_eps=nan"),
    ("config attention_bias 'yes'", "work", _config_edit(attention_bias="yes"), ConfigError, "attention_bias="),
    ("config eos_token_id 'x'", "work", _config_edit(eos_token_id="x"), ConfigError, "eos_token_id="),
    ("config eos_token_id [1, -2]", "work", _config_edit(eos_token_id=[1, -2]), ConfigError, "eos_token_id="),
    ("config rope_interleave 'false'", "work", _config_edit(rope_interleave="false"), ConfigError, "rope_interleave="),
    ("config rope_theta null", "work", _config_edit(rope_parameters__rope_theta=None), ConfigError, "rope_theta="),
    ("config rope_theta 1 (yarn)", "work", _config_edit(rope_parameters__rope_theta=1), ConfigError, "rope_theta="),
    ("config yarn factor null", "work", _config_edit(rope_parameters__factor=None), ConfigError, "rope factor="),
    ("config yarn original_max_position_embeddings Infinity", "work",
     _config_edit(rope_parameters__original_max_position_embeddings=float("inf")), ConfigError,
     "original_max_position_embeddings="),
    ("config yarn original_max_position_embeddings 0", "work",
     _config_edit(rope_parameters__original_max_position_embeddings=0), ConfigError,
     "original_max_position_embeddings="),
    ("config yarn beta_fast -1", "work", _config_edit(rope_parameters__beta_fast=-1), ConfigError, "rope beta_fast="),
    ("config yarn mscale_all_dim NaN", "work", _config_edit(rope_parameters__mscale_all_dim=float("nan")), ConfigError,
     "rope mscale_all_dim="),
    ("config weight_block_size [0]", "work", _config_edit(quantization_config={"weight_block_size": [0]}),
     CheckpointError, "weight_block_size"),
    ("config hidden_size deleted", "work", _config_edit(hidden_size=_DELETE), ConfigError, "hidden_size"),
    ("config a JSON list", "work", _write("config.json", b"[1, 2]"), ConfigError, "JSON object"),
    ("config not UTF-8", "work", _write("config.json", b'{"a": "\xff"}'), ConfigError, "not valid JSON"),
    ("index nested 100000 deep", "work_sharded", _write(INDEX, DEEP), CheckpointError, "nested too deeply"),
    ("index integer of 5001 digits", "work_sharded", _write(INDEX, b'{"weight_map": {}, "n": 1' + b"0" * 5000 + b"}"),
     CheckpointError, "too many digits"),
    ("index shard name of 300 characters", "work_sharded", _index_value("x" * 300), CheckpointError,
     "not a file name"),
    ("index shard outside the folder", "work_sharded", _index_value("/etc/hostname"), CheckpointError,
     "not a file name"),
    ("index shard name with NUL", "work_sharded", _index_value("a\x00b"), CheckpointError, "not a file name"),
    ("index shard '..'", "work_sharded", _index_value(".."), CheckpointError, "not a file name"),
    ("index lists a tensor named '\\x1e'", "work_sharded", _index_extra_tensor("\x1e"), CheckpointError,
     "(first: \\x1e -> "),
    ("safetensors tensor named 'a\\nb'", "work", _renamed_tensor("a\nb"), CheckpointError, "unexpected [a\\nb"),
    ("safetensors F4 weight", "work", _f4_weight, CheckpointError, "found F4 (unsupported"),
    ("safetensors header length > file", "work", _write("model.safetensors", struct.pack("<Q", 10**6) + b"{}"),
     CheckpointError, "unreadable safetensors file"),
    ("safetensors header a JSON list", "work", _write("model.safetensors", struct.pack("<Q", 6) + b"[1, 2]"),
     CheckpointError, "unreadable safetensors file"),
    ("safetensors header not UTF-8", "work", _write("model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{}"),
     CheckpointError, "unreadable safetensors file"),
    ("FP8 block larger than the matrix", "work", _fp8_block([10**12, 10**15]), None, ""),
]


@pytest.mark.parametrize("case", REGRESSIONS, ids=[case[0] for case in REGRESSIONS])
def test_regression(base, tmp_path, case):
    _, which, edit, error, fragment = case
    folder = tmp_path / which
    shutil.copytree(base.sharded if which == "work_sharded" else base.folder, folder)
    edit(folder, base)
    result = load_folder(folder)
    assert result == ("ok" if error is None else error.__name__)
    if error is not None:
        with pytest.raises(error, match=None) as info:
            Runtime.from_folder(folder, device="cpu")
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------- generate() and load() arguments

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 600),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.text(max_size=6),
    st.sampled_from(["auto", "chain", "tree", "dynamic", "none", "3,2,1", "[[0],[1]]", "exact", "typical", "cpu"]),
    st.binary(max_size=6), st.lists(st.integers(-3, 400), max_size=4),
    st.lists(st.lists(st.integers(-1, 400), max_size=3), max_size=3), st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()), st.just(1 + 2j),
    st.just(torch.tensor([1.5])), st.just(torch.tensor([[1, 2]])),
)
"""Values of every kind: of the right type (in range or not), and of every wrong one."""
GENERATE_ARGUMENTS = {
    "prompt": ("prompt",), "input_ids": ("input_ids", "token id"), "max_new_tokens": ("max_new_tokens",),
    "temperature": ("temperature",), "top_k": ("top_k",), "top_p": ("top_p",), "seed": ("seed",),
    "draft": ("draft",), "num_draft_tokens": ("num_draft_tokens",), "tree": ("tree",), "depth": ("depth",),
    "draft_topk": ("draft_topk",), "topk": ("topk",), "eos_token_id": ("eos_token_id",),
    "ignore_eos": ("ignore_eos",), "stop": ("stop",), "acceptance": ("acceptance",), "stream": ("stream",),
}
"""generate()'s arguments, each with the words an error about it must contain."""
LOAD_ARGUMENTS = {"device": ("device",), "dtype": ("dtype",), "threads": ("threads",), "attention": ("attention",),
                  "compile": ("compile",), "path": ("path", "model folder", "config.json")}
ARGUMENTS = settings(max_examples=400, deadline=None, derandomize=True)


def _one_line_naming(exc: MTPRuntimeError, words: tuple[str, ...]) -> None:
    message = str(exc)
    assert "\n" not in message and any(word in message for word in words), (type(exc).__name__, message)


@ARGUMENTS
@given(st.sampled_from(sorted(GENERATE_ARGUMENTS)), ANY_VALUE)
def test_generate_argument_of_any_type_runs_or_is_a_typed_error_naming_it(tiny_runtime, name, value):
    """Every value of every generate() argument either runs or raises an MTPRuntimeError naming the argument on
    one line; never a TypeError/ValueError/RuntimeError from torch, the tokenizer or numpy."""
    kwargs = {"max_new_tokens": 3, "stream": True, name: value}
    if name != "prompt":
        kwargs.setdefault("input_ids", [1, 2, 3])
    try:
        out = tiny_runtime.generate(**kwargs)
        if isinstance(out, mtp_runtime.GenerationStream):
            next(iter(out), None)  # the prefill: capacity and memory are checked there
    except MTPRuntimeError as exc:
        event(type(exc).__name__)
        _one_line_naming(exc, GENERATE_ARGUMENTS[name])
    else:
        event("ran")


@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(LOAD_ARGUMENTS)), ANY_VALUE)
def test_load_argument_of_any_type_loads_or_is_a_typed_error_naming_it(tiny, name, value):
    kwargs = {"path": tiny, "device": "cpu", name: value}
    path = kwargs.pop("path")
    try:
        mtp_runtime.load(path, **kwargs)
    except MTPRuntimeError as exc:
        event(type(exc).__name__)
        _one_line_naming(exc, LOAD_ARGUMENTS[name])
    else:
        event("loaded")


@pytest.fixture(scope="module")
def tiny_runtime(tiny):
    return mtp_runtime.load(tiny)
