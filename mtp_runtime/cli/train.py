"""`mtp-runtime train`: train a small DeepSeek-V3-shaped model with MTP modules (or only the MTP modules, or only
DeepSeek-V3.2 sparse-attention indexers for a checkpoint without them)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import MTPRuntimeError
from .common import friendly_errors


def parse_arch(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs with JSON values (numbers, true/false, null) or plain strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--arch")
        try:
            out[key] = json.loads(value)
        except (ValueError, RecursionError):
            out[key] = value
    return out


@click.command()
@click.argument("corpus", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder: tokenizer, token arrays, train_state.pt (resume), train_log.jsonl; the model "
                   "is exported to OUT/model.")
@click.option("--steps", default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", default=16, show_default=True, help="Windows per step.")
@click.option("--context", default=256, show_default=True, help="Tokens per window seen by the MTP modules.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate (warmup then cosine to 10%).")
@click.option("--warmup", default=100, show_default=True, help="Warmup steps.")
@click.option("--vocab-size", default=2048, show_default=True, help="Byte-level BPE vocabulary size.")
@click.option("--num-mtp", default=3, show_default=True, help="Number of MTP modules (D).")
@click.option("--mtp-weight", default=0.3, show_default=True, help="lambda: weight of the mean MTP loss.")
@click.option("--mtp-weight-late", default=0.1, show_default=True,
              help="lambda after 70% of the steps (the V3 report's 0.3 -> 0.1).")
@click.option("--mtp-only", is_flag=True, help="Train only fresh MTP modules on the frozen trunk of --init.")
@click.option("--indexer", is_flag=True,
              help="Give --init lightning indexers (DeepSeek Sparse Attention) and train only them, trunk and MTP "
                   "modules frozen: a dense warm-up of --dense-steps, then sparse training at --index-topk; exports "
                   "a deepseek_v32 folder.")
@click.option("--init", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Existing HF checkpoint folder whose trunk --mtp-only or --indexer keeps.")
@click.option("--index-heads", type=click.IntRange(min=1), default=4, show_default=True,
              help="--indexer: indexer heads per layer.")
@click.option("--index-head-dim", type=click.IntRange(min=1), default=32, show_default=True,
              help="--indexer: width of each indexer head and of the cached indexer key.")
@click.option("--index-topk", type=click.IntRange(min=1), default=64, show_default=True,
              help="--indexer: keys each query attends to in the sparse stage and the exported config.")
@click.option("--dense-steps", type=click.IntRange(min=0), default=200, show_default=True,
              help="--indexer: dense warm-up steps (of --steps).")
@click.option("--eval-topk", default="16,32,64,128", show_default=True, metavar="K[,K...]",
              help="--indexer: index_topk values the held-out loss is reported at (besides dense).")
@click.option("--distill", is_flag=True,
              help="MTP targets are the trunk's own predictions (self-distillation) instead of the corpus.")
@click.option("--mtp-depth", type=click.IntRange(min=1), default=None,
              help="Draft depths to train (default: one per MTP module); depths beyond --num-mtp train the last "
                   "module on its own outputs, as drafting deeper than the module count reuses it.")
@click.option("--continuations", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --mtp-only: train on N windows of the trunk's own continuations of corpus prompts (half "
                   "greedy, half sampled), generated once into OUT/data, instead of on corpus windows: the text the "
                   "modules will draft on. Losses count the generated part only.")
@click.option("--continuation-prompt", type=click.IntRange(min=1), default=64, show_default=True,
              help="Corpus tokens that start each continuation window.")
@click.option("--eval-every", default=200, show_default=True, help="Held-out evaluation interval (steps).")
@click.option("--save-every", default=100, show_default=True, help="Checkpoint interval (steps); rerun to resume.")
@click.option("--max-minutes", type=float, default=None,
              help="Wall-time budget of the whole run, tokenizer training and data preparation included: training "
                   "stops (and exports) in time for the final evaluation and export to fit.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; at most 4 per "
                                                          "core).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda to train on a GPU.")
@click.option("--seed", default=0, show_default=True)
@click.option("--arch", "arch", multiple=True, metavar="KEY=VALUE",
              help="Override an architecture field of the default shape (repeatable), e.g. --arch hidden_size=128.")
@friendly_errors
def train(corpus, out_dir, steps, batch_size, context, lr, warmup, vocab_size, num_mtp, mtp_weight,
          mtp_weight_late, mtp_only, indexer, init, index_heads, index_head_dim, index_topk, dense_steps, eval_topk,
          distill, mtp_depth, continuations, continuation_prompt, eval_every, save_every, max_minutes, threads,
          device, seed, arch):
    """Train a small DeepSeek-V3-shaped model with MTP modules (or only MTP modules, or only sparse-attention
    indexers with --indexer) on CORPUS.

    CORPUS: text files or folders (default: the running interpreter's standard-library Python sources).
    Whole files are held out by a stable hash of their path. Rerunning the same command resumes.
    """
    import torch

    from ..errors import TrainingSettingsError
    from ..runtime import resolve_device
    from ..threads import check_threads
    from ..train.trainer import Trainer, TrainSettings

    ctx = click.get_current_context()
    given = {name for name in ("vocab_size", "continuation_prompt")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if init is not None and "vocab_size" in given:
        raise TrainingSettingsError("--vocab-size does not apply with --init: the tokenizer is --init's")
    if not continuations and "continuation_prompt" in given:
        raise TrainingSettingsError("--continuation-prompt does not apply without --continuations N")
    if check_threads(threads):
        torch.set_num_threads(threads)
    if indexer:
        _check_indexer_options(init, mtp_only, distill, continuations, mtp_depth, arch)
        from ..train.indexer_trainer import IndexerTrainer, IndexerTrainSettings

        settings = IndexerTrainSettings(
            out_dir=out_dir, init=init, corpus=list(corpus), n_heads=index_heads, head_dim=index_head_dim,
            topk=index_topk, dense_steps=dense_steps, steps=steps, batch_size=batch_size, context=context, lr=lr,
            warmup=warmup, eval_topk=_topk_list(eval_topk), eval_every=eval_every, save_every=save_every, seed=seed,
            max_minutes=max_minutes, device=str(resolve_device(device)))
        click.echo(f"model written to {IndexerTrainer(settings).train()}")
        return
    settings = TrainSettings(
        out_dir=out_dir, corpus=list(corpus), steps=steps, batch_size=batch_size, context=context, lr=lr,
        warmup=warmup, vocab_size=vocab_size, num_mtp=num_mtp, mtp_weight=mtp_weight,
        mtp_weight_late=mtp_weight_late, mtp_only=mtp_only, init=init, distill=distill, mtp_depth=mtp_depth,
        continuations=continuations, continuation_prompt=continuation_prompt, eval_every=eval_every,
        save_every=save_every, max_minutes=max_minutes, seed=seed, arch_overrides=parse_arch(arch),
        device=str(resolve_device(device)))
    folder = Trainer(settings).train()
    click.echo(f"model written to {folder}")


def _check_indexer_options(init, mtp_only, distill, continuations, mtp_depth, arch) -> None:
    """--indexer trains indexers for an existing checkpoint and nothing else."""
    if init is None:
        raise MTPRuntimeError("--indexer needs --init FOLDER: the checkpoint that gets indexers")
    clashing = [name for name, given in (("--mtp-only", mtp_only), ("--distill", distill),
                                         ("--continuations", continuations), ("--mtp-depth", mtp_depth is not None),
                                         ("--arch", bool(arch))) if given]
    if clashing:
        raise MTPRuntimeError(f"--indexer trains only the indexers; drop {', '.join(clashing)}")


def _topk_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise MTPRuntimeError(f"--eval-topk {text!r} is not a comma-separated list of positive integers")
    return values
