"""Tokenizer loading and incremental detokenisation with stop strings that never leak past the stop."""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError


def load_tokenizer(folder: Path):
    """A transformers fast tokenizer from folder/tokenizer.json (with the folder's chat template, if it has one), or
    None when the folder has no tokenizer.json."""
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False,
                                       chat_template=_chat_template(Path(folder)), **_special_tokens(Path(folder)))
    except Exception as exc:  # tokenizers raises its own exception types for malformed files
        raise TokenizerError(f"{file}: cannot be loaded ({exc}); re-export the tokenizer") from None


def _special_tokens(folder: Path) -> dict:
    import json

    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return {}
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        raise TokenizerError(f"{config}: not valid JSON; fix or delete it") from None
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {k: raw[k] for k in keys if isinstance(raw.get(k), str)}


def _chat_template(folder: Path) -> str | list | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's chat_template; None without one."""
    import json

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        raise TokenizerError(f"{config}: not a valid JSON object; fix or delete it") from None
    return template if isinstance(template, (str, list)) else None


class TextStream:
    """Text of one sequence, released as it becomes final (no half characters, no partial stop strings)."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.released = 0
        self.stop_at: int | None = None

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
        text = self.decode(tokens)
        end = self.stop_at if self.stop_at is not None else len(text) - self._held_back(text)
        chunk = text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return chunk

    def final(self, tokens: list[int]) -> str:
        text = self.decode(tokens)
        return text[: self.stop_at] if self.stop_at is not None else text

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still change: an undecoded byte, or a stop string's beginning."""
        hold = 1 if text.endswith("\ufffd") else 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return hold


class StopStrings:
    """The engine's stop checker: cuts a sequence at the first token whose text completes a stop string."""

    def __init__(self, streams: list[TextStream]):
        self.streams = streams

    def __call__(self, seq: int, tokens: list[int]) -> int | None:
        stream = self.streams[seq]
        stop = stream.find_stop(stream.decode(tokens))
        if stop is None:
            return None
        keep = next(k for k in range(1, len(tokens) + 1) if stream.find_stop(stream.decode(tokens[:k])) is not None)
        stream.stop_at = stream.find_stop(stream.decode(tokens[:keep]))
        return keep
