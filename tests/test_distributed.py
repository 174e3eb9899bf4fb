"""Scale-out: 2 gloo ranks on CPU split attention heads and experts, and produce what one process produces.

One pair of worker processes (dist_worker.py, started with torchrun's environment variables) serves every
equality check; the last test runs the real CLI under torchrun.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builders import build_checkpoint, build_mostly_right, random_model, tiny_config
from dist_worker import GENERATE_CASES, run_cases
from mtp_runtime import Runtime
from mtp_runtime.cli import main as cli_main
from mtp_runtime.errors import ParallelError
from mtp_runtime.parallel import ParallelGroup, shard_model
from mtp_runtime.train.corpus import train_tokenizer

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TIMEOUT_S = 120
CLI_ARGS = ["generate", "def add(a, b):", "--max-new-tokens", "20", "--draft", "chain", "--num-draft-tokens", "2",
            "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the worktree and tests/ importable and one torch thread."""
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A: mostly-accepted drafts with a byte-level tokenizer; B: no q compression and an o_proj bias."""
    folder = tmp_path_factory.mktemp("dist_a")
    text = folder / "snippets.txt"
    text.write_text("def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i)\n" * 8, encoding="utf-8")
    tokenizer = train_tokenizer([text], 300, folder / "tokenizer.json")
    text.unlink()
    model_a = build_mostly_right(folder, vocab=tokenizer.get_vocab_size(), num_mtp=2, seed=3)
    model_b = build_checkpoint(tmp_path_factory.mktemp("dist_b"), num_mtp=1, seed=4, q_lora_rank=None,
                               attention_bias=True)
    return model_a, model_b


@pytest.fixture(scope="module")
def single(models) -> dict:
    """The same cases in this process, on the whole model."""
    return run_cases(*(Runtime.from_folder(m, device="cpu") for m in models))


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory) -> list[dict]:
    """Both ranks' results from one 2-rank gloo run of dist_worker.py."""
    out = tmp_path_factory.mktemp("dist_out")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py"), *map(str, models), str(out)],
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for proc in procs:  # a rank that diverged may leave the other waiting in a collective
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_logits_match_single_process(ranks, single):
    for rank in ranks:
        for key in ("logits", "logits_q_proj"):
            torch.testing.assert_close(rank[key], single[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [*GENERATE_CASES, "batch_chain", "q_proj_tree"])
def test_generation_matches_single_process(ranks, single, case):
    assert ranks[0][case] == ranks[1][case] == single[case]


def test_speculative_equals_plain_and_commits_several_tokens(ranks):
    for name in ("chain", "tree", "dynamic"):
        assert ranks[0][name] == ranks[0]["plain"], name
    assert ranks[0]["chain_accepted_length"] > 1.5


def test_unseeded_sampling_agrees_across_ranks(ranks):
    assert ranks[0]["unseeded_sample"] == ranks[1]["unseeded_sample"]


def test_each_rank_holds_half_of_heads_and_experts(ranks, models):
    full = Runtime.from_folder(models[0], device="cpu").model
    moe, dense, mtp = full.model.layers[1], full.model.layers[0], full.mtp[0]
    halves = {
        "q_b_proj": moe.self_attn.q_b_proj.weight.numel(), "kv_b_proj": moe.self_attn.kv_b_proj.weight.numel(),
        "o_proj": moe.self_attn.o_proj.weight.numel(),
        "routed_experts": sum(p.numel() for p in moe.mlp.experts.parameters()),
        "shared_experts": sum(p.numel() for p in moe.mlp.shared_experts.parameters()),
        "dense_mlp": sum(p.numel() for p in dense.mlp.parameters()),
        "mtp_kv_b_proj": mtp.self_attn.kv_b_proj.weight.numel(),
        "mtp_experts": sum(p.numel() for p in mtp.mlp.experts.parameters()),
    }
    for rank in ranks:
        for name, count in halves.items():
            assert rank["counts"][name] * 2 == count, name
        assert rank["counts"]["q_a_proj"] == moe.self_attn.q_a_proj.weight.numel()  # replicated
        assert rank["counts"]["gate"] == moe.mlp.gate.weight.numel()


@pytest.mark.parametrize("overrides, world_size, named", [
    ({}, 3, "num_attention_heads = 4"),
    (dict(num_attention_heads=6), 3, "n_routed_experts = 8"),
])
def test_indivisible_sizes_raise_parallel_error(overrides, world_size, named):
    model = random_model(tiny_config(**overrides), num_mtp=1)
    before = model.model.layers[1].self_attn.num_heads
    with pytest.raises(ParallelError, match=named):
        shard_model(model, ParallelGroup(rank=0, world_size=world_size))
    assert model.model.layers[1].self_attn.num_heads == before  # nothing was split


def test_cli_under_torchrun_prints_what_one_process_prints(models):
    single = CliRunner().invoke(cli_main, [*CLI_ARGS, "--model", str(models[0])])
    assert single.exit_code == 0, single.output
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mtp_runtime.cli", *CLI_ARGS, "--model", str(models[0])],
        env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == single.stdout
