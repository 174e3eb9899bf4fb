"""Bad input through the CLI (one line, exit 1, no traceback) and the API (a typed MTPRuntimeError), NaN/Inf
detection, real Ctrl-C while streaming, threads sharing one runtime, and no state kept between calls.

`python tests/test_reliability.py` prints the table of bad inputs and what each produced (RELIABILITY.md).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mtp_runtime
from builders import build_mostly_right
from mtp_runtime import engine as engine_module
from mtp_runtime.cli import main
from mtp_runtime.errors import (
    CacheCapacityError, CheckpointError, ConfigError, DeviceError, GenerationSettingsError, MTPRuntimeError,
    NoMTPModulesError, NumericalError, TokenizerError,
)
from mtp_runtime.model.flash import flash_attn_func
from mtp_runtime.train.corpus import train_tokenizer

@dataclass
class BadInput:
    """One bad input: `make(tiny, tmp)` prepares it and returns the CLI arguments after `generate`."""

    name: str
    make: Callable[[Path, Path], list[str]]
    error: type[MTPRuntimeError]
    fragment: str


def _copy(tiny: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    return folder


def _edit_config(edit: Callable[[dict], None]):
    def make(tiny, tmp):
        folder = _copy(tiny, tmp)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return ["x", "--model", folder]
    return make


def _edit_weights(edit: Callable[[Path], None]):
    def make(tiny, tmp):
        folder = _copy(tiny, tmp)
        edit(folder / "model.safetensors")
        return ["x", "--model", folder]
    return make


def _edit_tensors(edit: Callable[[dict], None]):
    def change(path: Path):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return _edit_weights(change)


def _write(path_name: str, text: str):
    def make(tiny, tmp):
        folder = _copy(tiny, tmp)
        (folder / path_name).write_text(text)
        return ["x", "--model", folder]
    return make


def _shard_index_naming_missing_file(tiny, tmp):
    folder = _copy(tiny, tmp)
    names = list(load_file(folder / "model.safetensors"))
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in names}}
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["x", "--model", folder]


def _no_tokenizer(tiny, tmp):
    folder = _copy(tiny, tmp)
    (folder / "tokenizer.json").unlink()
    return ["hello", "--model", folder]


def _no_mtp(tiny, tmp):
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    folder = build_mostly_right(tmp / "no_mtp", vocab=vocab, num_mtp=0)
    shutil.copy(tiny / "tokenizer.json", folder)
    return ["x", "--model", folder, "--draft", "chain"]


def _infinite_weight(tiny, tmp):
    def poison(tensors):
        tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"][0, 0] = float("inf")
    return _edit_tensors(poison)(tiny, tmp)


def _args(*args):
    return lambda tiny, tmp: ["x", "--model", tiny, *args]


BAD_INPUTS = [
    BadInput("model folder missing", lambda tiny, tmp: ["x", "--model", tmp / "absent"], ConfigError,
             "does not exist"),
    BadInput("model path is a file", lambda tiny, tmp: ["x", "--model", tiny / "config.json"], ConfigError,
             "not a folder"),
    BadInput("no config.json", lambda tiny, tmp: ["x", "--model", tmp], ConfigError, "config.json"),
    BadInput("config.json is not JSON", _write("config.json", "{not json"), ConfigError, "JSON"),
    BadInput("unsupported model_type", _edit_config(lambda c: c.update(model_type="llama")), ConfigError,
             "model_type"),
    BadInput("required field missing", _edit_config(lambda c: c.pop("hidden_size")), ConfigError, "hidden_size"),
    BadInput("field of the wrong type", _edit_config(lambda c: c.update(num_attention_heads="four")), ConfigError,
             "num_attention_heads"),
    BadInput("no safetensors files", _edit_weights(lambda p: p.unlink()), CheckpointError, "safetensors"),
    BadInput("truncated safetensors", _edit_weights(lambda p: p.write_bytes(p.read_bytes()[:-100])),
             CheckpointError, "model.safetensors"),
    BadInput("corrupt safetensors header", _edit_weights(lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0\0{garbage}"
                                                                                 + b" " * 64)),
             CheckpointError, "model.safetensors"),
    BadInput("index names a missing shard", _shard_index_naming_missing_file, CheckpointError,
             "model-00001-of-00002.safetensors"),
    BadInput("missing tensor", _edit_tensors(lambda t: t.pop("model.norm.weight")), CheckpointError,
             "model.norm.weight"),
    BadInput("unexpected tensor", _edit_tensors(lambda t: t.update(extra=torch.zeros(2))), CheckpointError, "extra"),
    BadInput("wrong shape", _edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(5)})),
             CheckpointError, "model.norm.weight"),
    BadInput("wrong dtype", _edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(32).to(torch.int32)})),
             CheckpointError, "model.norm.weight"),
    BadInput("drafting without MTP modules", _no_mtp, NoMTPModulesError, "train --mtp-only"),
    BadInput("text prompt without tokenizer", _no_tokenizer, TokenizerError, "tokenizer"),
    BadInput("empty prompt", lambda tiny, tmp: ["", "--model", tiny], GenerationSettingsError, "empty"),
    BadInput("prompt + max_new_tokens over the positions", _args("--max-new-tokens", "600"), CacheCapacityError,
             "512 positions"),
    BadInput("negative temperature", _args("--temperature", "-0.5"), GenerationSettingsError, "temperature"),
    BadInput("top-p outside (0, 1]", _args("--top-p", "1.5"), GenerationSettingsError, "top_p"),
    BadInput("top-k < 0", _args("--top-k", "-1"), GenerationSettingsError, "top_k"),
    BadInput("max_new_tokens <= 0", _args("--max-new-tokens", "0"), GenerationSettingsError, "max_new_tokens"),
    BadInput("unknown draft mode", _args("--draft", "sideways"), GenerationSettingsError, "draft"),
    BadInput("malformed tree spec", _args("--tree", "3,,x"), GenerationSettingsError, "tree"),
    BadInput("num_draft_tokens out of range", _args("--draft", "chain", "--num-draft-tokens", "99"),
             GenerationSettingsError, "num_draft_tokens"),
    BadInput("unsupported dtype", _args("--dtype", "int8"), DeviceError, "dtype"),
    BadInput("NaN/Inf in the weights", _infinite_weight, NumericalError, "model.layers.1.self_attn"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(BadInput("--device cuda without CUDA", _args("--device", "cuda"), DeviceError, "CUDA"))
if flash_attn_func is None:
    BAD_INPUTS.append(BadInput("flash-attn requested, not installed", _args("--attention", "flash"), DeviceError,
                               "flash-attn"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny"))


def _tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer trained on a few lines of code; returns its vocabulary size."""
    text = folder / "snippets.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 8, encoding="utf-8")
    size = train_tokenizer([text], 300, folder / "tokenizer.json").get_vocab_size()
    text.unlink()
    return size


def _tiny(folder: Path) -> Path:
    """A checkpoint (512 positions) with 2 mostly-right MTP modules and a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(folder)
    return build_mostly_right(folder, vocab=vocab, num_mtp=2, seed=3)


def run_cli(args: list) -> object:
    return CliRunner().invoke(main, ["generate", *[str(a) for a in args]])


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_bad_input_is_one_line_cli_error_and_typed_api_error(bad, tiny, tmp_path):
    args = bad.make(tiny, tmp_path)
    result = run_cli(args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad.fragment in lines[0], result.stderr
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(main, ["--debug", "generate", *[str(a) for a in args]])
    assert type(debug.exception) is bad.error, repr(debug.exception)


def test_nan_in_an_mtp_module_names_it(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"][:] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    runtime = mtp_runtime.load(folder)
    assert runtime.generate(input_ids=[1, 2, 3], max_new_tokens=4, draft="none").token_ids  # the trunk is fine
    with pytest.raises(NumericalError, match=r"MTP module 1 \(checkpoint layer model.layers.2\)"):
        runtime.generate(input_ids=[1, 2, 3], max_new_tokens=4, draft="chain")


def test_overflow_in_half_precision_is_caught(tiny):
    runtime = mtp_runtime.load(tiny, dtype="float16")
    with torch.no_grad():
        runtime.model.model.layers[0].mlp.up_proj.weight.mul_(1e4)  # activations overflow float16's 65504
    with pytest.raises(NumericalError, match="model.layers.0.mlp"):
        runtime.generate(input_ids=[1, 2, 3], max_new_tokens=4)


def test_two_threads_share_one_runtime(tiny):
    runtime = mtp_runtime.load(tiny)
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 6, 7, 8], [30, 31]]
    drafts = ["chain", "tree", "none", "dynamic"]
    expected = [runtime.generate(input_ids=p, max_new_tokens=40, draft=d).token_ids for p, d in zip(prompts, drafts)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = runtime.generate(input_ids=prompts[i], max_new_tokens=40, draft=drafts[i]).token_ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(prompts))] == expected


def test_same_seed_same_sample(tiny):
    runtime = mtp_runtime.load(tiny)
    runs = [runtime.generate(input_ids=[1, 2, 3], max_new_tokens=30, temperature=1.0, seed=11, draft="tree").token_ids
            for _ in range(2)]
    other = runtime.generate(input_ids=[1, 2, 3], max_new_tokens=30, temperature=1.0, seed=12, draft="tree")
    assert runs[0] == runs[1] != other.token_ids


def test_no_engine_or_cache_outlives_a_call(tiny, monkeypatch):
    """Nothing from a call stays reachable (so repeated calls cannot grow memory); RSS is measured by
    `mtp-runtime bench --soak`."""
    runtime = mtp_runtime.load(tiny)
    engines = []
    original = engine_module.Engine.run

    def tracked(self, prompts):
        engines.append(weakref.ref(self))
        yield from original(self, prompts)

    monkeypatch.setattr(engine_module.Engine, "run", tracked)
    for draft in ("chain", "dynamic"):
        runtime.generate(input_ids=[1, 2, 3], max_new_tokens=512 - 3, draft=draft)  # up to the position limit
        stream = runtime.generate(input_ids=[4, 5], max_new_tokens=50, draft=draft, stream=True)
        next(iter(stream))  # abandoned mid-way
        del stream
    gc.collect()
    assert len(engines) == 4 and all(ref() is None for ref in engines)


def test_ctrl_c_while_streaming_prints_the_text_so_far(tmp_path):
    """A real SIGINT to the installed command while it streams from the shipped model."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "mtp_runtime.cli", "generate", "def main():", "--max-new-tokens", "400",
               "--ignore-eos", "--threads", "1"]
    # a shell's background job inherits SIGINT ignored (and Python then keeps it ignored); restore the default
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=restore_sigint)
    first = proc.stdout.read(1)  # generation has started
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert first and (first + rest).endswith(b"\n")
    assert b"Traceback" not in err and b"Aborted" not in err


def bad_input_table(tmp: Path) -> str:
    """Markdown: each bad input, the CLI's one-line error and exit code, and the API's exception class."""
    tiny = _tiny(tmp / "tiny")
    rows = ["| bad input | exit | CLI message (stderr) | API exception |", "|---|---|---|---|"]
    for i, bad in enumerate(BAD_INPUTS):
        case = tmp / f"case{i}"
        case.mkdir()
        args = bad.make(tiny, case)
        result = run_cli(args)
        debug = CliRunner().invoke(main, ["--debug", "generate", *[str(a) for a in args]])
        message = result.stderr.strip().replace(str(tmp), "<tmp>").replace("|", "\\|")
        rows.append(f"| {bad.name} | {result.exit_code} | `{message}` | {type(debug.exception).__name__} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(bad_input_table(Path(tmp)))
