"""The check that a DeepSeek-V3.2 (sparse attention) checkpoint stores its lightning indexers at all.

A checkpoint missing only some indexer tensors gets the usual list of every missing tensor (plan.py); one with
none is most likely dense DeepSeek-V3 weights under a deepseek_v32 config, and gets an error that says so.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import CheckpointError
from .files import CheckpointFiles

INDEXER_MARK = ".self_attn.indexer."


def require_indexers(files: CheckpointFiles, config: ModelConfig) -> None:
    """Raise CheckpointError when a sparse-attention config's checkpoint has no indexer tensor."""
    if config.indexer is None or any(INDEXER_MARK in raw for raw in files.raw_names()):
        return
    raise CheckpointError(
        f"checkpoint {files.folder} stores no indexer tensors (model.layers.*.self_attn.indexer.*), which "
        f"model_type {config.model_type} needs for its sparse attention; use a DeepSeek-V3.2 checkpoint, or set "
        "model_type to deepseek_v3 in config.json to run these weights with dense attention (`mtp-runtime train "
        "--indexer --init` on that folder trains indexers for them)")
