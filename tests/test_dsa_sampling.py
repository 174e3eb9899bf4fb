"""Sampled speculative output on DeepSeek-V3.2 (sparse attention) has the distribution of plain sampling.

The method of test_sampling_lossless.py on a V3.2 checkpoint whose index_topk (2) is below the 3 to 5 keys the
generated positions see, so every sampled token past the first comes from attention over a selection.
"""

from __future__ import annotations

import json

import pytest

from builders import TINY_V32, build_checkpoint
from mtp_runtime import load
from test_sampling_lossless import DRAFTS, PROMPT, REJECT_Z, SAMPLES, VOCAB, chi_square_z, exact_distribution, \
    sample_sequences

TEMPERATURE = dict(temperature=1.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("v32_vocab6"), vocab=VOCAB, num_mtp=2, seed=0, context_scale=0.3,
                            norm_std=0.0, eh_noise=0.3, head_scale=0.5, **dict(TINY_V32, index_topk=2))


@pytest.fixture(scope="module")
def rt(folder):
    return load(folder, device="cpu")


def test_the_law_depends_on_the_selection(rt, folder, tmp_path):
    """Attending to every key instead of the top 2 changes the exact law (so the test below exercises DSA)."""
    dense_folder = tmp_path / "dense"
    dense_folder.mkdir()
    for path in folder.iterdir():
        (dense_folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((dense_folder / "config.json").read_text())
    config["index_topk"] = 64
    (dense_folder / "config.json").write_text(json.dumps(config))
    sparse, dense = exact_distribution(rt, TEMPERATURE), exact_distribution(load(dense_folder), TEMPERATURE)
    assert max(abs(sparse[cell] - dense[cell]) for cell in sparse) > 0.005


@pytest.mark.parametrize("draft", ["chain3", "tree321"])
def test_speculative_samples_follow_the_plain_distribution(rt, draft):
    counts, stats = sample_sequences(rt, TEMPERATURE, DRAFTS[draft], seed=11)
    attempts, accepts = sum(stats.depth_attempts), sum(stats.depth_accepts)
    assert 0 < accepts < attempts, (attempts, accepts)
    z = chi_square_z(counts, exact_distribution(rt, TEMPERATURE), SAMPLES)
    assert z < REJECT_Z, z


def test_power_a_different_temperature_is_rejected(rt):
    counts, _ = sample_sequences(rt, dict(temperature=1.5), DRAFTS["chain3"], seed=3)
    assert chi_square_z(counts, exact_distribution(rt, TEMPERATURE), SAMPLES) > REJECT_Z
