"""Opening a checkpoint folder: one model.safetensors or index-listed shards, and their headers."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from ..validate import printable, read_json
from .names import LAYER_RE, sources_by_our_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where a raw tensor lives and what its header says about it."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


@contextmanager
def opened(path: Path) -> Iterator[Any]:
    """safe_open a file, turning safetensors' errors into CheckpointError."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({printable(str(exc))}); re-download or re-save it") from None
    with handle:
        yield handle


def _is_file(path: Path) -> bool:
    """Path.is_file, False also where the OS refuses the name (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


class CheckpointFiles:
    """An opened checkpoint folder: one model.safetensors, or shards listed by model.safetensors.index.json."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder}: weights folder not found; pass the folder holding {SINGLE_FILE} or {INDEX_FILE}")
        index_map = self._index_map() if not (self.folder / SINGLE_FILE).is_file() else None
        self.files: list[Path] = self._shard_paths(index_map)
        self._entries: dict[str, TensorInfo] = {}
        for path in self.files:
            self._read_header(path)
        if index_map is not None:
            self._check_index(index_map)
        self._our_names_cache: dict[int, set[str]] = {}

    def _index_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            raise CheckpointError(
                f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found; "
                "save the weights with save_pretrained(safe_serialization=True)")
        data = read_json(index, CheckpointError, "re-download or regenerate the index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: no \"weight_map\" object of tensor name -> shard file; regenerate the index")
        return weight_map

    def _shard_paths(self, index_map: dict[str, str] | None) -> list[Path]:
        if index_map is None:
            return [self.folder / SINGLE_FILE]
        names = sorted(set(index_map.values()))
        for name in names:
            if name in ("", ".", "..") or "/" in name or not name.isprintable() or len(name) > 255:
                raise CheckpointError(f"{self.folder / INDEX_FILE}: names shard {name[:80]!r}, which is not a file "
                                      "name inside the folder; regenerate the index")
        paths = [self.folder / name for name in names]
        for path in paths:
            if not _is_file(path):
                raise CheckpointError(
                    f"{self.folder / INDEX_FILE}: names shard {path.name} which is missing; "
                    "download the missing shard or regenerate the index")
        return paths

    def _read_header(self, path: Path) -> None:
        with opened(path) as handle:
            for name in handle.keys():
                if name in self._entries:
                    raise CheckpointError(
                        f"{path}: tensor {printable(name)} is also stored in {self._entries[name].path.name}; "
                        "remove the duplicate shard")
                info = handle.get_slice(name)
                self._entries[name] = TensorInfo(path, tuple(info.get_shape()), info.get_dtype())

    def _check_index(self, index_map: dict[str, str]) -> None:
        absent = [name for name in index_map if name not in self._entries]
        if absent:
            raise CheckpointError(
                f"{self.folder / INDEX_FILE}: {len(absent)} tensor(s) it lists are in no shard "
                f"(first: {printable(absent[0])} -> {index_map[absent[0]]}); "
                "re-download the shards or regenerate the index")

    def raw_names(self) -> set[str]:
        """Every tensor name stored in the checkpoint (from the headers only)."""
        return set(self._entries)

    def __contains__(self, raw: str) -> bool:
        return raw in self._entries

    def entry(self, raw: str) -> TensorInfo:
        """File, shape and safetensors dtype string of one raw tensor."""
        return self._entries[raw]

    def mtp_layer_count(self, num_hidden_layers: int) -> int:
        """Number of contiguous layer indices N, N+1, ... present among the raw names."""
        indices = {int(m[1]) for name in self._entries if (m := LAYER_RE.fullmatch(name))}
        count = 0
        while num_hidden_layers + count in indices:
            count += 1
        return count

    def has_our_name(self, name: str, num_hidden_layers: int) -> bool:
        """Whether loading would produce `name` (our naming) from the raw tensors."""
        if num_hidden_layers not in self._our_names_cache:
            self._our_names_cache[num_hidden_layers] = set(sources_by_our_name(self, num_hidden_layers))
        return name in self._our_names_cache[num_hidden_layers]
