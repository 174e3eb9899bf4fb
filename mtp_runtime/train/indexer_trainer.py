"""`mtp-runtime train --indexer`: give a checkpoint without sparse attention (DeepSeek-V3, the shipped model)
lightning indexers in every layer, trunk and MTP modules, and train only them (indexer_objective.py): a dense
warm-up, then sparse training with top-k selection. The result is a DeepSeek-V3.2 (`deepseek_v32`) folder whose
non-indexer weights are the --init checkpoint's, bit for bit.

Held-out evaluation reports the trunk's next-token loss dense (every key attended, which is the --init model
exactly) and sparse at several index_topk values, plus the held-out KL of the dense and sparse objectives.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import CheckpointFiles, save_checkpoint
from ..config import ModelConfig
from ..errors import MTPRuntimeError
from ..model import DeepseekForCausalLM
from . import corpus
from .indexer_objective import capture_inputs, indexer_kl
from .objectives import window_losses
from .trainer import _jsonable, prepare_data, warmup_cosine

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass
class IndexerTrainSettings:
    """Run-time knobs of one indexer training run."""

    out_dir: Path
    init: Path
    """The checkpoint whose model (trunk and MTP modules) is kept frozen and given indexers."""
    corpus: list[Path] = field(default_factory=list)
    held_out_percent: int = 5
    n_heads: int = 4
    head_dim: int = 32
    topk: int = 64
    """index_topk of the sparse training stage and of the exported config."""
    dense_steps: int = 200
    """Warm-up steps with dense attention before the sparse stage."""
    steps: int = 600
    batch_size: int = 8
    context: int = 256
    lr: float = 1e-3
    warmup: int = 20
    eval_topk: tuple[int, ...] = (16, 32, 64, 128)
    eval_every: int = 100
    eval_windows: int = 64
    save_every: int = 100
    seed: int = 0
    max_minutes: float | None = None
    device: str = "cpu"


class IndexerTrainer:
    def __init__(self, settings: IndexerTrainSettings):
        self.s = settings
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if not (Path(settings.init) / "tokenizer.json").is_file():
            raise MTPRuntimeError(f"--indexer trains on text, so --init {settings.init} needs a tokenizer.json")
        torch.manual_seed(settings.seed)
        _, self.train_ids, self.held_ids = prepare_data(self.out, settings.corpus, settings.held_out_percent, 0,
                                                        settings.init)
        self.model, self.raw_config = self._build_model()
        self.model.to(settings.device)
        self.dense = self.with_topk(settings.context + self.depth)
        """The same parameters attending densely (the warm-up's model, and the dense evaluation)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.step, self.history = 0, []
        self._resume()

    @property
    def depth(self) -> int:
        """MTP depths the training windows feed (one per module)."""
        return self.model.num_mtp

    def _build_model(self) -> tuple[DeepseekForCausalLM, dict]:
        from ..runtime import Runtime

        base = Runtime.from_folder(self.s.init, device="cpu", dtype="float32")
        if base.config.q_lora_rank is None:
            raise MTPRuntimeError(f"{self.s.init} has no q_lora_rank (no query compression), but the indexer reads "
                                  "the query latent; --indexer needs a checkpoint with q_lora_rank")
        raw = {**base.config.to_hf_dict(), "model_type": "deepseek_v32", "index_n_heads": self.s.n_heads,
               "index_head_dim": self.s.head_dim, "index_topk": self.s.topk}
        config = ModelConfig.from_dict(raw)
        own_head = base.num_mtp_modules > 0 and base.model.mtp[0].shared_head.head is not None
        own_embedding = base.num_mtp_modules > 0 and base.model.mtp[0].embed_tokens is not None
        model = DeepseekForCausalLM(config, base.num_mtp_modules, own_head, own_embedding)
        missing, unexpected = model.load_state_dict(base.model.state_dict(), strict=False)
        if unexpected or any(".indexer." not in name for name in missing):
            raise MTPRuntimeError(f"{self.s.init}: cannot reuse its weights for the indexed model "
                                  f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
        init_indexers(model)
        for name, param in model.named_parameters():
            param.requires_grad = ".indexer." in name
        return model, raw

    def with_topk(self, topk: int) -> DeepseekForCausalLM:
        """A model sharing this one's parameters whose layers attend to their top `topk` keys."""
        cfg = self.model.config
        model = DeepseekForCausalLM(replace(cfg, indexer=replace(cfg.indexer, topk=topk)), self.model.num_mtp,
                                    self._own_head, self._own_embedding).to(self.s.device)
        model.load_state_dict(self.model.state_dict(keep_vars=True), assign=True)
        return model.eval()

    @property
    def _own_head(self) -> bool:
        return self.model.num_mtp > 0 and self.model.mtp[0].shared_head.head is not None

    @property
    def _own_embedding(self) -> bool:
        return self.model.num_mtp > 0 and self.model.mtp[0].embed_tokens is not None

    def windows(self, ids: np.ndarray, count: int, rng: np.random.Generator, length: int) -> torch.Tensor:
        starts = rng.integers(0, len(ids) - length, size=count)
        return torch.from_numpy(np.stack([ids[i: i + length].astype(np.int64) for i in starts])).to(self.s.device)

    def in_warmup(self, step: int) -> bool:
        return step < self.s.dense_steps

    def objective(self, window: torch.Tensor, dense: bool) -> tuple[torch.Tensor, float]:
        """(mean KL over every sparse-attention layer, the trunk loss) on windows; dense: the warm-up's."""
        model = self.dense if dense else self.model
        capture = capture_inputs(model, window, self.s.context, self.depth)
        kls = [indexer_kl(layer, None if dense else self.s.topk) for layer in capture.inputs]
        return torch.stack(kls).mean(), capture.trunk_loss

    def train(self) -> Path:
        """Run until `steps` (or max_minutes), evaluating and checkpointing; then export the V3.2 folder."""
        start = time.time()
        if not self.history:
            self._evaluate(0.0)  # the untrained indexers' figures
        bar = tqdm(total=self.s.steps, initial=self.step, desc="indexer", unit="step", dynamic_ncols=True)
        while self.step < self.s.steps:
            metrics = self._train_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(stage=metrics["stage"], kl=f"{metrics['kl']:.4f}")
            if self.step % self.s.eval_every == 0 or self.step == self.s.steps:
                self._evaluate(time.time() - start)
            if self.step % self.s.save_every == 0:
                self._save_state()
            if self.s.max_minutes is not None and time.time() - start > 60 * self.s.max_minutes:
                bar.write(f"stopping at step {self.step}: --max-minutes {self.s.max_minutes} reached")
                self._evaluate(time.time() - start)
                break
        bar.close()
        self._save_state()
        return self.export()

    def _train_step(self) -> dict:
        rng = np.random.default_rng([self.s.seed, self.step])
        batch = self.windows(self.train_ids, self.s.batch_size, rng, self.s.context + self.depth + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_cosine(self.step, self.s.lr, self.s.warmup, self.s.steps)
        dense = self.in_warmup(self.step)
        kl, _ = self.objective(batch, dense)
        self.optimizer.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        return {"stage": "dense" if dense else "sparse", "kl": kl.item()}

    def evaluate(self) -> dict:
        """Held-out trunk loss dense and at each eval_topk, and the held-out KL of both objectives."""
        batch = self.windows(self.held_ids, self.s.eval_windows, np.random.default_rng(12345),
                             self.s.context + self.depth + 1)
        chunks = batch.split(8)
        with torch.no_grad():
            losses = {"dense": self._trunk_loss(self.dense, chunks)}
            for topk in self.s.eval_topk:
                losses[str(topk)] = self._trunk_loss(self.with_topk(topk), chunks)
            kl_dense = float(np.mean([self.objective(c, dense=True)[0].item() for c in chunks]))
            kl_sparse = float(np.mean([self.objective(c, dense=False)[0].item() for c in chunks]))
        return {"held_out_loss": losses, "kl_dense": kl_dense, "kl_sparse": kl_sparse}

    def _trunk_loss(self, model: DeepseekForCausalLM, chunks) -> float:
        return float(np.mean([window_losses(model, c, self.s.context, depth=0).trunk.item() for c in chunks]))

    def _evaluate(self, elapsed: float) -> None:
        result = {"step": self.step, "elapsed_s": round(elapsed, 1), **self.evaluate()}
        self.history.append(result)
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(result) + "\n")
        losses = ", ".join(f"{k} {v:.3f}" for k, v in result["held_out_loss"].items())
        tqdm.write(f"step {self.step}: held-out loss by index_topk: {losses}; KL dense {result['kl_dense']:.4f}, "
                   f"sparse {result['kl_sparse']:.4f}")

    def _resume(self) -> None:
        state_file = self.out / "train_state.pt"
        if not state_file.is_file():
            return
        state = torch.load(state_file, weights_only=False, map_location=self.s.device)
        self.model.load_state_dict(state["indexers"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]

    def _save_state(self) -> None:
        indexers = {k: v for k, v in self.model.state_dict().items() if ".indexer." in k}
        tmp = self.out / "train_state.pt.tmp"
        torch.save({"indexers": indexers, "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "history": self.history, "settings": _jsonable(asdict(self.s))}, tmp)
        tmp.replace(self.out / "train_state.pt")

    def export(self) -> Path:
        """The DeepSeek-V3.2 folder: --init's weights in its own dtype (so unchanged), the trained indexers, the
        tokenizer, and the training history."""
        folder = self.out / "model"
        dtype = _stored_dtype(Path(self.s.init))
        state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v).cpu()
                 for k, v in self.model.state_dict().items()}
        config = self.model.config.to_hf_dict()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        save_checkpoint(folder, config, state, self.model.config.num_hidden_layers)
        shutil.copy(self.out / "tokenizer.json", folder / "tokenizer.json")
        corpus.write_tokenizer_config(folder)
        (folder / "training.json").write_text(json.dumps(
            {"settings": _jsonable(asdict(self.s)), "history": self.history}, indent=2) + "\n", encoding="utf-8")
        return folder


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint stores its embedding in (its weights round-trip exactly through it)."""
    stored = CheckpointFiles(folder).entry("model.embed_tokens.weight").dtype
    return SAFETENSORS_DTYPES.get(stored, torch.float32)


@torch.no_grad()
def init_indexers(model: DeepseekForCausalLM) -> None:
    """Fresh indexers: projections ~ N(0, 1 / fan_in), the key LayerNorm the identity."""
    for name, param in model.named_parameters():
        if ".indexer." not in name:
            continue
        if name.endswith("k_norm.weight"):
            param.fill_(1.0)
        elif name.endswith("k_norm.bias"):
            param.zero_()
        else:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]))

