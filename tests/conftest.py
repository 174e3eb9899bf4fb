"""Shared pytest fixtures: the tiny tokenized checkpoint, no_grad, and tiny random transformers reference models
saved as checkpoints, each built once per session. Plain helpers (checks, the CLI runner) are in helpers.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import make_tiny
from hf_fixtures import (
    FP8_OVERRIDES, load_reference, make_case, make_drafter_case, make_v3, resave, write_dequantized,
)

# Tiny models gain nothing from intra-op threads, and on a shared CPU the extra threads spin and stall.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 folder with 2 MTP modules, mostly-accepted drafts and a byte-level BPE tokenizer."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def no_grad():
    """Run the test under torch.no_grad (use with pytestmark = pytest.mark.usefixtures("no_grad"))."""
    with torch.no_grad():
        yield


@dataclass
class FP8Case:
    """A float32 model, its FP8 re-save, and transformers loaded with the dequantized FP8 weights."""

    model: torch.nn.Module
    folder: Path
    fp8_folder: Path
    dequantized_model: torch.nn.Module


@pytest.fixture(scope="session")
def hf_case(tmp_path_factory):
    """Factory: case name (see hf_fixtures.CASES) -> (hf_model, folder), each built once."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            built[name] = make_case(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def fp8_case(tmp_path_factory) -> FP8Case:
    tmp = tmp_path_factory.mktemp("fp8")
    model, folder = make_v3(tmp, seed=7, **FP8_OVERRIDES)
    fp8_folder = resave(folder, tmp / "fp8", "fp8")
    dequantized = load_reference(write_dequantized(fp8_folder, tmp / "dequantized"), "v3")
    return FP8Case(model, folder, fp8_folder, dequantized)


@pytest.fixture(scope="session")
def drafter_case(tmp_path_factory):
    """Factory: (damping, num_mtp_layers[, case]) -> (hf_model, folder) with bigram MTP drafters, each built once."""
    built: dict[tuple, tuple] = {}

    def get(damping: float, num_layers: int, case: str = "v3_grouped"):
        key = (damping, num_layers, case)
        if key not in built:
            built[key] = make_drafter_case(tmp_path_factory.mktemp("drafter"), damping, num_layers, case=case)
        return built[key]

    return get
