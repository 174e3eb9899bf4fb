"""Tokenizer loading and incremental detokenisation with stop strings that never leak past the stop."""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError
from .validate import printable, read_json


def load_tokenizer(folder: Path):
    """A transformers fast tokenizer from folder/tokenizer.json (with the folder's chat template, if it has one), or
    None when the folder has no tokenizer.json."""
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    special = _special_tokens(Path(folder))
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False,
                                       chat_template=_chat_template(Path(folder)), **special)
    except Exception as exc:  # tokenizers raises its own exception types for malformed files
        raise _tokenizer_error(file, exc) from None


def _tokenizer_error(file: Path, exc: Exception) -> TokenizerError:
    """Why tokenizers could not load `file`: not JSON, JSON but not a tokenizer, or a tokenizer it rejects."""
    raw = read_json(file, TokenizerError, "re-export the tokenizer")  # raises when it is not JSON
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return TokenizerError(f"{file}: valid JSON but not a tokenizer (no \"model\" object, as tokenizers' "
                              "Tokenizer.save writes); re-export the tokenizer")
    reason = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return TokenizerError(f"{file}: cannot be loaded as a tokenizer ({reason}); re-export the tokenizer")


def _special_tokens(folder: Path) -> dict:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return {}
    raw = read_json(config, TokenizerError, "fix or delete it")
    if not isinstance(raw, dict):
        raise TokenizerError(f"{config}: expected a JSON object; fix or delete it")
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {k: raw[k] for k in keys if isinstance(raw.get(k), str)}


def _chat_template(folder: Path) -> str | list | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's chat_template; None without one."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    raw = read_json(config, TokenizerError, "fix or delete it")
    template = raw.get("chat_template") if isinstance(raw, dict) else None
    return template if isinstance(template, (str, list)) else None


class TextStream:
    """Text of one sequence, released as it becomes final (no half characters, no partial stop strings).

    Decoding is incremental: each call decodes only the tokens since the text last ended on a whole character,
    plus the few tokens before them as context (a tokenizer may decode a token differently at the very start), so
    n tokens cost O(n) decoding in all. The final text is kept in pieces, its last few characters at hand for the
    stop-string and held-back checks."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.released = 0
        self.stop_at: int | None = None
        self._pieces: list[str] = []
        """The text of tokens[:_read], final (it ends on a whole character)."""
        self._length = 0
        self._recent = ""
        """The last characters of that text: enough for any stop string to start in them."""
        self._keep = max(map(len, stop_strings), default=0) + 4
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        """decode(tokens[_prefix:_read]): the context the next tokens are decoded after."""

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def find_stop(self, text: str) -> int | None:
        """Index where the earliest stop string starts in text, if any."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def push(self, tokens: list[int]) -> str:
        """Newly final text given all tokens generated so far."""
        if self.tokenizer is None:
            return ""
        tail = self._tail(tokens)
        window = self._recent + tail
        total = self._length + len(tail)
        end = self.stop_at if self.stop_at is not None else total - self._held_back(window)
        start = self.released
        chunk = window[start - (total - len(window)): end - (total - len(window))] if end > start else ""
        self.released = max(self.released, end)
        self._advance(tokens, tail)
        return chunk

    def final(self, tokens: list[int]) -> str:
        text = "".join(self._pieces) + self._tail(tokens)
        return text[: self.stop_at] if self.stop_at is not None else text

    def cut_at_stop(self, tokens: list[int]) -> int | None:
        """How many of tokens (which extend those pushed so far) to keep when their text completes a stop string:
        the fewest whose text holds one (and stop_at becomes where it starts); None when none is complete."""
        if self._stop_in(tokens) is None:
            return None
        keep = next(k for k in range(self._read + 1, len(tokens) + 1) if self._stop_in(tokens[:k]) is not None)
        self.stop_at = self._stop_in(tokens[:keep])
        return keep

    def _stop_in(self, tokens: list[int]) -> int | None:
        """Where a stop string starts in the text of tokens, searching only the text not yet final and the few
        final characters before it (a stop string in the older text would have ended the sequence already)."""
        tail = self._tail(tokens)
        window = self._recent + tail
        at = self.find_stop(window)
        return None if at is None else self._length + len(tail) - len(window) + at

    def _tail(self, tokens: list[int]) -> str:
        """The text of tokens[_read:], decoded after its context."""
        return self.decode(tokens[self._prefix:])[len(self._prefix_text):]

    def _advance(self, tokens: list[int], tail: str) -> None:
        """Make tail final once it ends on a whole character (or is empty: special tokens); the tokens behind it
        become the next context."""
        if tail.endswith("\ufffd"):
            return
        if tail:
            self._pieces.append(tail)
            self._length += len(tail)
            self._recent = (self._recent + tail)[-self._keep:]
        self._prefix, self._read = self._read, len(tokens)
        self._prefix_text = self.decode(tokens[self._prefix: self._read])

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still change: undecoded bytes, and a stop string's beginning before
        them."""
        whole = text.rstrip("\ufffd")
        partial = len(text) - len(whole)
        hold = partial
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(whole)), 0, -1):
                if whole.endswith(stop[:k]):
                    hold = max(hold, partial + k)
                    break
        return hold


class StopStrings:
    """The engine's stop checker: cuts a sequence at the first token whose text completes a stop string."""

    def __init__(self, streams: list[TextStream]):
        self.streams = streams

    def __call__(self, seq: int, tokens: list[int]) -> int | None:
        return self.streams[seq].cut_at_stop(tokens)
