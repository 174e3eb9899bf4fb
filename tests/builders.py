"""Tiny DeepSeek-V3 checkpoints with MTP modules, written with our own model and save_checkpoint.

`build_checkpoint` makes a random model (weights ~ N(0, 0.3), norm weights ~ N(1, norm_std)).
`build_mostly_right` scales every attention output and MLP down projection by a small `context_scale`
and sets each MTP module's eh_proj to [I, 0]: the trunk then behaves almost like a bigram model and every
MTP module predicts almost the same bigram, so drafts are mostly (not always) accepted. Tests of the
speculative loop need that: random MTP weights accept almost no draft and never reach multi-token commits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_runtime.checkpoint import save_checkpoint
from mtp_runtime.config import ModelConfig
from mtp_runtime.model import DeepseekForCausalLM

WEIGHT_STD = 0.3

TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
    first_k_dense_replace=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

TINY_V32 = dict(model_type="deepseek_v32", index_n_heads=2, index_head_dim=8, index_topk=3)
"""Overrides that make TINY_V3 a DeepSeek-V3.2 model: sparse attention with 2 indexer heads choosing 3 keys."""


def tiny_config(vocab: int = 64, num_mtp: int = 2, **overrides) -> ModelConfig:
    """The tiny DeepSeek-V3 architecture every engine test uses."""
    raw = dict(TINY_V3, vocab_size=vocab, num_nextn_predict_layers=num_mtp)
    raw.update(overrides)
    return ModelConfig.from_dict(raw)


def random_model(cfg: ModelConfig, num_mtp: int, *, seed: int = 0, norm_std: float = 0.1,
                 mtp_own_head: bool = False) -> DeepseekForCausalLM:
    """Our model with weights ~ N(0, 0.3), norm weights ~ N(1, norm_std), a small random routing bias."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg, num_mtp, mtp_own_head=mtp_own_head)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.normal_(1.0, norm_std) if norm_std else tensor.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.1)
            else:
                tensor.normal_(0.0, WEIGHT_STD)
    return model.eval()


def scale_context(model: DeepseekForCausalLM, context_scale: float) -> None:
    """Multiply every attention output and MLP down projection (trunk and MTP) by context_scale."""
    layers = list(model.model.layers) + list(model.mtp)
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.mul_(context_scale)
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.mul_(context_scale)
                if mlp.shared_experts is not None:
                    mlp.shared_experts.down_proj.weight.mul_(context_scale)
            else:
                mlp.down_proj.weight.mul_(context_scale)


def identity_eh_proj(model: DeepseekForCausalLM, eh_noise: float) -> None:
    """eh_proj = [I_H, 0] (+ eh_noise * randn): each MTP module passes the embedding of its input token on."""
    h = model.config.hidden_size
    with torch.no_grad():
        for module in model.mtp:
            weight = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
            if eh_noise:
                weight += eh_noise * torch.randn(h, 2 * h)
            module.eh_proj.weight.copy_(weight)


def build_model(*, vocab: int = 64, num_mtp: int = 2, seed: int = 0, context_scale: float = 1.0,
                eh_noise: float | None = None, norm_std: float = 0.1, mtp_own_head: bool = False,
                head_scale: float = 1.0, **config_overrides) -> DeepseekForCausalLM:
    """The model build_checkpoint saves (useful where a test needs the module itself).

    head_scale multiplies the output head (shared by the MTP modules): below 1 it flattens every distribution.
    """
    cfg = tiny_config(vocab, num_mtp, **config_overrides)
    model = random_model(cfg, num_mtp, seed=seed, norm_std=norm_std, mtp_own_head=mtp_own_head)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    if context_scale != 1.0:
        scale_context(model, context_scale)
    if eh_noise is not None:
        identity_eh_proj(model, eh_noise)
    return model


def save_model(folder: str | Path, model: DeepseekForCausalLM) -> Path:
    folder = Path(folder)
    cfg = model.config
    save_checkpoint(folder, cfg.to_hf_dict(), model.state_dict(), cfg.num_hidden_layers)
    return folder


def build_checkpoint(folder: str | Path, *, vocab: int = 64, num_mtp: int = 2, seed: int = 0,
                     context_scale: float = 1.0, eh_noise: float | None = None, norm_std: float = 0.1,
                     mtp_own_head: bool = False, head_scale: float = 1.0, **config_overrides) -> Path:
    """Write a tiny DeepSeek-V3 checkpoint with `num_mtp` MTP layers to `folder`; returns folder."""
    model = build_model(vocab=vocab, num_mtp=num_mtp, seed=seed, context_scale=context_scale, eh_noise=eh_noise,
                        norm_std=norm_std, mtp_own_head=mtp_own_head, head_scale=head_scale, **config_overrides)
    return save_model(folder, model)


def build_mostly_right(folder: str | Path, **kw) -> Path:
    """A checkpoint whose MTP drafts are mostly, not always, accepted (near-bigram trunk and modules)."""
    kw.setdefault("context_scale", 0.01)
    kw.setdefault("norm_std", 0.0)
    kw.setdefault("eh_noise", 0.0)
    return build_checkpoint(folder, **kw)
