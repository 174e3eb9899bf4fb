"""Plain decoding speed of llama.cpp on the same checkpoint, next to ours (an example, not a CI dependency).

Build llama.cpp from the `llama-cpp-python` source package, then point this script at it:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF && cmake --build build -j 2 \\
        --target llama-bench llama-simple && cd -
    python examples/llamacpp_compare.py llama_cpp_python-*/vendor/llama.cpp [--model FOLDER] [--tokens 128]

The checkpoint is converted to an F32 GGUF with llama.cpp's own convert_hf_to_gguf.py, with two local
workarounds: its pre-tokenizer table does not know our tokenizer's hash, so an unknown hash maps to "gpt-2"
(the same byte-level regex), and the config's expert groups are written as one group when every group is kept
(the same routing). It prints llama-bench's one-thread generation speed (tg), llama-simple's greedy
continuation of a prompt beside ours, and our plain and default decoding speed on that prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mtp_runtime

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
PATCH = """
import sys
sys.path[:0] = [{root!r}, {gguf!r}]
from conversion import base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def convert(llama: Path, model: Path, out: Path) -> Path:
    """An F32 GGUF of `model` (expert groups folded into one when all are kept)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(model, copy)
        config = json.loads((copy / "config.json").read_text())
        if config.get("topk_group", 1) >= config.get("n_group", 1):
            config["n_group"] = config["topk_group"] = 1
        (copy / "config.json").write_text(json.dumps(config))
        patch = PATCH.format(root=str(llama), gguf=str(llama / "gguf-py"), script=str(llama / "convert_hf_to_gguf.py"))
        subprocess.run([sys.executable, "-c", patch, str(copy), "--outfile", str(out), "--outtype", "f32"],
                       check=True, capture_output=True, text=True)
    return out


def llama_bench(llama: Path, gguf: Path, tokens: int, threads: int = 1) -> float:
    """llama-bench's generation speed (tokens/s) for `tokens` new tokens on `threads` threads."""
    out = subprocess.run([str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens),
                          "-t", str(threads), "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def llama_greedy(llama: Path, gguf: Path, prompt: str, tokens: int) -> str:
    """llama-simple's greedy continuation of `prompt` (its text after the prompt)."""
    out = subprocess.run([str(llama / "build" / "bin" / "llama-simple"), "-m", str(gguf), "-n", str(tokens), prompt],
                         check=True, capture_output=True, text=True).stdout
    return out.split(prompt, 1)[-1] if prompt in out else out


def ours(runtime, prompt: str, tokens: int, **kwargs) -> tuple[float, str]:
    """Best tokens/s of three generate calls, and the text."""
    runtime.generate(prompt, max_new_tokens=8, **kwargs)
    best, text = 0.0, ""
    for _ in range(3):
        start = time.perf_counter()
        result = runtime.generate(prompt, max_new_tokens=tokens, ignore_eos=True, **kwargs)
        best, text = max(best, tokens / (time.perf_counter() - start)), result.text
    return best, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llama_cpp", type=Path, help="llama.cpp source folder with build/bin/ built")
    parser.add_argument("--model", type=Path, default=mtp_runtime.DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = convert(args.llama_cpp.resolve(), args.model, Path(tmp) / "model-f32.gguf")
        speed = llama_bench(args.llama_cpp.resolve(), gguf, args.tokens)
        theirs = llama_greedy(args.llama_cpp.resolve(), gguf, PROMPT, args.tokens)
    runtime = mtp_runtime.load(args.model, threads=1, compile=not args.no_compile)
    plain, plain_text = ours(runtime, PROMPT, args.tokens, draft="none")
    default, _ = ours(runtime, PROMPT, args.tokens)
    same = re.sub(r"\s+$", "", theirs)[:200] == re.sub(r"\s+$", "", plain_text)[: len(re.sub(r"\s+$", "", theirs)[:200])]
    print(f"llama.cpp (F32, 1 thread) generation: {speed:.1f} tok/s")
    print(f"ours (1 thread, {'eager' if args.no_compile else 'compiled'}): plain {plain:.1f} tok/s "
          f"({plain / speed:.2f}x llama.cpp), default (auto) {default:.1f} tok/s ({default / speed:.2f}x)")
    print(f"greedy text identical over llama.cpp's first {min(200, len(theirs))} characters: {same}")


if __name__ == "__main__":
    main()
