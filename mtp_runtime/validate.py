"""Checks every layer shares: strict integers and numbers, short reprs of bad values, JSON files read with one-line
errors, and text that is valid Unicode.

Only `errors` is imported, so config.py, the checkpoint readers and the request builder can all use these.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from .errors import GenerationSettingsError, MTPRuntimeError

SHOW_LIMIT = 60
"""Characters of a bad value shown in an error message."""


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An integer (Python's or numpy's; never a bool) within [low, high] where they are given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def is_number(value: Any) -> bool:
    """A real number (int, float or numpy's; never a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """value as a finite float, or None when it is not a number (bools are not), overflows or is NaN/Inf."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def show(value: Any, limit: int = SHOW_LIMIT) -> str:
    """repr of a value, shortened so that a garbage value cannot flood an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """text with control characters escaped, so that a tensor name or a library's message cannot break a line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def wrong_type(name: str, value: Any, expected: str,
               error: type[MTPRuntimeError] = GenerationSettingsError) -> MTPRuntimeError:
    """The error for an argument of the wrong type: 'temperature must be a number >= 0, not str 'hot''."""
    got = "None" if value is None else f"{type(value).__name__} {show(value)}"
    return error(f"{name} must be {expected}, not {got}")


def read_json(path: Path, error: type[MTPRuntimeError], fix: str) -> Any:
    """The parsed JSON of a file; any failure is `error` naming the file, the reason and `fix` (one line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}); {fix}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply); {fix}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal of more than 4300 digits
        reason = "an integer with too many digits" if "integer string conversion" in str(exc) else exc
        raise error(f"{path}: not valid JSON ({reason}); {fix}") from None


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in text (what invalid UTF-8 or a broken escape decodes to), if any."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(text: str, what: str, error: type[MTPRuntimeError] = GenerationSettingsError) -> str:
    """text itself when it is valid Unicode; otherwise `error` naming `what` and where it breaks."""
    at = lone_surrogate(text)
    if at is not None:
        raise error(f"{what} is not valid text: character {at} is the lone surrogate {text[at]!r} (invalid UTF-8 "
                    "or a broken \\ud8xx escape); pass UTF-8 text")
    return text
