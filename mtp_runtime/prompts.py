"""Benchmark prompts: cut deterministically from the training corpus's held-out files, or read from a file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MTPRuntimeError
from .validate import check_text

PROMPT_LINES = 30
"""Lines taken from the top of each held-out file."""
MIN_FILE_LINES = 40
"""Files shorter than this are skipped, so that every prompt has a real continuation."""
HELD_OUT_PERCENT = 5


def default_prompts(n: int = 8, lines: int = PROMPT_LINES, roots: list[Path] | None = None,
                    percent: int = HELD_OUT_PERCENT) -> list[str]:
    """The first `lines` lines of the first n held-out corpus files (sorted) with at least MIN_FILE_LINES lines.

    roots default to the training corpus's default (the interpreter's standard library); `percent` must be the
    held-out percentage training used, so that no prompt was seen in training.
    """
    from .train.corpus import default_corpus_roots, list_files, read_text, split_files

    if n < 1:
        raise MTPRuntimeError(f"num_prompts={n} must be at least 1")
    roots = [Path(r) for r in roots] if roots else default_corpus_roots()
    held_out = split_files(list_files(roots), roots, percent).held_out
    prompts = []
    for path in held_out:
        text = read_text(path)
        body = text.splitlines(keepends=True) if text else []
        if len(body) < max(MIN_FILE_LINES, lines + 1) or not "".join(body[:lines]).strip():
            continue
        prompts.append("".join(body[:lines]))
        if len(prompts) == n:
            return prompts
    raise MTPRuntimeError(
        f"only {len(prompts)} held-out file(s) of at least {MIN_FILE_LINES} lines under "
        f"{', '.join(map(str, roots))}; ask for fewer prompts or pass --prompts FILE")


def training_corpus(model_folder: str | Path | None) -> tuple[list[Path] | None, int]:
    """Corpus roots and held-out percent recorded in a model's training.json; (None, 5) means the defaults."""
    file = Path(model_folder) / "training.json" if model_folder is not None else None
    if file is None or not file.is_file():
        return None, HELD_OUT_PERCENT
    try:
        settings = json.loads(file.read_text(encoding="utf-8")).get("settings", {})
    except (ValueError, AttributeError):
        return None, HELD_OUT_PERCENT
    roots = [Path(p) for p in settings.get("corpus") or []]
    if not all(root.exists() for root in roots):  # trained elsewhere: fall back to this interpreter's stdlib
        roots = []
    return (roots or None), int(settings.get("held_out_percent", HELD_OUT_PERCENT))


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (a "prompt" field per line) or text (blocks separated by blank lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MTPRuntimeError(f"cannot read prompts from {path}: {exc}") from None
    prompts = _jsonl_prompts(path, text) if path.suffix == ".jsonl" else _text_blocks(text)
    if not prompts:
        raise MTPRuntimeError(f"{path}: no prompts found")
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"{path}: prompt {i}", MTPRuntimeError)
    return prompts


def _jsonl_prompts(path: Path, text: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MTPRuntimeError(f"{path}:{number}: not valid JSON ({exc})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise MTPRuntimeError(f"{path}:{number}: expected an object with a non-empty \"prompt\" string")
        prompts.append(prompt)
    return prompts


def _text_blocks(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks
