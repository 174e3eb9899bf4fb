"""A model folder as a whole: config.json read once, the MTP modules it promises checked against the weights, and
the weights loaded into a DeepseekForCausalLM. Runtime.from_folder, `mtp-runtime info` and `train --init` use it.

config.json is the contract for the MTP modules: the model gets exactly `num_nextn_predict_layers` of them. Extra
MTP layers in the weights are reported once (a warning on the `mtp_runtime` logger) and left unread; fewer than
promised is a CheckpointError naming the missing layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, read_config_json
from ..errors import CheckpointError, ConfigError
from ..model import DeepseekForCausalLM
from .files import CheckpointFiles
from .fp8 import weight_block_size
from .indexer import require_indexers
from .load import load_state_dict

log = logging.getLogger("mtp_runtime")


@dataclass(frozen=True)
class ModelFolder:
    """An HF model folder and its config.json, parsed (and kept raw for the fields ModelConfig does not hold)."""

    path: Path
    config: ModelConfig
    raw_config: dict[str, Any]


@dataclass(frozen=True)
class MTPLayout:
    """The MTP modules of a checkpoint: as many as config.json promises."""

    depth: int
    stored: bool
    """The folder holds their weights (False: a config-only folder, described from the config alone)."""
    own_head: bool
    """Each module stores its own output head instead of sharing the trunk's."""
    own_embedding: bool
    """Each module stores its own embedding instead of sharing the trunk's."""


def open_folder(path: str | Path) -> ModelFolder:
    """The folder and its config.json (ConfigError when the folder or the config is missing or invalid)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model folder {path} does not exist; pass a folder holding an HF config.json")
    if not path.is_dir():
        raise ConfigError(f"model path {path} is a file, not a folder; pass the folder that holds config.json "
                          f"and the *.safetensors files")
    file = path / "config.json"
    raw = read_config_json(file)
    return ModelFolder(path, ModelConfig.from_dict(raw, source=str(file)), raw)


def mtp_layout(folder: ModelFolder, files: CheckpointFiles | None) -> MTPLayout:
    """The MTP modules config.json promises, checked against the weights' headers (files None: config only)."""
    config = folder.config
    promised, n = config.num_nextn_predict_layers, config.num_hidden_layers
    if files is None:
        return MTPLayout(promised, False, True, True)
    stored = files.mtp_layer_count(n)
    if stored < promised:
        missing = f"model.layers.{n + stored}" + (f"..{n + promised - 1}" if promised - stored > 1 else "")
        raise CheckpointError(
            f"{folder.path / 'config.json'}: num_nextn_predict_layers is {promised} but the weights hold {stored} MTP "
            f"layer(s): {missing} missing; set num_nextn_predict_layers to {stored} or add the layers")
    if stored > promised:
        extra = f"model.layers.{n + promised}" + (f"..{n + stored - 1}" if stored - promised > 1 else "")
        log.warning("%s: the weights hold %d MTP layer(s) but config.json's num_nextn_predict_layers is %d; %s "
                    "ignored", folder.path, stored, promised, extra)
    own_head = promised > 0 and files.has_our_name("mtp.0.shared_head.head.weight", n)
    own_embedding = promised > 0 and files.has_our_name("mtp.0.embed_tokens.weight", n)
    return MTPLayout(promised, True, own_head, own_embedding)


def load_model(folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> DeepseekForCausalLM:
    """The folder's weights (memory-mapped, one tensor at a time) in a model on `device`, floats as `dtype`."""
    config = folder.config
    files = CheckpointFiles(folder.path)
    require_indexers(files, config)
    layout = mtp_layout(folder, files)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, layout.depth, mtp_own_head=layout.own_head,
                                    mtp_own_embedding=layout.own_embedding)
    expected = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
    state = load_state_dict(files, expected, config.num_hidden_layers, dtype=dtype, device=device,
                            tie_word_embeddings=config.tie_word_embeddings,
                            block_size=weight_block_size(folder.raw_config), num_mtp=layout.depth)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # the non-persistent buffers (RoPE tables, norm constants) were built on the CPU
    return model
