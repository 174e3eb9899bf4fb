"""Bad input through the CLI (one line, exit 1 (2 for a malformed command line), no traceback) and the API (a
typed MTPRuntimeError naming the argument), NaN/Inf detection, real Ctrl-C while streaming, threads sharing one
runtime, and no state kept between calls.

`python tests/test_reliability.py` prints the tables of bad inputs and what each produced (RELIABILITY.md).
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

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mtp_runtime
from builders import build_mostly_right
from helpers import make_tiny
from mtp_runtime import engine as engine_module
from mtp_runtime.cli import main
from mtp_runtime.errors import (
    CacheCapacityError, CheckpointError, ConfigError, DeviceError, GenerationSettingsError, InsufficientMemoryError,
    MTPRuntimeError, NoMTPModulesError, NumericalError, TokenizerError, TrainingSettingsError,
)
from mtp_runtime.model.flash import flash_attn_func


@dataclass
class BadInput:
    """One bad input to a command: `make(tiny, tmp)` prepares it and returns the arguments after the command."""

    name: str
    make: Callable[[Path, Path], list[str]]
    error: type[MTPRuntimeError] | None
    """What the API raises for it (under --debug, the CLI re-raises it); None: click refuses the command line
    itself (exit 2), before any of our code runs."""
    fragment: str
    command: str = "generate"

    @property
    def exit_code(self) -> int:
        return 2 if self.error is None else 1


@dataclass
class BadCall:
    """One bad argument to the Python API: `call(runtime, tiny)` makes the call."""

    name: str
    call: Callable[[mtp_runtime.Runtime, Path], object]
    error: type[MTPRuntimeError]
    fragment: str


def _copy(tiny: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    return folder


def _edit_config(edit: Callable[[dict], None], *args):
    def make(tiny, tmp):
        folder = _copy(tiny, tmp)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return ["x", "--model", folder, *args]
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


def _bench(*args):
    return lambda tiny, tmp: ["--no-compile", "--model", tiny, "--no-progress", *args]


def _prompts_file(content: bytes, *args):
    def make(tiny, tmp):
        file = tmp / "prompts.jsonl"
        file.write_bytes(content)
        return ["--no-compile", "--model", tiny, "--no-progress", "--prompts", file, *args]
    return make


def _train(*args):
    """train arguments that must fail before any data is prepared (a tiny corpus, in case one is not refused)."""
    def make(tiny, tmp):
        corpus = tmp / "corpus"
        corpus.mkdir(exist_ok=True)
        (corpus / "a.py").write_text("x = 1\n", encoding="utf-8")
        return [corpus, "--out", tmp / "run", *args]
    return make


def _train_out_is_a_file(tiny, tmp):
    (tmp / "file").write_text("")
    return [tmp / "corpus-absent", "--out", tmp / "file"]


HUGE_POSITIONS = 10**9

BAD_INPUTS = [
    # the model folder
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
    BadInput("config eos_token_id outside the vocabulary", _edit_config(lambda c: c.update(eos_token_id=10**6)),
             ConfigError, "eos_token_id"),
    BadInput("config promises more MTP modules than the weights hold",
             _edit_config(lambda c: c.update(num_nextn_predict_layers=1000)), CheckpointError,
             "num_nextn_predict_layers"),
    BadInput("config promises no MTP modules, --draft chain",
             _edit_config(lambda c: c.update(num_nextn_predict_layers=0), "--draft", "chain"), NoMTPModulesError,
             "no MTP modules"),
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
    BadInput("tokenizer.json is not JSON", _write("tokenizer.json", "{not json"), TokenizerError, "not valid JSON"),
    BadInput("tokenizer.json is JSON but not a tokenizer", _write("tokenizer.json", '{"hello": 1}'), TokenizerError,
             "not a tokenizer"),
    BadInput("NaN/Inf in the weights", _infinite_weight, NumericalError, "model.layers.1.self_attn"),
    BadInput("cache larger than the free memory (10^9 positions, max_new_tokens ~10^9)",
             _edit_config(lambda c: c.update(max_position_embeddings=HUGE_POSITIONS), "--max-new-tokens",
                          str(HUGE_POSITIONS - 10)), InsufficientMemoryError, "free"),
    # the prompt and the generation settings
    BadInput("empty prompt", lambda tiny, tmp: ["", "--model", tiny], GenerationSettingsError, "empty"),
    BadInput("prompt of invalid UTF-8 (argv)", lambda tiny, tmp: ["abc\udcff", "--model", tiny],
             GenerationSettingsError, "prompt"),
    BadInput("--stop of invalid UTF-8", _args("--stop", "\udcfe"), GenerationSettingsError, "stop"),
    BadInput("prompt + max_new_tokens over the positions", _args("--max-new-tokens", "600"), CacheCapacityError,
             "512 positions"),
    BadInput("negative temperature", _args("--temperature", "-0.5"), GenerationSettingsError, "temperature"),
    BadInput("NaN temperature", _args("--temperature", "nan"), GenerationSettingsError, "temperature"),
    BadInput("top-p outside (0, 1]", _args("--top-p", "1.5", "--temperature", "1"), GenerationSettingsError,
             "top_p"),
    BadInput("top-k < 0", _args("--top-k", "-1", "--temperature", "1"), GenerationSettingsError, "top_k"),
    BadInput("top-k with greedy decoding", _args("--top-k", "5"), GenerationSettingsError, "top_k"),
    BadInput("seed outside torch's range", _args("--seed", str(2**64)), GenerationSettingsError, "seed"),
    BadInput("max_new_tokens <= 0", _args("--max-new-tokens", "0"), GenerationSettingsError, "max_new_tokens"),
    BadInput("max-new-tokens not an integer", _args("--max-new-tokens", "ten"), None, "--max-new-tokens"),
    BadInput("unknown draft mode", _args("--draft", "sideways"), GenerationSettingsError, "draft"),
    BadInput("malformed tree spec", _args("--tree", "3,,x"), GenerationSettingsError, "tree"),
    BadInput("tree JSON nested 100,000 deep", _args("--tree", "[" * 100_000), GenerationSettingsError, "tree"),
    BadInput("num_draft_tokens out of range", _args("--draft", "chain", "--num-draft-tokens", "99"),
             GenerationSettingsError, "num_draft_tokens"),
    BadInput("num_draft_tokens with --draft none", _args("--draft", "none", "--num-draft-tokens", "3"),
             GenerationSettingsError, "num_draft_tokens"),
    BadInput("num_draft_tokens with a static tree", _args("--tree", "3,2,1", "--num-draft-tokens", "3"),
             GenerationSettingsError, "num_draft_tokens"),
    BadInput("depth with a chain", _args("--draft", "chain", "--depth", "3"), GenerationSettingsError, "depth"),
    BadInput("draft-topk with auto", _args("--draft-topk", "2"), GenerationSettingsError, "draft_topk"),
    BadInput("the old --topk", _args("--topk", "2"), None, "--draft-topk"),
    # the machine
    BadInput("unsupported dtype", _args("--dtype", "int8"), DeviceError, "dtype"),
    BadInput("--device tpu9", _args("--device", "tpu9"), DeviceError, "tpu9"),
    BadInput("--device meta", _args("--device", "meta"), DeviceError, "meta"),
    BadInput("--threads absurdly large", _args("--threads", "100000"), GenerationSettingsError, "threads"),
    BadInput("--threads 0", _args("--threads", "0"), GenerationSettingsError, "threads"),
    # bench
    BadInput("bench --plot in an unknown format", _bench("--plot", "out.nosuchfmt"), MTPRuntimeError, "nosuchfmt",
             "bench"),
    BadInput("bench --num-draft-tokens ',,'", _bench("--num-draft-tokens", ",,"), GenerationSettingsError,
             "--num-draft-tokens", "bench"),
    BadInput("bench --num-draft-tokens for tree only", _bench("--draft", "tree", "--num-draft-tokens", "2"),
             GenerationSettingsError, "--num-draft-tokens", "bench"),
    BadInput("bench --depth without dynamic", _bench("--depth", "3"), GenerationSettingsError, "--depth", "bench"),
    BadInput("bench --num-prompts 0", _bench("--num-prompts", "0"), GenerationSettingsError, "--num-prompts",
             "bench"),
    BadInput("bench prompts file with a lone surrogate", _prompts_file(b'{"prompt": "a\\ud800b"}\n'),
             MTPRuntimeError, "prompt", "bench"),
    BadInput("bench prompts file of invalid UTF-8", _prompts_file(b'{"prompt": "a\xffb"}\n'), MTPRuntimeError,
             "prompts.jsonl", "bench"),
    # train (every one refused before any data is prepared)
    BadInput("train --out naming a file", _train_out_is_a_file, TrainingSettingsError, "--out", "train"),
    BadInput("train --batch-size 0", _train("--batch-size", "0"), TrainingSettingsError, "--batch-size", "train"),
    BadInput("train --lr nan", _train("--lr", "nan"), TrainingSettingsError, "--lr", "train"),
    BadInput("train --steps 0", _train("--steps", "0"), TrainingSettingsError, "--steps", "train"),
    BadInput("train --eval-every 0", _train("--eval-every", "0"), TrainingSettingsError, "--eval-every", "train"),
    BadInput("train --max-minutes -1", _train("--max-minutes", "-1"), TrainingSettingsError, "--max-minutes",
             "train"),
    BadInput("train --vocab-size 10", _train("--vocab-size", "10"), TrainingSettingsError, "--vocab-size", "train"),
    BadInput("train --arch nonsense=3", _train("--arch", "nonsense=3"), TrainingSettingsError, "nonsense", "train"),
    BadInput("train --arch vocab_size=5", _train("--arch", "vocab_size=5"), TrainingSettingsError, "--vocab-size",
             "train"),
    BadInput("train --init without --mtp-only", lambda tiny, tmp: [*_train()(tiny, tmp), "--init", tiny],
             TrainingSettingsError, "--mtp-only", "train"),
    BadInput("train --vocab-size with --init", lambda tiny, tmp: [*_train("--mtp-only", "--vocab-size", "300")(
        tiny, tmp), "--init", tiny], TrainingSettingsError, "--vocab-size", "train"),
    BadInput("train --continuation-prompt without --continuations", _train("--continuation-prompt", "8"),
             TrainingSettingsError, "--continuation-prompt", "train"),
    BadInput("train --threads absurdly large", _train("--threads", "100000"), GenerationSettingsError, "threads",
             "train"),
    BadInput("train --device tpu9", _train("--device", "tpu9"), DeviceError, "tpu9", "train"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(BadInput("--device cuda without CUDA", _args("--device", "cuda"), DeviceError, "CUDA"))
if flash_attn_func is None:
    BAD_INPUTS.append(BadInput("flash-attn requested, not installed", _args("--attention", "flash"), DeviceError,
                               "flash-attn"))


def _generate(**kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    if "prompt" not in kwargs:
        kwargs.setdefault("input_ids", [1, 2, 3])
    return lambda rt, tiny: rt.generate(**kwargs)


BAD_CALLS = [
    BadCall("temperature a string", _generate(temperature="hot"), GenerationSettingsError, "temperature"),
    BadCall("temperature None", _generate(temperature=None), GenerationSettingsError, "temperature"),
    BadCall("temperature=True", _generate(temperature=True), GenerationSettingsError, "temperature"),
    BadCall("top_p a string", _generate(temperature=1.0, top_p="0.9"), GenerationSettingsError, "top_p"),
    BadCall("top_p None", _generate(top_p=None), GenerationSettingsError, "top_p"),
    BadCall("top_k a float", _generate(temperature=1.0, top_k=2.5), GenerationSettingsError, "top_k"),
    BadCall("top_k with greedy decoding", _generate(top_k=5), GenerationSettingsError, "top_k"),
    BadCall("top_p with greedy decoding", _generate(top_p=0.5), GenerationSettingsError, "top_p"),
    BadCall("seed a string", _generate(seed="1"), GenerationSettingsError, "seed"),
    BadCall("seed = 2**64", _generate(seed=2**64), GenerationSettingsError, "seed"),
    BadCall("seed < 0", _generate(seed=-1), GenerationSettingsError, "seed"),
    BadCall("max_new_tokens a string", _generate(max_new_tokens="5"), GenerationSettingsError, "max_new_tokens"),
    BadCall("max_new_tokens a float", _generate(max_new_tokens=5.0), GenerationSettingsError, "max_new_tokens"),
    BadCall("stop an int", _generate(stop=5), GenerationSettingsError, "stop"),
    BadCall("stop an empty string", _generate(stop=[""]), GenerationSettingsError, "stop"),
    BadCall("stop with a lone surrogate", _generate(stop="\ud800"), GenerationSettingsError, "stop"),
    BadCall("eos_token_id a string", _generate(eos_token_id="x"), GenerationSettingsError, "eos_token_id"),
    BadCall("eos_token_id outside the vocabulary", _generate(eos_token_id=10**6), GenerationSettingsError,
            "eos_token_id"),
    BadCall("eos_token_id with ignore_eos=True", _generate(eos_token_id=1, ignore_eos=True),
            GenerationSettingsError, "eos_token_id"),
    BadCall("ignore_eos a string", _generate(ignore_eos="yes"), GenerationSettingsError, "ignore_eos"),
    BadCall("stream an int", _generate(stream=1), GenerationSettingsError, "stream"),
    BadCall("acceptance an int", _generate(acceptance=1), GenerationSettingsError, "acceptance"),
    BadCall("prompt an int", _generate(prompt=5), GenerationSettingsError, "prompt"),
    BadCall("prompt bytes", _generate(prompt=b"def f():"), GenerationSettingsError, "prompt"),
    BadCall("a batch holding a non-str prompt", _generate(prompt=["a = 1", 5]), GenerationSettingsError, "prompt"),
    BadCall("prompt with a lone surrogate", _generate(prompt="abc\ud800"), GenerationSettingsError, "prompt"),
    BadCall("prompt and input_ids", _generate(prompt="a", input_ids=[1]), GenerationSettingsError, "input_ids"),
    BadCall("input_ids of floats", _generate(input_ids=[1.5, 2]), GenerationSettingsError, "input_ids"),
    BadCall("input_ids of bools", _generate(input_ids=[True, 2]), GenerationSettingsError, "input_ids"),
    BadCall("input_ids nested too deeply", _generate(input_ids=[[1, 2], [[3]]]), GenerationSettingsError,
            "input_ids"),
    BadCall("input_ids mixing ids and lists", _generate(input_ids=[1, [2]]), GenerationSettingsError, "input_ids"),
    BadCall("input_ids a string", _generate(input_ids="1 2 3"), GenerationSettingsError, "input_ids"),
    BadCall("input_ids empty", _generate(input_ids=[]), GenerationSettingsError, "input_ids"),
    BadCall("input_ids a float tensor", _generate(input_ids=torch.tensor([1.0, 2.0])), GenerationSettingsError,
            "input_ids"),
    BadCall("input_ids a 3-D array", _generate(input_ids=np.zeros((1, 1, 2), dtype=np.int64)),
            GenerationSettingsError, "input_ids"),
    BadCall("token id outside the vocabulary", _generate(input_ids=[1, 10**6]), GenerationSettingsError,
            "input_ids"),
    BadCall("draft an int", _generate(draft=3), GenerationSettingsError, "draft"),
    BadCall("num_draft_tokens a float", _generate(draft="chain", num_draft_tokens=2.0), GenerationSettingsError,
            "num_draft_tokens"),
    BadCall("num_draft_tokens with draft='none'", _generate(draft="none", num_draft_tokens=3),
            GenerationSettingsError, "num_draft_tokens"),
    BadCall("depth with a chain", _generate(draft="chain", depth=3), GenerationSettingsError, "depth"),
    BadCall("num_draft_tokens with a static tree", _generate(tree="3,2,1", num_draft_tokens=3),
            GenerationSettingsError, "num_draft_tokens"),
    BadCall("draft_topk with auto", _generate(draft="auto", draft_topk=2), GenerationSettingsError, "draft_topk"),
    BadCall("topk and draft_topk both", _generate(draft="dynamic", topk=2, draft_topk=2), GenerationSettingsError,
            "topk"),
    BadCall("tree an int", _generate(tree=5), GenerationSettingsError, "tree"),
    BadCall("tree JSON nested 100,000 deep", _generate(tree="[" * 100_000), GenerationSettingsError, "tree"),
    BadCall("encode(5)", lambda rt, tiny: rt.encode(5), GenerationSettingsError, "text"),
    BadCall("decode of floats", lambda rt, tiny: rt.decode([1.5]), GenerationSettingsError, "token_ids"),
    BadCall("logits of ragged rows", lambda rt, tiny: rt.logits([[1, 2], [3]]), GenerationSettingsError, "logits"),
    BadCall("load(path=5)", lambda rt, tiny: mtp_runtime.load(5), ConfigError, "path"),
    BadCall("load(compile='yes')", lambda rt, tiny: mtp_runtime.load(tiny, compile="yes"), GenerationSettingsError,
            "compile"),
    BadCall("load(threads=True)", lambda rt, tiny: mtp_runtime.load(tiny, threads=True), GenerationSettingsError,
            "threads"),
    BadCall("load(threads=10**6)", lambda rt, tiny: mtp_runtime.load(tiny, threads=10**6), GenerationSettingsError,
            "threads"),
    BadCall("load(device='tpu9')", lambda rt, tiny: mtp_runtime.load(tiny, device="tpu9"), DeviceError, "tpu9"),
    BadCall("load(device='meta')", lambda rt, tiny: mtp_runtime.load(tiny, device="meta"), DeviceError, "meta"),
    BadCall("load(device=0.5)", lambda rt, tiny: mtp_runtime.load(tiny, device=0.5), DeviceError, "device"),
    BadCall("load(dtype=5)", lambda rt, tiny: mtp_runtime.load(tiny, dtype=5), DeviceError, "dtype"),
    BadCall("load(attention=None)", lambda rt, tiny: mtp_runtime.load(tiny, attention=None), DeviceError,
            "attention"),
]


@pytest.fixture(scope="module")
def tiny_runtime(tiny) -> mtp_runtime.Runtime:
    return mtp_runtime.load(tiny)


def run_command(bad: BadInput, args: list, debug: bool = False):
    return CliRunner().invoke(main, [*(["--debug"] if debug else []), bad.command, *[str(a) for a in args]],
                              prog_name="mtp-runtime")


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_bad_input_is_one_line_cli_error_and_typed_api_error(bad, tiny, tmp_path):
    args = bad.make(tiny, tmp_path)
    result = run_command(bad, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == bad.exit_code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad.fragment in lines[0], result.stderr
    assert "Traceback" not in result.output
    if bad.error is not None:
        debug = run_command(bad, args, debug=True)
        assert type(debug.exception) is bad.error, repr(debug.exception)


@pytest.mark.parametrize("bad", BAD_CALLS, ids=[b.name for b in BAD_CALLS])
def test_bad_argument_is_a_typed_one_line_error_naming_it(bad, tiny_runtime, tiny):
    with pytest.raises(MTPRuntimeError) as caught:
        bad.call(tiny_runtime, tiny)
    message = str(caught.value)
    assert type(caught.value) is bad.error and bad.fragment in message and "\n" not in message, message


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


def _cell(text: str, tmp: Path) -> str:
    return text.strip().replace(str(tmp), "<tmp>").replace("|", "\\|")


def bad_input_table(tmp: Path) -> str:
    """Markdown: each bad input, the CLI's one-line error and exit code, and the API's exception class."""
    tiny = make_tiny(tmp / "tiny")
    rows = ["| bad input | command | exit | CLI message (stderr) | API exception |", "|---|---|---|---|---|"]
    for i, bad in enumerate(BAD_INPUTS):
        case = tmp / f"case{i}"
        case.mkdir()
        args = bad.make(tiny, case)
        result = run_command(bad, args)
        api = type(run_command(bad, args, debug=True).exception).__name__ if bad.error else "(click usage error)"
        message = _cell(result.stderr, tmp)
        rows.append(f"| {bad.name} | {bad.command} | {result.exit_code} | `{message}` | {api} |")
    return "\n".join(rows)


def bad_call_table(tmp: Path) -> str:
    """Markdown: each bad API argument, the exception class and its message."""
    tiny = make_tiny(tmp / "tiny-api")
    runtime = mtp_runtime.load(tiny)
    rows = ["| bad argument | exception | message |", "|---|---|---|"]
    for bad in BAD_CALLS:
        try:
            bad.call(runtime, tiny)
            outcome, message = "(none)", ""
        except MTPRuntimeError as exc:
            outcome, message = type(exc).__name__, str(exc)
        rows.append(f"| {bad.name} | {outcome} | `{_cell(message, tmp)}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(bad_input_table(Path(tmp)))
        print()
        print(bad_call_table(Path(tmp)))
