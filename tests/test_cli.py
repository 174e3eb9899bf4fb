"""The `mtp-runtime` command line: generate, bench, info, their error handling, and the installed console script.

Figures are checked on a tiny checkpoint whose drafts are mostly accepted (builders.build_mostly_right) with a
byte-level tokenizer trained on a few strings; bench and info also run on the shipped default model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mtp_runtime
from builders import build_mostly_right
from helpers import SNIPPETS, assert_one_line_error, check_stats, run_cli, shipped_model
from mtp_runtime import bench, prompts
from mtp_runtime.errors import GenerationSettingsError, MTPRuntimeError
from mtp_runtime.stats import GenerationStats

run = run_cli


def run_json(*args, input=None) -> dict:
    result = run(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------- stats

def test_tau_is_one_plus_the_cumulative_rates():
    s = GenerationStats(steps=1, new_tokens=1)  # the prefill alone: nothing drafted
    assert s.tau == 1.0 and s.mean_accepted_length == 1.0
    for accepted in (3, 0, 2):  # three verify steps of a depth-3 chain
        s.record_step(drafted=3, tree_depth=3, accepted=accepted, leaf_reached=accepted == 3)
        s.new_tokens += accepted + 1
    assert s.tau == pytest.approx(1 + sum(s.cumulative_acceptance))
    assert s.tau == pytest.approx((4 + 1 + 3) / 3)  # tokens per verify forward, bonus included
    assert s.mean_accepted_length == pytest.approx(9 / 4)  # new tokens / trunk forwards, prefill counted
    assert s.to_dict()["tau"] == s.tau


# ---------------------------------------------------------------------------------------------- generate

def test_generate_streams_the_same_text_as_json(tiny):
    streamed = run("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 12, "--ignore-eos")
    assert streamed.exit_code == 0, streamed.output
    out = run_json("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 12, "--ignore-eos")
    assert streamed.stdout == out["text"] + ("" if out["text"].endswith("\n") else "\n")
    assert out["draft"] == "auto" and out["finish_reason"] == "length"
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] == 12
    assert out["prompt_token_ids"] == mtp_runtime.load(tiny).encode("def add(a, b):")


def test_generate_stats_summary_on_stderr(tiny):
    result = run("generate", "for i in", "--model", tiny, "--max-new-tokens", 10, "--draft", "chain", "--stats")
    assert result.exit_code == 0, result.output
    for label in ("steps", "new tokens", "mean accepted", "tau", "acceptance", "cumulative", "vLLM",
                  "accepted/step", "tokens/s", "draft", "verify", "commit"):
        assert label in result.stderr
    assert "mean accepted" not in result.stdout


@pytest.mark.parametrize("draft", [["--draft", "chain", "--num-draft-tokens", "3"], ["--draft", "tree", "--tree", "2,2"],
                                   ["--draft", "dynamic", "--num-draft-tokens", "6", "--depth", "3", "--draft-topk", "2"]])
def test_generate_json_figures_are_consistent_and_lossless(tiny, draft):
    args = ("generate", "class Point:", "--model", tiny, "--max-new-tokens", 16, "--ignore-eos")
    plain = run_json(*args, "--draft", "none")
    out = run_json(*args, *draft)
    assert out["token_ids"] == plain["token_ids"] and out["text"] == plain["text"]  # greedy: drafting is lossless
    check_stats(out["stats"])
    assert out["stats"]["new_tokens"] == 16
    assert out["stats"]["mean_accepted_length"] > 1.2  # this checkpoint's drafts are mostly accepted
    assert plain["stats"]["mean_accepted_length"] == 1.0 and plain["stats"]["drafted_tokens"] == 0


def test_generate_prompt_from_stdin_and_file(tiny, tmp_path):
    args = ("generate", "--model", tiny, "--max-new-tokens", 6, "--ignore-eos")
    from_arg = run_json(*args[:1], "import os\n", *args[1:])
    from_stdin = run_json(*args, input="import os\n")
    file = tmp_path / "prompt.txt"
    file.write_text("import os\n", encoding="utf-8")
    from_file = run_json(*args, "--prompt-file", file)
    assert from_arg["prompt_token_ids"] == from_stdin["prompt_token_ids"] == from_file["prompt_token_ids"]
    assert from_arg["token_ids"] == from_stdin["token_ids"] == from_file["token_ids"]


def test_generate_stop_string_and_sampling(tiny):
    out = run_json("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 12, "--temperature", 0.8,
                   "--top-p", 0.9, "--seed", 1, "--draft", "chain")
    check_stats(out["stats"])
    again = run_json("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 12, "--temperature", 0.8,
                     "--top-p", 0.9, "--seed", 1, "--draft", "chain")
    assert again["token_ids"] == out["token_ids"]  # a seed makes sampling reproducible
    text = run_json("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 24, "--ignore-eos")["text"]
    stop = text[3:5]
    stopped = run_json("generate", "def add(a, b):", "--model", tiny, "--max-new-tokens", 24, "--stop", stop)
    assert stopped["finish_reason"] == "stop" and stop not in stopped["text"]


def test_ctrl_c_while_streaming_exits_130(tiny, monkeypatch):
    def interrupted(self, *args, **kwargs):
        def chunks():
            yield mtp_runtime.StreamChunk(0, [1], "partial")
            raise KeyboardInterrupt

        return mtp_runtime.GenerationStream(chunks(), [])

    monkeypatch.setattr(mtp_runtime.Runtime, "generate", interrupted)
    result = run("generate", "x", "--model", tiny)
    assert result.exit_code == 130
    assert result.stdout == "partial\n"
    assert "Traceback" not in result.output and "Aborted" not in result.output


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, fragment", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--draft", "sideways"], "unknown draft mode"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--tree", "3,x"], "tree spec"),
    (["--draft", "chain", "--num-draft-tokens", "0"], "num_draft_tokens"),
])
def test_generate_errors_are_one_line(tiny, args, fragment):
    model = [] if "--model" in args else ["--model", str(tiny)]
    assert_one_line_error(run("generate", "x", *model, *args), fragment)


def test_model_folder_without_config_is_one_line_error(tmp_path):
    assert_one_line_error(run("generate", "x", "--model", tmp_path), "config.json")
    assert_one_line_error(run("info", tmp_path / "missing"), "does not exist")
    assert_one_line_error(run("bench", "--no-compile", "--model", tmp_path / "missing"), "does not exist")


def test_debug_shows_the_exception(tiny):
    result = run("--debug", "generate", "x", "--model", tiny, "--temperature", "-1")
    assert isinstance(result.exception, GenerationSettingsError)


def test_drafting_without_mtp_modules_is_explained(tmp_path, tiny):
    folder = build_mostly_right(tmp_path / "no_mtp", vocab=mtp_runtime.load(tiny).config.vocab_size, num_mtp=0)
    (folder / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    assert run_json("generate", "x", "--model", folder, "--max-new-tokens", 3)["draft"] == "none"
    assert_one_line_error(run("generate", "x", "--model", folder, "--draft", "chain"), "no MTP modules")


# ---------------------------------------------------------------------------------------------- bench

def test_bench_json_figures_are_consistent(tiny, tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SNIPPETS[:2]), encoding="utf-8")
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    result = run("bench", "--no-compile", "--model", tiny, "--prompts", file, "--max-new-tokens", 8, "--draft", "chain",
                 "--draft", "dynamic", "--num-draft-tokens", "2,3", "--json", out, "--no-progress",
                 *(["--plot", plot] if has_matplotlib else []))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["configs"]]
    assert names == ["plain", "chain k=2", "chain k=3", "dynamic n=2 d=4 k=4", "dynamic n=3 d=4 k=4"]
    for name in names:
        assert name in result.stdout
    assert set(report["machine"]) >= {"platform", "torch", "cpu_count", "device", "dtype"}
    assert [p["text"] for p in report["prompts"]] == SNIPPETS[:2]
    plain = report["configs"][0]
    assert plain["speedup"] == 1.0 and plain["stats"]["mean_accepted_length"] == 1.0
    assert plain["stats"]["tau"] == 1.0
    for config in report["configs"]:
        stats = config["stats"]
        check_stats(stats, drafted=config["draft"] != "none", prefills=2)
        assert len(config["per_prompt"]) == 2
        assert [p["new_tokens"] for p in config["per_prompt"]] == [8, 8]  # ignore-eos by default
        assert stats["new_tokens"] == sum(p["new_tokens"] for p in config["per_prompt"])
        assert stats["steps"] == sum(p["steps"] for p in config["per_prompt"])
        for p in config["per_prompt"]:
            check_stats(p, drafted=config["draft"] != "none")
        assert config["tokens_per_second"] == pytest.approx(16 / config["wall_s"])
        assert config["speedup"] == pytest.approx(config["tokens_per_second"] / plain["tokens_per_second"])
        assert config["bound_free_drafting"] == stats["tau"]
        assert config["implied_speedup"] == pytest.approx(
            stats["tau"] * plain["decode_step_s"] / config["decode_step_s"])
        assert sum(config["time_shares"].values()) == pytest.approx(1.0)
        assert config["matches_plain"] is True
        assert [p["token_ids"] for p in config["per_prompt"]] == [p["token_ids"] for p in plain["per_prompt"]]
    assert report["configs"][2]["stats"]["mean_accepted_length"] > 1.2
    if has_matplotlib:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_timed_bench_run_that_compiled_is_timed_again(tiny):
    """Its wall time would hold the compile: the run is timed again, the compile reported on its own."""
    from mtp_runtime.bench.configs import DraftConfig
    from mtp_runtime.bench.run import run_bench
    from mtp_runtime.forwards import Forwards

    class CompilesOnRequest(Forwards):
        pending = 0

        def trunk(self, tokens, plan):
            if self.pending:
                self.pending -= 1
                self.compile_seconds += 60.0
            return super().trunk(tokens, plan)

    runtime = mtp_runtime.load(tiny, device="cpu")
    runtime.forwards = CompilesOnRequest(runtime.model)
    calls, generate = [], runtime.generate

    def counted(**kwargs):
        calls.append(kwargs["max_new_tokens"])
        if len(calls) == 3:  # the first timed call, after the warm-ups of plain and the chain
            runtime.forwards.pending = 1
        return generate(**kwargs)

    runtime.generate = counted
    report = run_bench(runtime, SNIPPETS[:2], [DraftConfig("chain", num_draft_tokens=2)], max_new_tokens=8)
    assert len(calls) == 2 + 2 * 2 + 1  # warm-ups, 2 prompts x 2 configs, and the call that compiled once more
    assert report.compile_seconds == 0.0 and report.compile_seconds_timed == 60.0
    assert all(len(result.runs) == 2 for result in report.results)
    assert all(run.token_ids == plain.token_ids for run, plain in zip(report.results[1].runs, report.results[0].runs))


def test_bench_batch_sizes(tiny, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n\n".join(SNIPPETS[:3]), encoding="utf-8")
    out = tmp_path / "batch.json"
    result = run("bench", "--no-compile", "--model", tiny, "--prompts", file, "--max-new-tokens", 6, "--draft", "chain",
                 "--num-draft-tokens", "2", "--batch-sizes", "1,4", "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    points = json.loads(out.read_text())["points"]
    assert [(p["config"], p["batch_size"]) for p in points] == [
        ("plain", 1), ("chain k=2", 1), ("plain", 4), ("chain k=2", 4)]
    for p in points:
        assert p["new_tokens"] == 6 * p["batch_size"]
        assert p["tokens_per_second"] == pytest.approx(p["new_tokens"] / p["wall_s"])
        plain = next(q for q in points if q["config"] == "plain" and q["batch_size"] == p["batch_size"])
        assert p["speedup"] == pytest.approx(p["tokens_per_second"] / plain["tokens_per_second"])
    assert points[0]["tok_per_forward"] == 1.0 and points[3]["tok_per_forward"] > 1.2
    assert "batched throughput" in result.stdout
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--batch-sizes", "4,x"), "--batch-sizes")
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--batch-sizes", "0"), "--batch-sizes")
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--batch-sizes", "4", "--soak", 3), "cannot be combined")
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--soak", 3, "--compare-hf"), "cannot be combined")


def test_bench_soak_reports_rss(tiny, tmp_path):
    out = tmp_path / "soak.json"
    result = run("bench", "--no-compile", "--model", tiny, "--prompts", _prompt_file(tmp_path), "--max-new-tokens", 4,
                 "--draft", "chain", "--soak", 12, "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["calls"] == 12 and [done for done, _ in report["rss_mb"]][-1] == 12
    assert all(mb > 10 for _, mb in report["rss_mb"]) and report["peak_rss_mb"] >= max(mb for _, mb in report["rss_mb"])
    # call 10 fills the cache to the maximum positions (512); call 5 and 10's neighbours are short
    assert report["new_tokens"] > 512 - 20
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--soak", 0), "--soak")


def _prompt_file(tmp_path: Path) -> Path:
    file = tmp_path / "prompts.txt"
    file.write_text("\n\n".join(SNIPPETS[:2]), encoding="utf-8")
    return file


def test_bench_plot_without_matplotlib_is_explained(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, "--plot", tmp_path / "x.png"), "pip install")


def test_bench_sampling_and_tree_sweep(tiny, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n\n".join(SNIPPETS[:2]), encoding="utf-8")
    out = tmp_path / "bench.json"
    result = run("bench", "--no-compile", "--model", tiny, "--prompts", file, "--max-new-tokens", 6, "--draft", "tree", "--tree",
                 "2,1", "--tree", "[[0],[1],[0,0]]", "--temperature", 0.7, "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["configs"]] == ["plain", "tree 2,1", "tree 3 nodes"]
    for config in report["configs"]:
        assert config["matches_plain"] is None  # only greedy runs are compared token for token
        check_stats(config["stats"], drafted=config["draft"] != "none", prefills=2)


@pytest.mark.parametrize("args, fragment", [
    (["--draft", "sideways"], "unknown draft mode"),
    (["--num-draft-tokens", "2,x"], "--num-draft-tokens"),
    (["--tree", "2,1", "--draft", "chain"], "--draft tree"),
    (["--temperature", "-0.5"], "temperature"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
])
def test_bench_errors_are_one_line(tiny, args, fragment):
    assert_one_line_error(run("bench", "--no-compile", "--model", tiny, *args), fragment)


def test_sweep_configurations():
    configs = bench.sweep(["chain", "dynamic", "chain"], [1, 2], depth=3, topk=2)
    assert [c.name for c in configs] == ["plain", "chain k=1", "chain k=2", "dynamic n=1 d=3 k=2",
                                         "dynamic n=2 d=3 k=2"]
    assert [c.name for c in bench.sweep()] == ["plain", "auto k<=8", "chain k=1", "tree 3,2,1", "dynamic n=8 d=4 k=4"]
    with pytest.raises(GenerationSettingsError):
        bench.sweep(["chain"], [0])


def test_bench_default_prompts_on_the_trained_model(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--no-compile", "--model", shipped_model(), "--num-prompts", 2, "--max-new-tokens", 4, "--draft", "chain",
                 "--json", out, "--threads", 1)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [p["text"] for p in report["prompts"]] == prompts.default_prompts(2)
    assert all(c["matches_plain"] for c in report["configs"])


def test_bench_compare_hf(tiny, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n\n".join(SNIPPETS[:2]), encoding="utf-8")
    out = tmp_path / "bench.json"
    result = run("bench", "--no-compile", "--model", tiny, "--prompts", file, "--max-new-tokens", 6, "--draft", "chain",
                 "--compare-hf", "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    hf = {h["name"]: h for h in json.loads(out.read_text())["hf"]}
    assert set(hf) == {"hf greedy", "hf prompt-lookup 3", "hf mtp"}
    for name in ("hf greedy", "hf prompt-lookup 3"):
        assert hf[name]["error"] is None and hf[name]["new_tokens"] == 12 and hf[name]["matches_ours"] is True
    mtp = hf["hf mtp"]
    assert (mtp["error"] is None and mtp["new_tokens"] == 12) or (mtp["error"] and "hf mtp failed" in result.stdout)


# ---------------------------------------------------------------------------------------------- prompts

def test_default_prompts_are_held_out_and_deterministic():
    from mtp_runtime.train.corpus import default_corpus_roots, is_held_out

    first = prompts.default_prompts(3)
    assert first == prompts.default_prompts(3) and len(set(first)) == 3
    assert all(len(p.splitlines()) == prompts.PROMPT_LINES for p in first)
    root = default_corpus_roots()[0].resolve()
    held = [f for f in sorted(root.rglob("*.py")) if is_held_out(f.resolve(), root, prompts.HELD_OUT_PERCENT)]
    texts = {f.read_text(encoding="utf-8", errors="replace") for f in held}
    assert all(any(t.startswith(p) for t in texts) for p in first)


def test_load_prompts_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("\n\none\nline two\n\n\n  \nthree\n", encoding="utf-8")
    assert prompts.load_prompts(text) == ["one\nline two", "three"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb"}\n\n{"prompt": "c", "id": 2}\n', encoding="utf-8")
    assert prompts.load_prompts(jsonl) == ["a\nb", "c"]
    jsonl.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(MTPRuntimeError, match="prompt"):
        prompts.load_prompts(jsonl)
    with pytest.raises(MTPRuntimeError):
        prompts.load_prompts(tmp_path / "missing.txt")


def test_training_corpus_from_training_json(tmp_path):
    assert prompts.training_corpus(tmp_path) == (None, 5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    record = {"settings": {"corpus": [str(corpus)], "held_out_percent": 10}}
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert prompts.training_corpus(tmp_path) == ([corpus], 10)
    record["settings"]["corpus"] = ["/trained/elsewhere"]
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert prompts.training_corpus(tmp_path) == (None, 10)


# ---------------------------------------------------------------------------------------------- info

def test_info_counts_match_the_loaded_model(tiny):
    summary = run_json("info", tiny)
    rt = mtp_runtime.load(tiny)
    state = rt.model.state_dict()
    assert summary["parameters"]["total"] == sum(v.numel() for k, v in state.items() if not k.startswith("mtp."))
    assert summary["parameters"]["mtp_total"] == sum(v.numel() for k, v in state.items() if k.startswith("mtp."))
    assert summary["parameters"]["active_per_token"] < summary["parameters"]["total"]
    assert summary["mtp_depth"] == rt.num_mtp_modules == 2
    cache = summary["cache_bytes_per_token"]
    assert cache["latent"] == rt.config.latent_cache_bytes_per_token(2)
    assert cache["ratio"] == pytest.approx(cache["expanded_kv"] / cache["latent"])
    assert summary["tokenizer_vocab_size"] == len(rt.tokenizer)
    text = run("info", tiny)
    assert text.exit_code == 0
    for label in ("MLA", "routed experts", "active per token", "latent", "tokenizer", "depth 2"):
        assert label in text.stdout


def test_info_on_the_published_deepseek_v3_config(tmp_path):
    """671B total and ~37B activated parameters (DeepSeek-V3 report), from config.json alone."""
    config = dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid",
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096})
    (tmp_path / "config.json").write_text(json.dumps(config))
    summary = run_json("info", tmp_path)
    assert round(summary["parameters"]["total"] / 1e9) == 671
    assert round(summary["parameters"]["active_per_token"] / 1e9) in (37, 38)
    assert summary["mtp_depth"] == 1 and summary["tokenizer_vocab_size"] is None
    assert summary["cache_bytes_per_token"]["latent"] == 61 * (512 + 64) * 2


def test_info_on_the_trained_model():
    result = run("info", shipped_model())
    assert result.exit_code == 0, result.output
    assert "MTP" in result.stdout.upper() and "tokenizer" in result.stdout


# ---------------------------------------------------------------------------------------------- console script

def test_installed_console_script(tiny):
    script = Path(sys.executable).with_name("mtp-runtime")
    if not script.is_file():
        pytest.skip("the mtp-runtime console script is not installed next to this interpreter")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(script), "generate", "def add(a, b):", "--model", str(tiny), "--max-new-tokens", "8",
                           "--ignore-eos", "--stats"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "mean accepted" in done.stderr
    bad = subprocess.run([str(script), "generate", "x", "--model", "/nonexistent"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")




# ---------------------------------------------------------------------------------------------- what a newcomer meets

def test_stop_reads_the_usual_escapes():
    from mtp_runtime.cli.common import unescape_stop

    assert unescape_stop(r"\n\n") == "\n\n" and unescape_stop(r"a\tb\r") == "a\tb\r"
    assert unescape_stop(r"\\n") == "\\n" and unescape_stop(r"\x") == r"\x" and unescape_stop("\\") == "\\"


def test_stop_newline_fires_on_the_shipped_model():
    args = ("generate", "def fibonacci(n):", "--max-new-tokens", 24, "--ignore-eos", "--threads", 1)
    text = run_json(*args)["text"]
    assert "\n" in text
    stopped = run_json(*args[:-3], "--stop", r"\n", "--threads", 1)  # what a shell passes for "\n"
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[:text.index("\n")]


def test_several_prompts_run_as_one_batch(tiny, tmp_path):
    args = ("--model", tiny, "--max-new-tokens", 6, "--ignore-eos", "--draft", "chain")
    alone = [run_json("generate", p, *args) for p in ("import os", "for i in")]
    both = run("generate", "import os", "for i in", *args, "--json")
    assert both.exit_code == 0, both.output
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert [r["token_ids"] for r in lines] == [r["token_ids"] for r in alone]
    assert [r["prompt_token_ids"] for r in lines] == [r["prompt_token_ids"] for r in alone]
    file = tmp_path / "prompts.txt"
    file.write_text("import os\n\nfor i in\n", encoding="utf-8")
    from_file = run("generate", "--prompts", file, *args, "--json")
    assert [json.loads(line)["token_ids"] for line in from_file.stdout.splitlines()] == [r["token_ids"] for r in alone]
    text = run("generate", "import os", "for i in", *args, "--stats")
    assert text.exit_code == 0 and text.stdout.count("==> prompt ") == 2 and text.stderr.count("==> prompt ") == 2
    assert_one_line_error(run("generate", "x", "--prompts", file, *args), exit_code=2)


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mtp-runtime, version {mtp_runtime.__version__}"


@pytest.mark.parametrize("command, args, fragment", [
    ("generate", ["", "--model", "{tiny}"], "empty"),
    ("generate", ["x", "--model", "{tiny}", "--num-draft-tokens", "20"], "num_draft_tokens"),  # auto's chain: <= 16
    ("generate", ["x", "--model", "{tiny}", "--draft", "none", "--depth", "2"], "depth"),
    ("generate", ["x", "--model", "{tiny}", "--stop", ""], "stop"),
    ("generate", ["x", "--model", "{tiny}", "--top-p", "0.5"], "top_p"),
    ("generate", ["x", "--model", "{tiny}", "--device", "tpu9"], "tpu9"),
    ("generate", ["x", "--model", "{tiny}", "--threads", "0"], "threads"),
    ("generate", ["x", "--model", "{tiny}", "--seed", "-1"], "seed"),
    ("generate", ["x", "--model", "{tiny}", "--dtype", "fp8"], "dtype"),
    ("bench", ["--model", "{tiny}", "--plot", "x.nosuchfmt"], "nosuchfmt"),
    ("bench", ["--model", "{tiny}", "--draft-topk", "2"], "--draft-topk"),
    ("bench", ["--model", "{tiny}", "--max-new-tokens", "0"], "max_new_tokens"),
    ("bench", ["--model", "{tiny}", "--prompts", "{missing}"], "missing.txt"),
])
def test_every_check_runs_before_the_model_loads(tiny, tmp_path, monkeypatch, command, args, fragment):
    from mtp_runtime.cli import bench as bench_command, generate as generate_command

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(generate_command, "load_runtime", no_load)
    monkeypatch.setattr(bench_command, "load_runtime", no_load)
    args = [a.format(tiny=tiny, missing=tmp_path / "missing.txt") for a in args]
    assert_one_line_error(run(command, *args), fragment)


def test_stats_read_right_for_plain_decoding_and_trees(tiny):
    plain = run("generate", "x", "--model", tiny, "--max-new-tokens", 8, "--draft", "none", "--stats")
    assert plain.exit_code == 0, plain.output
    assert "plain decoding steps" in plain.stderr and "nothing drafted" in plain.stderr
    assert "tau" not in plain.stderr and "drafted (bonus" not in plain.stderr and "acceptance" not in plain.stderr
    tree = run("generate", "x", "--model", tiny, "--max-new-tokens", 12, "--tree", "2,2,1", "--stats")
    acceptance = next(line for line in tree.stderr.splitlines() if line.startswith("acceptance"))
    assert re.search(r"d1 \d\.\d\d \(n=\d+\)", acceptance) and "(n=" in acceptance.split("d2", 1)[1]


def test_draft_options_have_one_help_text_in_generate_and_bench():
    from mtp_runtime.cli.common import DEPTH_HELP, DRAFT_TOPK_HELP, NUM_DRAFT_TOKENS_HELP

    for command in ("generate", "bench"):
        text = " ".join(run(command, "--help").stdout.split())
        for help_text in (DRAFT_TOPK_HELP, DEPTH_HELP, NUM_DRAFT_TOKENS_HELP):
            assert " ".join(help_text.split()) in text, (command, help_text)
        assert "--draft-topk" in text and "--topk " not in text
    assert "--full" in " ".join(run("bench", "--help").stdout.split())


def test_bench_default_is_quick_and_full_is_one_flag_away(tiny, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--model", tiny, "--prompts", _prompt_file(tmp_path), "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["configs"]] == ["plain", "auto k<=8", "chain k=1"]
    assert report["max_new_tokens"] == 64 and report["machine"]["compiled"] is False
    plain, auto, chain = report["configs"]
    assert set(plain) & {"num_draft_tokens", "tree", "depth", "draft_topk"} == set()  # no knobs that do not apply
    assert auto["num_draft_tokens"] == 8 and chain["num_draft_tokens"] == 1 and "depth" not in chain
    # the progress bar (on by default) ends its own line: the last line is the file's alone
    assert result.stderr.split("\n")[-2] == f"figures written to {out}", result.stderr[-300:]
    full = run("bench", "--model", tiny, "--prompts", _prompt_file(tmp_path), "--full", "--no-compile",
               "--max-new-tokens", 4, "--json", out, "--no-progress")
    assert full.exit_code == 0, full.output
    configs = json.loads(out.read_text())["configs"]
    assert [c["name"] for c in configs] == ["plain", "auto k<=8", "chain k=1", "tree 3,2,1", "dynamic n=8 d=4 k=4"]
    assert {k: configs[-1][k] for k in ("num_draft_tokens", "depth", "draft_topk")} == {
        "num_draft_tokens": 8, "depth": 4, "draft_topk": 4}
    assert configs[3]["tree"] == "3,2,1"


def test_plot_format_is_checked_by_its_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    from mtp_runtime.bench.plot import check_plot_path

    for name in ("a.png", "a.PDF", "a.svg", "no_suffix"):
        check_plot_path(tmp_path / name)
    with pytest.raises(MTPRuntimeError, match=r"cannot write \.nosuchfmt files; use one of .*\.png"):
        check_plot_path(tmp_path / "a.nosuchfmt")


def test_config_without_mtp_modules_is_the_contract(tiny, tmp_path):
    """num_nextn_predict_layers 0 while the weights hold 2 MTP layers: no modules, a one-line warning, no drafts."""
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    out = run("generate", "x", "--model", folder, "--max-new-tokens", 3, "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["draft"] == "none"
    warnings = out.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "model.layers.2..3 ignored" in warnings[0]
    assert_one_line_error(run("generate", "x", "--model", folder, "--draft", "chain"), "no MTP modules")
    assert run_json("info", folder)["mtp_depth"] == 0
