"""`train --indexer`: a micro run gives a V3 checkpoint trained lightning indexers and exports a DeepSeek-V3.2
folder whose other weights are the checkpoint's own; the indexers learn (held-out KL falls) and decode losslessly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mtp_runtime
from builders import build_checkpoint
from mtp_runtime.train.corpus import train_tokenizer
from mtp_runtime.train.indexer_objective import capture_inputs
from mtp_runtime.train.indexer_trainer import IndexerTrainer, IndexerTrainSettings
from test_cli import assert_one_line_error, run
from test_train import write_corpus


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint with 2 MTP modules and a tokenizer of the micro corpus."""
    tmp = tmp_path_factory.mktemp("indexer")
    corpus_dir = write_corpus(tmp / "corpus")
    folder = tmp / "v3"
    folder.mkdir()
    tokenizer = train_tokenizer(sorted(corpus_dir.glob("*.py")), 300, folder / "tokenizer.json")
    build_checkpoint(folder, vocab=tokenizer.get_vocab_size(), num_mtp=2, seed=5, context_scale=0.5)
    return folder, corpus_dir


def settings(tmp_path, init, corpus_dir, **overrides) -> IndexerTrainSettings:
    base = dict(out_dir=tmp_path / "run", init=init, corpus=[corpus_dir], held_out_percent=30, n_heads=2,
                head_dim=8, topk=6, dense_steps=8, steps=16, batch_size=4, context=24, lr=2e-2, warmup=2,
                eval_topk=(3, 6), eval_every=8, eval_windows=8, save_every=8)
    base.update(overrides)
    return IndexerTrainSettings(**base)


@pytest.fixture(scope="module")
def micro_run(dense_checkpoint, tmp_path_factory):
    init, corpus_dir = dense_checkpoint
    torch.manual_seed(0)
    trainer = IndexerTrainer(settings(tmp_path_factory.mktemp("indexer_run"), init, corpus_dir))
    return trainer, trainer.train()


def test_the_indexers_learn_the_attention_distribution(micro_run):
    trainer, _ = micro_run
    first, last = trainer.history[0], trainer.history[-1]
    assert (first["step"], last["step"]) == (0, 16)
    assert last["kl_dense"] < 0.8 * first["kl_dense"] and last["kl_sparse"] < first["kl_sparse"]
    assert set(last["held_out_loss"]) == {"dense", "3", "6"}


def test_export_is_a_v32_folder_with_the_checkpoints_own_weights(micro_run, dense_checkpoint):
    _, folder = micro_run
    init, _ = dense_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and (config["index_topk"], config["index_n_heads"]) == (6, 2)
    sparse, dense = mtp_runtime.load(folder), mtp_runtime.load(init)
    theirs = dense.model.state_dict()
    for name, tensor in sparse.model.state_dict().items():
        if ".indexer." not in name:
            assert torch.equal(tensor, theirs[name]), name
    assert any(".mtp." in f".{name}" and ".indexer." in name for name in sparse.model.state_dict())
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])  # shorter than index_topk: the sparse model attends densely
    assert torch.equal(sparse.logits(ids), dense.logits(ids))


def test_the_trained_checkpoint_decodes_losslessly(micro_run):
    _, folder = micro_run
    rt = mtp_runtime.load(folder)
    prompts = [rt.encode("def function_3_4(value):\n"), rt.encode("def function_1")]
    plain = rt.generate(input_ids=prompts, max_new_tokens=24, draft="none", ignore_eos=True)
    spec = rt.generate(input_ids=prompts, max_new_tokens=24, draft="tree", tree="2,1", ignore_eos=True)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]


def test_only_sparse_attention_layer_inputs_are_captured(micro_run):
    trainer, _ = micro_run
    window = torch.randint(0, 200, (2, 24 + 2 + 1), generator=torch.Generator().manual_seed(0))
    capture = capture_inputs(trainer.model, window, 24, depth=2)
    layers = trainer.model.config.num_hidden_layers
    assert len(capture.inputs) == layers + 2  # every trunk layer, then one per MTP depth
    assert [c.hidden.shape[1] for c in capture.inputs] == [26] * layers + [24, 24]


def test_resume_continues_the_run(dense_checkpoint, tmp_path):
    init, corpus_dir = dense_checkpoint
    IndexerTrainer(settings(tmp_path, init, corpus_dir, steps=4, dense_steps=2, eval_every=4, save_every=4)).train()
    resumed = IndexerTrainer(settings(tmp_path, init, corpus_dir, steps=6, dense_steps=2, eval_every=4,
                                      save_every=4))
    assert resumed.step == 4 and len(resumed.history) == 2
    resumed.train()
    assert resumed.step == 6


def test_cli_errors(dense_checkpoint, tmp_path):
    init, corpus_dir = dense_checkpoint
    assert_one_line_error(run("train", corpus_dir, "--out", tmp_path / "a", "--indexer"), "--init")
    assert_one_line_error(run("train", corpus_dir, "--out", tmp_path / "b", "--indexer", "--init", init,
                              "--mtp-only"), "drop --mtp-only")
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(init, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert_one_line_error(run("train", corpus_dir, "--out", tmp_path / "c", "--indexer", "--init", no_tokenizer),
                          "tokenizer.json")
