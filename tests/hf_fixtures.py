"""Tiny random DeepSeek-V2/V3/V3.2 reference models from transformers, and checkpoint layouts built from them.

`make_v3` / `make_v2` / `make_v32` build a random model with weights large enough that logits are not flat and
routing differs across tokens, save it with `save_pretrained` (per-expert single file) and return
both. `resave` rewrites a saved folder as another layout (sharded, fused experts, FP8 block-scaled),
and `add_mtp_layers` appends random MTP modules the way DeepSeek-V3 checkpoints store them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config,
    DeepseekV32ForCausalLM,
)

WEIGHT_STD = 0.15
NORM_STD = 0.1
BIAS_STD = 0.1
FP8_BLOCK = 128
FP8_MAX = 448.0
INDEX_NAME = "model.safetensors.index.json"

COMMON = dict(
    vocab_size=199, hidden_size=48, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
V3_BASE = dict(COMMON, n_group=1, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
               norm_topk_prob=True, num_nextn_predict_layers=0)
V2_BASE = dict(COMMON, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=2.0)
# DeepSeek-V3.2: index_topk well below the test sequences (12 to 23 tokens), so the selection matters; 8 indexer
# heads make exact score ties (no head firing) rare, since transformers' topk breaks ties arbitrarily.
V32_BASE = dict(COMMON, n_group=1, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
                norm_topk_prob=True, index_n_heads=8, index_head_dim=16, index_topk=4)

YARN_V3 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
YARN_V2_LITE = dict(YARN_V3, mscale=0.707, mscale_all_dim=0.707)

# name -> (family, overrides); every parity test runs over these.
CASES = {
    "v3_q_lora": ("v3", {}),
    "v3_no_q_lora": ("v3", {"q_lora_rank": None}),
    "v3_yarn": ("v3", {"rope_parameters": YARN_V3}),
    "v3_grouped": ("v3", {"first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}),
    "v2_greedy": ("v2", {}),
    "v2_grouped": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                          "first_k_dense_replace": 1, "q_lora_rank": 24}),
    "v2_lite_yarn": ("v2", {"rope_parameters": YARN_V2_LITE, "first_k_dense_replace": 1}),
}
# DeepSeek-V3.2 cases; the V3.2 parity tests run over these.
V32_CASES = {
    "v32": ("v32", {}),
    "v32_grouped_yarn": ("v32", {"first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "index_topk": 6,
                                 "rope_parameters": YARN_V3}),
}
FAMILIES = {"v2": (DeepseekV2Config, DeepseekV2ForCausalLM, V2_BASE),
            "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, V3_BASE),
            "v32": (DeepseekV32Config, DeepseekV32ForCausalLM, V32_BASE)}
# Wider than 128 in several weights so FP8 uses more than one (partial) block per matrix.
FP8_OVERRIDES = {"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 160,
                 "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}


def make_v3(tmp: str | Path, seed: int = 0, **overrides):
    """A random DeepseekV3ForCausalLM saved under `tmp`; returns (hf_model, folder)."""
    return _make(DeepseekV3Config, DeepseekV3ForCausalLM, dict(V3_BASE, **overrides), tmp, seed)


def make_v2(tmp: str | Path, seed: int = 0, **overrides):
    """A random DeepseekV2ForCausalLM saved under `tmp`; returns (hf_model, folder)."""
    return _make(DeepseekV2Config, DeepseekV2ForCausalLM, dict(V2_BASE, **overrides), tmp, seed)


def make_v32(tmp: str | Path, seed: int = 0, **overrides):
    """A random DeepseekV32ForCausalLM saved under `tmp`; returns (hf_model, folder)."""
    return _make(DeepseekV32Config, DeepseekV32ForCausalLM, dict(V32_BASE, **overrides), tmp, seed)


def make_case(name: str, tmp: str | Path, seed: int = 0):
    """Build one of CASES or V32_CASES by name."""
    family, overrides = {**CASES, **V32_CASES}[name]
    config_cls, model_cls, base = FAMILIES[family]
    return _make(config_cls, model_cls, dict(base, **overrides), tmp, seed)


def _make(config_cls, model_cls, values: dict, tmp: str | Path, seed: int):
    config = config_cls(**values)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model)
    folder = Path(tmp) / "hf"
    model.save_pretrained(folder)
    return model, folder


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Re-initialise with large weights: norms ~1, projections std WEIGHT_STD, random gate bias."""
    for name, param in model.named_parameters():
        param.copy_(_random_like(name, param.shape))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(_random_like(name, buf.shape))


def _random_like(name: str, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + NORM_STD * noise
    if name.endswith("e_score_correction_bias"):
        return BIAS_STD * noise
    return WEIGHT_STD * noise


def load_reference(folder: str | Path, family: str = "v3"):
    """Load a per-expert folder back into transformers (eager attention and experts, float32)."""
    model_cls = FAMILIES[family][1]
    return model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                     experts_implementation="eager").eval()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' full-forward logits [B, T, vocab]."""
    return model(ids).logits


def random_ids(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids, LongTensor [batch, length]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- reading and writing safetensors folders -------------------------------------------------


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded folder."""
    tensors = {}
    for path in weight_files(folder):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def write_config(folder: str | Path, config: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))


def write_tensors(folder: str | Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write `tensors` as model.safetensors, or as `shards` files plus an index, replacing old files."""
    folder = Path(folder)
    for old in list(folder.glob("*.safetensors")) + list(folder.glob(INDEX_NAME)):
        old.unlink()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(_split_keys(sorted(tensors), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _split_keys(keys: list[str], parts: int) -> list[list[str]]:
    size = math.ceil(len(keys) / parts)
    return [keys[i * size:(i + 1) * size] for i in range(parts)]


def copy_folder(src: str | Path, dst: str | Path) -> Path:
    """A copy of a checkpoint folder (config, weights, generation config)."""
    dst = Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


# ---- layouts -------------------------------------------------------------------------------

LAYOUTS = ("single", "sharded", "fused", "fp8")


def resave(folder: str | Path, dst: str | Path, layout: str) -> Path:
    """Copy `folder` to `dst` with its weights rewritten in `layout` (one of LAYOUTS)."""
    dst = copy_folder(folder, dst)
    tensors = read_tensors(folder)
    if layout == "single":
        write_tensors(dst, tensors)
    elif layout == "sharded":
        write_tensors(dst, tensors, shards=3)
    elif layout == "fused":
        write_tensors(dst, fuse_experts(tensors))
    elif layout == "fp8":
        write_tensors(dst, quantize_fp8(tensors))
        config = read_config(dst)
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        write_config(dst, config)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return dst


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down weights -> `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for prefix in sorted({k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k}):
        p = f"{prefix}.mlp.experts"
        count = len({k for k in tensors if k.startswith(p + ".") and k.endswith(".down_proj.weight")})
        gate_up = [torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
                   for e in range(count)]
        out[f"{p}.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H]
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(count)])
    return out


def is_fp8_target(name: str, tensor: torch.Tensor) -> bool:
    """Quantize 2-D Linear weights inside self_attn / mlp; keep norms, embeddings, lm_head, router and the indexer's
    head weights (DeepSeek-V3.2 keeps weights_proj in bf16) in float."""
    inside = ".self_attn." in name or ".mlp." in name
    kept = name.endswith((".mlp.gate.weight", ".indexer.weights_proj.weight"))
    return inside and name.endswith(".weight") and tensor.dim() == 2 and not kept


def quantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 e4m3 weights with 128x128 block `weight_scale_inv` (DeepSeek-V3's published format)."""
    out = {}
    for name, tensor in tensors.items():
        if is_fp8_target(name, tensor):
            out[name], out[name + "_scale_inv"] = quantize_block(tensor)
        else:
            out[name] = tensor
    return out


def dequantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights an FP8 checkpoint stands for."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = tensor if scale is None else dequantize_block(tensor, scale)
    return out


def quantize_block(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [O, I] -> (fp8 [O, I], scale_inv [ceil(O/block), ceil(I/block)])."""
    rows, cols = weight.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    padded = F.pad(weight.float(), (0, cb * block - cols, 0, rb * block - rows))
    blocks = padded.view(rb, block, cb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rb, cb]
    quant = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quant.view(rb * block, cb * block)[:rows, :cols].contiguous(), scale


def dequantize_block(quant: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    rows, cols = quant.shape
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return quant.float() * full


def write_dequantized(fp8_folder: str | Path, dst: str | Path) -> Path:
    """A per-expert float32 copy of an FP8 folder, loadable by transformers as the FP8 reference."""
    dst = copy_folder(fp8_folder, dst)
    config = read_config(dst)
    config.pop("quantization_config", None)
    write_config(dst, config)
    write_tensors(dst, dequantize_fp8(read_tensors(fp8_folder)))
    return dst


# ---- MTP modules ---------------------------------------------------------------------------


def add_mtp_layers(folder: str | Path, num_layers: int, seed: int, own_head: bool = False) -> list[str]:
    """Append `num_layers` random MTP modules as `model.layers.{N+k}.*`; returns the added names."""
    config = read_config(folder)
    n = config["num_hidden_layers"]
    tensors = read_tensors(folder)
    generator = torch.Generator().manual_seed(seed)
    added = {}
    for k in range(num_layers):
        added.update(_mtp_layer(tensors, config, n, n + k, own_head, generator))
    tensors.update(added)
    write_tensors(folder, tensors, shards=len(weight_files(folder)))
    config["num_nextn_predict_layers"] = num_layers
    write_config(folder, config)
    return sorted(added)


def _mtp_layer(tensors, config, n, idx, own_head, generator) -> dict[str, torch.Tensor]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes = {name: (hidden,) for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")}
    shapes["eh_proj.weight"] = (hidden, 2 * hidden)
    if own_head:
        shapes["shared_head.head.weight"] = (vocab, hidden)
        shapes["embed_tokens.weight"] = (vocab, hidden)
    last = f"model.layers.{n - 1}."
    shapes.update({k[len(last):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(last)})
    prefix = f"model.layers.{idx}."
    return {prefix + name: _random_like(name, shape, generator) for name, shape in shapes.items()}


@torch.no_grad()
def damp_residual_writes_(model: torch.nn.Module, scale: float) -> None:
    """Scale what every layer adds to the residual stream, so the trunk is close to a bigram model."""
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            param.mul_(scale)


def make_bigram_drafters(folder: str | Path) -> None:
    """Rewrite the MTP modules of `folder` to predict lm_head(norm(Emb(next token))): the bigram successor.

    Each module's block becomes the identity (o_proj and down projections zero) and eh_proj keeps only the
    embedding half, so on a damped trunk the drafts are mostly, not always, what the trunk picks.
    """
    config = read_config(folder)
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    tensors = read_tensors(folder)
    for k in range(config.get("num_nextn_predict_layers", 0)):
        prefix = f"model.layers.{n + k}."
        for name in [x for x in tensors if x.startswith(prefix)]:
            rest = name[len(prefix):]
            if rest.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = torch.zeros_like(tensors[name])
        tensors[prefix + "eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
        tensors[prefix + "enorm.weight"] = torch.ones(hidden)
        tensors[prefix + "shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
        if prefix + "shared_head.head.weight" in tensors:
            tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
            tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    write_tensors(folder, tensors, shards=len(weight_files(folder)))


def make_drafter_case(tmp: str | Path, damping: float, num_layers: int, seed: int = 0, case: str = "v3_grouped"):
    """The `case` model damped by `damping`, with `num_layers` bigram MTP drafters; (hf_model, folder)."""
    model, folder = make_case(case, tmp, seed=seed)
    damp_residual_writes_(model, damping)
    model.save_pretrained(folder)
    add_mtp_layers(folder, num_layers, seed=seed + 1, own_head=num_layers > 1)
    make_bigram_drafters(folder)
    return model, folder
