"""SamplingParams validation and logits_to_probs: temperature, top-k, top-p and greedy on toy logits."""

from __future__ import annotations

import math

import pytest
import torch

from mtp_runtime.errors import GenerationSettingsError
from mtp_runtime.sampling import SamplingParams, logits_to_probs, sample


def probs_of(probs: list[float], **settings) -> torch.Tensor:
    """Run logits_to_probs on the logits log(probs), at temperature 1 unless told otherwise."""
    settings.setdefault("temperature", 1.0)
    return logits_to_probs(torch.tensor(probs).log(), SamplingParams(**settings))


def test_temperature_divides_the_logits():
    logits = torch.tensor([1.0, 2.0, 3.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        got = logits_to_probs(logits, SamplingParams(temperature=temperature))
        torch.testing.assert_close(got, torch.softmax(logits / temperature, dim=-1))
    hot = logits_to_probs(logits, SamplingParams(temperature=10.0))
    cold = logits_to_probs(logits, SamplingParams(temperature=0.1))
    assert hot.max() < 0.4 and cold.max() > 0.99


def test_output_is_float32_for_half_logits():
    probs = logits_to_probs(torch.randn(3, 7, dtype=torch.bfloat16), SamplingParams(temperature=0.7))
    assert probs.dtype == torch.float32 and probs.shape == (3, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 5, 49):
        probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=k))
        assert (probs > 0).sum(-1).tolist() == [k] * 4
        kept = probs > 0
        assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(k).indices, True))
        torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_top_k_renormalises_the_kept_tokens():
    probs = probs_of([0.4, 0.3, 0.2, 0.1], top_k=2)
    torch.testing.assert_close(probs, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_top_k_keeps_ties_with_the_kth_token():
    probs = probs_of([0.3, 0.3, 0.3, 0.1], top_k=2)
    torch.testing.assert_close(probs, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_top_k_larger_than_vocab_is_off():
    torch.testing.assert_close(probs_of([0.4, 0.3, 0.2, 0.1], top_k=10), torch.tensor([0.4, 0.3, 0.2, 0.1]))


@pytest.mark.parametrize("top_p, kept", [
    (0.05, [0]), (0.45, [0]), (0.51, [0, 1]), (0.79, [0, 1]), (0.81, [0, 1, 2]), (0.96, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_minimal_nucleus(top_p, kept):
    # probabilities out of order, to check the nucleus follows the sorted mass, not the index
    order = [2, 0, 3, 1]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    shuffled = torch.empty(4).scatter_(0, torch.tensor(order), probs)
    got = logits_to_probs(shuffled.log(), SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    kept_ids = torch.tensor([order[i] for i in kept])
    expected[kept_ids] = shuffled[kept_ids] / shuffled[kept_ids].sum()
    torch.testing.assert_close(got, expected)


def test_top_p_applies_after_top_k():
    # after top-k=2 the top token has mass 4/7 >= 0.5, so top-p keeps it alone;
    # measured on the unfiltered distribution (0.4 < 0.5) it would keep two
    torch.testing.assert_close(probs_of([0.4, 0.3, 0.2, 0.1], top_k=2, top_p=0.5), torch.tensor([1.0, 0, 0, 0]))


def test_top_p_applies_after_temperature():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    # at temperature 0.5 the probabilities are 25:9:4, so the top token alone already has 25/38 > 0.6
    got = logits_to_probs(logits, SamplingParams(temperature=0.5, top_p=0.6))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0]))


def test_greedy_is_the_one_hot_argmax_and_refuses_filters():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1))
    params = SamplingParams()
    assert params.greedy
    probs = logits_to_probs(logits, params)
    assert probs.shape == (2, 3, 11) and probs.dtype == torch.float32
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 11).float())
    assert not SamplingParams(temperature=0.1).greedy
    for filters, named in (({"top_k": 3}, "top_k=3"), ({"top_p": 0.2}, "top_p=0.2")):  # they would change nothing
        with pytest.raises(GenerationSettingsError, match=f"{named} has no effect with greedy decoding"):
            logits_to_probs(logits, SamplingParams(temperature=0.0, **filters))


def test_a_tiny_temperature_is_the_greedy_limit():
    """1e-300 overflows logits / T; the shifted computation gives the limit: a one-hot, ties split evenly."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.999]])
    for temperature in (1e-300, 5e-324, 1e-30, 1e-12):
        probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
        assert probs.tolist() == [[0.0, 0.5, 0.0, 0.5, 0.0]]


def test_greedy_ties_take_the_first_token():
    assert logits_to_probs(torch.tensor([0.0, 2.0, 2.0]), SamplingParams()).tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("settings, named", [
    ({"temperature": -0.1}, "temperature=-0.1"),
    ({"temperature": math.inf}, "temperature=inf"),
    ({"temperature": math.nan}, "temperature=nan"),
    ({"top_k": -1}, "top_k=-1"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0 .*, not float 2.5"),
    ({"temperature": "hot"}, "temperature must be a number >= 0 .*, not str 'hot'"),
    ({"temperature": True}, "temperature must be a number >= 0 .*, not bool True"),
    ({"top_p": None}, "top_p must be a number in \\(0, 1\\] .*, not None"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_p": math.nan}, "top_p=nan"),
])
def test_validate_names_the_value_and_the_range(settings, named):
    params = SamplingParams(**settings)
    with pytest.raises(GenerationSettingsError, match=named) as error:
        params.validate()
    assert any(bound in str(error.value) for bound in (">= 0", "(0, 1]"))
    with pytest.raises(GenerationSettingsError):
        logits_to_probs(torch.zeros(3), params)


@pytest.mark.parametrize("seed, named", [(2**64, "seed=18446744073709551616 is invalid"), (-1, "seed=-1 is invalid"),
                                         ("7", "seed must be an integer .*, not str '7'"), (1.0, "not float 1.0")])
def test_seed_must_be_a_generator_seed(seed, named):
    with pytest.raises(GenerationSettingsError, match=named):
        SamplingParams(seed=seed).validate()


def test_valid_settings_pass():
    for params in (SamplingParams(), SamplingParams(temperature=1.5, top_k=40, top_p=1.0, seed=3),
                   SamplingParams(temperature=0.7, top_p=1e-6)):
        params.validate()


def test_sample_shapes_and_determinism():
    probs = torch.softmax(torch.randn(2, 3, 9), dim=-1)
    first = sample(probs, torch.Generator().manual_seed(5))
    assert first.shape == (2, 3) and first.dtype == torch.long
    assert torch.equal(first, sample(probs, torch.Generator().manual_seed(5)))
    assert sample(torch.tensor([0.0, 0.0, 1.0]), None).shape == ()


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    draws = sample(probs.expand(20000, 4), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / 20000
    assert frequencies[2] == 0
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)
