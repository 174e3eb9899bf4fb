"""ModelConfig: the architecture of a DeepSeek-V2/V3/V3.2 checkpoint, read from its HF config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .validate import finite_float, is_int, read_json, show

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SPARSE_MODEL_TYPES = ("deepseek_v32",)
"""Model types with DeepSeek Sparse Attention (a lightning indexer in every attention layer)."""
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")

# Fields a config.json must name; the rest default as transformers' config classes do.
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
)

# Upper bounds on the integer fields: far above any real checkpoint (DeepSeek-V3: 61 layers, 128 heads, hidden 7168,
# vocabulary 129280), low enough that building the model cannot hang or overflow a tensor's byte size.
MAX_LAYERS = 1024
MAX_HEAD_SIZE = 2**16
"""Heads, and each head's widths."""
MAX_WIDTH = 2**20
"""Hidden and intermediate sizes, ranks, vocabulary, expert counts."""
MAX_INT = 2**31 - 1
INDEX_FP8_BLOCK = 128
"""Indexer keys stored in FP8 carry one float32 scale per this many values (DeepSeek's layout)."""
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "deepseek_v32": "DeepseekV32ForCausalLM"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, normalised from `rope_parameters` or the older `rope_scaling`."""

    theta: float = 10000.0
    """Base wavelength."""
    type: str = "default"
    """"default" or "yarn"."""
    factor: float = 1.0
    """YaRN context-extension factor."""
    original_max_position_embeddings: int = 4096
    """Context length the model was pre-trained with (YaRN)."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    """Explicit cos/sin scale; derived from mscale/mscale_all_dim when None."""
    truncate: bool = True
    interleave: bool = True
    """Checkpoint stores the rope dims of q/k as interleaved pairs (DeepSeek's layout)."""

    @staticmethod
    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """The factor YaRN applies to cos/sin (1.0 without YaRN)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
        return self.yarn_mscale(self.factor)

    @property
    def softmax_scale_multiplier(self) -> float:
        """mscale_all_dim correction of the attention softmax scale (squared, as DeepSeek does)."""
        if self.type == "default" or not self.mscale_all_dim:
            return 1.0
        m = self.yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek Sparse Attention (DeepSeek-V3.2): every attention layer's lightning indexer scores each query
    against the earlier tokens and the query attends to the `topk` best only. Defaults are transformers'."""

    n_heads: int = 64
    """Indexer query heads (config.json `index_n_heads`)."""
    head_dim: int = 128
    """Width of each indexer query head and of the one cached indexer key per token (`index_head_dim`)."""
    topk: int = 2048
    """Keys each query attends to (`index_topk`)."""


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture field of a DeepSeek-V2/V3 model."""

    model_type: str
    # vocabulary and widths
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the dense MLP layers."""
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    # mla
    q_lora_rank: int | None
    """Rank of the query compression; None means a plain q_proj."""
    kv_lora_rank: int
    """Width of the cached latent c_kv."""
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    """Width of the decoupled roped key k_pe (shared by all heads) and of each head's q_pe."""
    v_head_dim: int
    attention_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    # moe
    n_routed_experts: int | None = None
    """None or 0 means every layer is dense."""
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    """Number of MTP modules stored after the trunk layers."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    indexer: IndexerConfig | None = None
    """DeepSeek Sparse Attention (deepseek_v32); None for dense MLA."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.rope.softmax_scale_multiplier

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when layer `layer_idx` (trunk or MTP numbering) uses routed experts."""
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace and (
            layer_idx % self.moe_layer_freq == 0
        )

    def latent_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Cache bytes per token over all trunk layers: c_kv plus k_pe."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_element

    def index_key_bytes_per_token(self, bytes_per_element: int = 2, fp8: bool = False) -> int:
        """Indexer key cache bytes per token over all trunk layers (0 without an indexer); FP8 stores one byte per
        value plus a float32 scale per 128 values."""
        if self.indexer is None:
            return 0
        dim = self.indexer.head_dim
        per_layer = dim + 4 * math.ceil(dim / INDEX_FP8_BLOCK) if fp8 else dim * bytes_per_element
        return self.num_hidden_layers * per_layer

    def expanded_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """What a cache of decompressed per-head K and V would need per token."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return self.num_hidden_layers * per_layer * bytes_per_element

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """The config of a dict of config.json fields (unknown fields are ignored, as transformers does)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object of config.json fields, got {type(raw).__name__}")
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """The config of an HF config.json file; every problem is one ConfigError naming the file."""
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields transformers' DeepseekV3Config / DeepseekV2Config read."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rope", "indexer")}
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.indexer is not None:
            out.update(index_n_heads=self.indexer.n_heads, index_head_dim=self.indexer.head_dim,
                       index_topk=self.indexer.topk)
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type == "yarn":
            rope.update(factor=self.rope.factor, beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow,
                        mscale=self.rope.mscale, mscale_all_dim=self.rope.mscale_all_dim,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope.theta
        out["rope_interleave"] = self.rope.interleave
        out["num_key_value_heads"] = self.num_attention_heads
        return out


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The fields of a config.json file as a dict (ConfigError when it is missing, unreadable or not an object)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found; point to a folder holding an HF config.json")
    raw = read_json(path, ConfigError, "fix or re-export the config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def _parse(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported model_type {show(model_type)}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if "q_lora_rank" not in raw and model_type != "deepseek_v2":
        missing.append("q_lora_rank")
    if missing:
        raise ConfigError(f"{source}: required field(s) missing: {', '.join(missing)}")
    sparse = model_type in SPARSE_MODEL_TYPES
    if sparse and raw["q_lora_rank"] is None:
        raise ConfigError(f"{source}: q_lora_rank=None, but {model_type} needs q_lora_rank (its indexer reads the "
                          "query latent); set it to the width of the checkpoint's q_a_proj")
    is_v3 = model_type != "deepseek_v2"
    defaults = {
        "q_lora_rank": 1536,
        "topk_method": "noaux_tc" if is_v3 else "greedy",
        "scoring_func": "sigmoid" if is_v3 else "softmax",
        "norm_topk_prob": is_v3,
        "routed_scaling_factor": 2.5 if is_v3 else 1.0,
        "n_group": 1, "topk_group": 1, "n_shared_experts": 0, "num_experts_per_tok": 1,
        "moe_intermediate_size": 0, "first_k_dense_replace": 0, "moe_layer_freq": 1,
    }
    values: dict[str, Any] = {"model_type": model_type}
    for f in fields(ModelConfig):
        if f.name in ("model_type", "rope", "indexer"):
            continue
        if f.name in raw:
            value = raw[f.name]
            if value is None and f.name in defaults and f.name not in ("q_lora_rank",):
                value = defaults[f.name]
            values[f.name] = value
        elif f.name in defaults:
            values[f.name] = defaults[f.name]
    if "num_nextn_predict_layers" not in raw and "num_mtp_layers" in raw:
        values["num_nextn_predict_layers"] = raw["num_mtp_layers"]
    _check_types(values, source)
    values["rope"] = _parse_rope(raw, source)
    values["indexer"] = _parse_indexer(raw, source) if sparse else None
    config = ModelConfig(**values)
    _check_consistency(config, source)
    return config


_INDEXER_FIELDS = {"index_n_heads": ("n_heads", MAX_HEAD_SIZE), "index_head_dim": ("head_dim", MAX_HEAD_SIZE),
                   "index_topk": ("topk", MAX_INT)}
"""config.json name -> (IndexerConfig field, upper bound); each must be an integer of at least 1."""


def _parse_indexer(raw: dict[str, Any], source: str) -> IndexerConfig:
    """The indexer fields of a deepseek_v32 config (transformers' defaults where absent)."""
    defaults = IndexerConfig()
    values, bad = {}, []
    for key, (name, high) in _INDEXER_FIELDS.items():
        value = raw.get(key, getattr(defaults, name))
        if not is_int(value, 1, high):
            bad.append(f"{key}={show(value)} (expected an integer in 1..{high})")
        values[name] = value
    if bad:
        raise ConfigError(f"{source}: invalid field(s): {'; '.join(bad)}")
    return IndexerConfig(**values)


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object, got {type(params).__name__}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{source}: rope type {show(rope_type)} is not supported; use 'default' or 'yarn'")
    # a log of theta divides in YaRN, and real models use thousands: require theta > 1
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kwargs: dict[str, Any] = {"theta": _rope_number("rope_theta", theta, 1, source), "type": rope_type,
                              "interleave": _flag(raw, "rope_interleave", "rope_interleave", source)}
    if rope_type == "yarn":
        original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))
        if not is_int(original, 1, MAX_INT):
            raise ConfigError(f"{source}: rope original_max_position_embeddings={show(original)} is invalid; "
                              f"expected an integer in 1..{MAX_INT}")
        optional = {key: _rope_number(key, params.get(key), 0, source, at_least=True, nullable=True)
                    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")}
        attention_factor = params.get("attention_factor")
        kwargs.update(
            factor=_rope_number("factor", params.get("factor", 1.0), 0, source),
            original_max_position_embeddings=original,
            beta_fast=optional["beta_fast"] or 32.0,
            beta_slow=optional["beta_slow"] or 1.0,
            mscale=optional["mscale"] or 0.0,
            mscale_all_dim=optional["mscale_all_dim"] or 0.0,
            attention_factor=_rope_number("attention_factor", attention_factor, 0, source, nullable=True),
            truncate=_flag(params, "truncate", "rope truncate", source),
        )
    return RopeConfig(**kwargs)


def _rope_number(key: str, value: Any, bound: float, source: str, at_least: bool = False,
                 nullable: bool = False) -> float | None:
    """value as a finite float > bound (>= bound when at_least); None passes through when nullable."""
    if value is None and nullable:
        return None
    number = finite_float(value)
    if number is None or number < bound or (number == bound and not at_least):
        bound_text = f">= {bound}" if at_least else f"> {bound}"
        label = key if key.startswith("rope") else f"rope {key}"
        raise ConfigError(f"{source}: {label}={show(value)} is invalid; expected a finite number {bound_text}")
    return number



def _flag(params: dict[str, Any], key: str, label: str, source: str) -> bool:
    value = params.get(key, True)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {label}={show(value)} is invalid; expected true or false")
    return value



_INT_FIELDS = {
    **dict.fromkeys(("num_hidden_layers", "num_nextn_predict_layers", "first_k_dense_replace", "moe_layer_freq"),
                    MAX_LAYERS),
    **dict.fromkeys(("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), MAX_HEAD_SIZE),
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "kv_lora_rank", "moe_intermediate_size",
                     "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group"), MAX_WIDTH),
    "max_position_embeddings": MAX_INT,
}
_OPTIONAL_INT_FIELDS = {"q_lora_rank": (1, MAX_WIDTH), "n_routed_experts": (0, MAX_WIDTH)}
"""Fields that may also be null: q_lora_rank null means no query compression, n_routed_experts null a dense model."""
_BOOL_FIELDS = ("attention_bias", "norm_topk_prob", "tie_word_embeddings")



def _check_types(values: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming every field of the wrong type or range; the two float fields become floats."""
    bad = []
    for name, high in _INT_FIELDS.items():
        if name in values and not is_int(values[name], 0, high):
            bad.append(f"{name}={show(values[name])} (expected an integer in 0..{high})")
    for name, (low, high) in _OPTIONAL_INT_FIELDS.items():
        v = values.get(name)
        if v is not None and not is_int(v, low, high):
            bad.append(f"{name}={show(v)} (expected an integer in {low}..{high}, or null)")
    for name in ("rms_norm_eps", "routed_scaling_factor"):
        number = finite_float(values.get(name))
        if name in values and (number is None or number < 0):
            bad.append(f"{name}={show(values[name])} (expected a finite number >= 0)")
        elif name in values:
            values[name] = number
    for name in _BOOL_FIELDS:
        if name in values and not isinstance(values[name], bool):
            bad.append(f"{name}={show(values[name])} (expected true or false)")
    bos, eos = values.get("bos_token_id"), values.get("eos_token_id")
    if bos is not None and not is_int(bos, 0, MAX_INT):
        bad.append(f"bos_token_id={show(bos)} (expected a token id >= 0, or null)")
    eos_list = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(is_int(e, 0, MAX_INT) for e in eos_list):
        bad.append(f"eos_token_id={show(eos)} (expected a token id >= 0, a list of them, or null)")
    if values.get("topk_method") not in TOPK_METHODS:
        bad.append(f"topk_method={show(values.get('topk_method'))} (expected one of {', '.join(TOPK_METHODS)})")
    if values.get("scoring_func") not in SCORING_FUNCS:
        bad.append(f"scoring_func={show(values.get('scoring_func'))} (expected one of {', '.join(SCORING_FUNCS)})")
    if values.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={show(values.get('hidden_act'))} (only 'silu' is supported)")
    if bad:
        raise ConfigError(f"{source}: invalid field(s): {'; '.join(bad)}")


def _check_consistency(config: ModelConfig, source: str) -> None:
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be positive")
    if config.qk_rope_head_dim % 2:
        problems.append("qk_rope_head_dim must be even")
    if config.indexer is not None and config.indexer.head_dim < config.qk_rope_head_dim:
        problems.append("index_head_dim must be at least qk_rope_head_dim (the indexer ropes that many dims)")
    if config.n_routed_experts:
        if config.num_experts_per_tok > config.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if config.moe_intermediate_size <= 0:
            problems.append("moe_intermediate_size must be positive for MoE models")
        if config.n_group < 1 or config.n_routed_experts % config.n_group:
            problems.append("n_routed_experts must be divisible by n_group")
        if config.topk_group > config.n_group:
            problems.append("topk_group exceeds n_group")
        if config.moe_layer_freq < 1:
            problems.append("moe_layer_freq must be positive for MoE models")
    bos = () if config.bos_token_id is None else (config.bos_token_id,)
    for name, ids in (("eos_token_id", config.eos_token_ids), ("bos_token_id", bos)):
        outside = [t for t in ids if t >= config.vocab_size]
        if outside:
            problems.append(f"{name} {outside[0]} is outside the vocabulary [0, {config.vocab_size})")
    if problems:
        raise ConfigError(f"{source}: inconsistent config: {'; '.join(problems)}")
