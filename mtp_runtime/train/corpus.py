"""The training corpus: a deterministic file list, a held-out split of whole files, a byte-level BPE tokenizer."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MTPRuntimeError

EOS = "<|endoftext|>"
THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}  # installed packages are not the standard library


def default_corpus_roots() -> list[Path]:
    """The Python source of the running interpreter's standard library."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def list_files(roots: list[Path], suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    """Sorted, de-duplicated text files under roots (a file root is taken whatever its suffix)."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob("*")
                         if p.is_file() and p.suffix in suffixes and not THIRD_PARTY_DIRS & set(p.parts))
        else:
            raise MTPRuntimeError(f"corpus path {root} does not exist; give text files or folders")
    if not found:
        raise MTPRuntimeError(f"no {'/'.join(suffixes)} files under {', '.join(map(str, roots))}")
    return sorted(found)


def is_held_out(path: Path, root: Path | None, percent: int) -> bool:
    """A whole file is held out when a stable hash of its (root-relative) path falls under `percent`."""
    name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass
class Split:
    train: list[Path]
    held_out: list[Path]


def split_files(files: list[Path], roots: list[Path], percent: int) -> Split:
    root = Path(roots[0]).resolve() if len(roots) == 1 and Path(roots[0]).is_dir() else None
    held = [f for f in files if is_held_out(f, root, percent)]
    held_set = set(held)
    return Split(train=[f for f in files if f not in held_set], held_out=held)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def train_tokenizer(files: list[Path], vocab_size: int, out_file: Path):
    """Byte-level BPE (round-trips any text exactly) trained on files, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((t for t in map(read_text, files) if t), trainer)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_file))
    write_tokenizer_config(out_file.parent)
    return tokenizer


def write_tokenizer_config(folder: Path) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def encode_files(tokenizer, files: list[Path]) -> np.ndarray:
    """All files' token ids, each followed by the end-of-text token, as one uint16/int32 array."""
    eos = tokenizer.token_to_id(EOS)
    texts = [t for t in map(read_text, files) if t]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    dtype = np.uint16 if tokenizer.get_vocab_size() < 65536 else np.int32
    return np.asarray(ids, dtype=dtype)
