"""The train command: a micro run learns, exports a loadable HF folder, resumes; the tokenizer round-trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mtp_runtime
from mtp_runtime.errors import MTPRuntimeError, TrainingSettingsError
from mtp_runtime.train import corpus
from mtp_runtime.train.objectives import window_losses
from mtp_runtime.train.trainer import Trainer, TrainSettings

TINY_ARCH = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
    "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "n_group": 2, "topk_group": 1, "max_position_embeddings": 256,
}


def write_corpus(folder):
    """Twenty small, repetitive Python files: easy to learn in a few steps."""
    folder.mkdir(exist_ok=True)
    for i in range(20):
        lines = [f"def function_{i}_{j}(value):\n    return value + {j}\n\n" for j in range(30)]
        (folder / f"module_{i:02d}.py").write_text("".join(lines), encoding="utf-8")
    return folder


def micro_settings(tmp_path, **overrides) -> TrainSettings:
    base = dict(out_dir=tmp_path / "run", corpus=[write_corpus(tmp_path / "corpus")], held_out_percent=30,
                vocab_size=300, num_mtp=2, context=32, batch_size=4, steps=30, lr=1e-2, warmup=3, eval_every=10,
                eval_windows=8, save_every=10, arch_overrides=TINY_ARCH)
    base.update(overrides)
    return TrainSettings(**base)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("train")
    trainer = Trainer(micro_settings(tmp_path))
    folder = trainer.train()
    return trainer, folder


def test_micro_run_reduces_held_out_loss(micro_run):
    trainer, _ = micro_run
    history = trainer.history
    assert history[0]["step"] == 10 and history[-1]["step"] == 30
    assert history[-1]["held_out_loss"] < history[0]["held_out_loss"] - 0.5
    assert all(len(h["mtp_top1"]) == 2 for h in history)


def test_export_is_an_hf_deepseek_v3_folder(micro_run):
    _, folder = micro_run
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 2
    rt = mtp_runtime.load(folder)
    assert rt.num_mtp_modules == 2 and rt.tokenizer is not None
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.2.eh_proj.weight" in names and "model.layers.3.enorm.weight" in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names


def test_transformers_loads_the_trunk(micro_run):
    _, folder = micro_run
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rt = mtp_runtime.load(folder)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (rt.logits(ids) - expected).abs().max() < 1e-4


def test_trained_checkpoint_is_lossless(micro_run):
    _, folder = micro_run
    rt = mtp_runtime.load(folder)
    prompts = [rt.encode("def function_3_4(value):\n"), rt.encode("def function_1")]
    plain = rt.generate(input_ids=prompts, max_new_tokens=40, draft="none", ignore_eos=True)
    for draft in ("chain", "tree", "dynamic"):
        spec = rt.generate(input_ids=prompts, max_new_tokens=40, draft=draft, ignore_eos=True)
        assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    chain = rt.generate(input_ids=prompts[0], max_new_tokens=40, draft="chain", ignore_eos=True)
    assert chain.stats.mean_accepted_length > 1.2  # the repetitive corpus is learnt: drafts get accepted


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    first = Trainer(micro_settings(tmp_path, steps=10, eval_every=5, save_every=5))
    first.train()
    resumed = Trainer(micro_settings(tmp_path, steps=14, eval_every=5, save_every=5))
    assert resumed.step == 10
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in first.model.state_dict().items())
    resumed.train()
    assert resumed.step == 14
    first_run = first.history[-1]["elapsed_s"]
    # the log's clock goes on where the first run stopped (the log keeps its seconds rounded to 0.1)
    assert round(resumed.earlier_seconds, 1) >= first_run > 0
    assert resumed.history[-1]["elapsed_s"] > resumed.earlier_seconds


def test_mtp_only_distillation_keeps_the_trunk(micro_run, tmp_path):
    _, folder = micro_run
    settings = micro_settings(tmp_path, mtp_only=True, init=folder, distill=True, steps=6, eval_every=3,
                              num_mtp=3, arch_overrides={}, bias_update_speed=0.1)
    trainer = Trainer(settings)
    assert trainer.load.gates and all(id(g) in {id(m) for m in trainer.model.mtp.modules()} for g in trainer.load.gates)
    trunk_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith("mtp.")}
    out = trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in trunk_before.items())
    rt = mtp_runtime.load(out)
    assert rt.num_mtp_modules == 3
    base = mtp_runtime.load(folder)
    ids = torch.tensor([[5, 17, 42, 99]])
    assert (rt.logits(ids) - base.logits(ids)).abs().max() == 0


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # tab and comment\n",
    "naïve café — ünïcödé, 中文, emoji 🐍, \u200b zero-width, \r\n windows line\n",
    "   leading spaces and trailing   ",
    "",
])
def test_tokenizer_round_trips_any_text(micro_run, text):
    _, folder = micro_run
    rt = mtp_runtime.load(folder)
    ids = rt.encode(text) if text else []
    assert rt.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_held_out_split_is_stable_and_whole_files(tmp_path):
    root = write_corpus(tmp_path / "c")
    files = corpus.list_files([root])
    a = corpus.split_files(files, [root], 30)
    b = corpus.split_files(list(reversed(files)), [root], 30)
    assert set(a.held_out) == set(b.held_out) and a.held_out
    assert not set(a.held_out) & set(a.train) and len(a.held_out) + len(a.train) == len(files)


def test_default_corpus_excludes_installed_packages():
    files = corpus.list_files(corpus.default_corpus_roots())
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f.parts for f in files)


def test_continuations_are_the_trunks_own_output(micro_run):
    """Greedy windows are exactly plain greedy decoding of their prompt; sampled ones differ from it."""
    from mtp_runtime.train.continuations import generate_continuations

    trainer, folder = micro_run
    rt = mtp_runtime.load(folder)
    windows = generate_continuations(rt, trainer.train_ids, count=8, prompt_tokens=6, window=20, seed=3,
                                     temperature=1.0, batch_size=4)
    assert windows.shape == (8, 20)
    greedy = rt.generate(input_ids=windows[:4, :6].tolist(), max_new_tokens=14, draft="none", ignore_eos=True)
    assert [g.token_ids for g in greedy] == windows[:4, 6:].tolist()
    again = rt.generate(input_ids=windows[4:, :6].tolist(), max_new_tokens=14, draft="none", ignore_eos=True)
    assert [g.token_ids for g in again] != windows[4:, 6:].tolist()  # the second batch was sampled
    assert (windows[:, :6] == windows[:, :6]).all() and len({tuple(w[:6]) for w in windows.tolist()}) > 1


def test_training_chains_each_depth_on_its_own_previous_output(micro_run, monkeypatch):
    """Depth d runs module min(d, D) on depth d-1's output, at positions shifted by d: also beyond D."""
    trainer, _ = micro_run
    model = trainer.model
    calls = []
    original = type(model).forward_mtp

    def record(self, k, prev, tokens, plan):
        out = original(self, k, prev, tokens, plan)
        calls.append((k, prev, tokens, plan.positions, out))
        return out

    monkeypatch.setattr(type(model), "forward_mtp", record)
    window = torch.randint(0, 300, (2, 16 + 4 + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = window_losses(model, window, 16, distill=True, depth=4)
    assert len(losses.mtp) == 4 and [c[0] for c in calls] == [0, 1, 1, 1]  # two modules, the last one reused
    for d, (_, prev, tokens, positions, _) in enumerate(calls, start=1):
        assert torch.equal(tokens, window[:, d: d + 16]) and torch.equal(positions[0], torch.arange(16) + d)
        if d > 1:
            assert prev is calls[d - 2][4]  # fed exactly the previous depth's own output


def trunk_only(folder, dest):
    """A copy of the checkpoint without its MTP layers."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    n, config["num_nextn_predict_layers"] = config["num_hidden_layers"], 0
    (dest / "config.json").write_text(json.dumps(config))
    tensors = load_file(dest / "model.safetensors")
    keep = {k: v for k, v in tensors.items() if not any(k.startswith(f"model.layers.{n + i}.") for i in range(8))}
    save_file(keep, dest / "model.safetensors")
    return dest


def test_distilling_on_continuations_raises_acceptance(micro_run, tmp_path):
    """Fresh MTP modules trained on the trunk's continuations accept more drafts than untrained ones."""
    _, folder = micro_run
    base = micro_settings(tmp_path, out_dir=tmp_path / "a", mtp_only=True, init=trunk_only(folder, tmp_path / "trunk"),
                          distill=True, num_mtp=1, mtp_depth=2, continuations=48, continuation_prompt=8,
                          eval_every=100, arch_overrides={})
    untrained = Trainer(base).export()  # the fresh modules, before any step
    trained = Trainer(dataclasses.replace(base, out_dir=tmp_path / "b", steps=40, lr=2e-2)).train()
    prompts = [[5, 17, 42, 9], [3, 8, 8, 120]]

    def accepted(model_folder) -> float:
        rt = mtp_runtime.load(model_folder)
        runs = rt.generate(input_ids=prompts, max_new_tokens=40, draft="chain", num_draft_tokens=2, ignore_eos=True)
        return sum(r.stats.tau for r in runs) / len(runs)

    before, after = accepted(untrained), accepted(trained)
    assert after > before + 0.3


def test_exported_weights_have_the_permissions_of_the_other_files(micro_run):
    _, folder = micro_run
    mode = (folder / "config.json").stat().st_mode & 0o777
    for name in ("model.safetensors", "tokenizer.json", "training.json"):
        assert (folder / name).stat().st_mode & 0o777 == mode, name


def test_resuming_says_from_which_step(tmp_path, capsys):
    Trainer(micro_settings(tmp_path, steps=4, eval_every=2, save_every=2)).train()
    capsys.readouterr()
    resumed = Trainer(micro_settings(tmp_path, steps=6, eval_every=2, save_every=2))
    assert resumed.step == 4 and "resuming from step 4" in capsys.readouterr().out
    with pytest.raises(TrainingSettingsError, match="already at step 4, past --steps 3"):
        Trainer(micro_settings(tmp_path, steps=3))


def test_max_minutes_counts_the_data_preparation(tmp_path, capsys):
    """A budget used up by tokenizer training stops before any step, keeping what was prepared for the rerun."""
    with pytest.raises(MTPRuntimeError, match=r"--max-minutes 1e-06 ran out while preparing the tokenizer"):
        Trainer(micro_settings(tmp_path, max_minutes=1e-6))
    assert "tokenizer: training a 300-token byte-level BPE" in capsys.readouterr().out
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # kept: the rerun starts from it
    trainer = Trainer(micro_settings(tmp_path, steps=2, eval_every=2))
    assert trainer.step == 0 and "data: encoding" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, named", [
    (dict(steps=0), "--steps 0"), (dict(batch_size=0), "--batch-size 0"), (dict(lr=float("nan")), "--lr nan"),
    (dict(lr=0.0), "--lr 0.0"), (dict(vocab_size=10), "--vocab-size 10 .* in 257.."),
    (dict(eval_every=0), "--eval-every"), (dict(save_every=-1), "--save-every"), (dict(max_minutes=-1.0), "minutes"),
    (dict(steps="5"), "--steps '5'"), (dict(num_mtp=0), "--num-mtp"), (dict(mtp_weight=float("inf")), "weight"),
    (dict(arch_overrides={"nonsense": 3}), "nonsense"), (dict(arch_overrides={"vocab_size": 9}), "--vocab-size"),
    (dict(arch_overrides={"num_nextn_predict_layers": 2}), "--num-mtp"),
    (dict(mtp_only=True), "--mtp-only needs --init"), (dict(continuations=4), "--continuations needs --mtp-only"),
])
def test_settings_are_checked_before_anything_runs(tmp_path, overrides, named):
    settings = micro_settings(tmp_path, **overrides)
    with pytest.raises(TrainingSettingsError, match=named):
        Trainer(settings)
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingSettingsError, match="is a file"):
        Trainer(micro_settings(tmp_path, out_dir=tmp_path / "file"))
