"""Incremental detokenisation (TextStream) and stop strings (StopStrings) on the shipped byte-level BPE tokenizer:
the text released equals a full decode, no half character is ever released, a stop string cuts exactly where a
naive decode-everything search cuts, and the decoding work grows linearly with the length."""

from __future__ import annotations

import random

import pytest

import mtp_runtime
from mtp_runtime.text import StopStrings, TextStream, load_tokenizer

TEXT = ("def café(x):\n    return '🐍 中文 naïve' + str(x)  # ünïcödé\n\n" * 3
        + "for i in range(10):\n    print(i, '—', i * 2)\n")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(mtp_runtime.DEFAULT_MODEL)


class CountingTokenizer:
    """The tokenizer, counting the tokens each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, tokens, **kwargs):
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kwargs)


def _steps(tokens: list[int], seed: int) -> list[int]:
    """Cut points: tokens arrive 1-5 at a time, as verify steps emit them."""
    rng, cuts, at = random.Random(seed), [], 0
    while at < len(tokens):
        at = min(len(tokens), at + rng.randint(1, 5))
        cuts.append(at)
    return cuts


@pytest.mark.parametrize("seed", range(4))
def test_pushed_text_is_the_full_decode_and_never_half_a_character(tokenizer, seed):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tokenizer)
    chunks = [stream.push(tokens[:cut]) for cut in _steps(tokens, seed)]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + stream.final(tokens)[stream.released:] == tokenizer.decode(tokens) == TEXT


def test_decoding_work_is_linear_in_the_length(tokenizer):
    tokens = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ("never appears",))
    stops = StopStrings([stream])
    for cut in _steps(tokens, 0):
        keep = stops(0, tokens[:cut])
        assert keep is None
        stream.push(tokens[:cut])
    assert stream.final(tokens) == TEXT * 20
    # each token is decoded a bounded number of times (O(n) in all; decoding everything per step is O(n^2))
    assert counting.decoded <= 12 * len(tokens), (counting.decoded, len(tokens))


def _naive_cut(tokenizer, stops: tuple[str, ...], before: int, tokens: list[int]) -> tuple[int, int] | None:
    """(tokens kept, where the stop starts) by decoding every prefix from scratch."""
    for k in range(before + 1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return k, min(hits)
    return None


@pytest.mark.parametrize("stop", ["\n\n", "🐍", "中文 n", "return", "(10):\n    pr", "—"])
@pytest.mark.parametrize("seed", range(3))
def test_a_stop_string_cuts_where_decoding_everything_cuts(tokenizer, stop, seed):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tokenizer, (stop,))
    stops = StopStrings([stream])
    before, released = 0, ""
    for cut in _steps(tokens, seed):
        expected = _naive_cut(tokenizer, (stop,), before, tokens[:cut])
        keep = stops(0, tokens[:cut])
        if expected is not None:
            assert (keep, stream.stop_at) == expected
            released += stream.push(tokens[:keep])
            break
        assert keep is None
        released += stream.push(tokens[:cut])
        before = cut
    else:
        pytest.fail(f"{stop!r} never fired")
    final = stream.final(tokens[:keep])
    assert final == TEXT[:TEXT.index(stop)] and final.startswith(released) and stop not in released


def test_special_tokens_cost_no_more_decoding(tokenizer):
    """A run of end-of-text tokens (ignore_eos) decodes to nothing; the stream still moves on past them."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = tokenizer.encode("x = 1\n", add_special_tokens=False) + [eos] * 400
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting)
    for cut in range(1, len(tokens) + 1):
        stream.push(tokens[:cut])
    assert stream.final(tokens) == "x = 1\n" and counting.decoded <= 8 * len(tokens)
