"""The training loop: data windows, AdamW with warmup + cosine decay, aux-loss-free expert balancing,
periodic held-out evaluation, resumable checkpoints, and export as an HF DeepSeek-V3 folder."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import load_model, open_folder, save_checkpoint
from ..config import ModelConfig
from ..errors import MTPRuntimeError, TrainingSettingsError
from ..model import DeepseekForCausalLM
from ..model.moe import Gate
from ..validate import finite_float, is_int, show
from . import corpus
from .continuations import generate_continuations
from .objectives import window_losses


def default_architecture(vocab_size: int, num_mtp: int = 3) -> dict:
    """The shipped model's shape: DeepSeek-V3 in miniature (MLA with q/kv compression, one dense layer,
    sigmoid-gated MoE with a shared expert, D MTP modules)."""
    return {
        "model_type": "deepseek_v3", "vocab_size": vocab_size, "hidden_size": 192, "intermediate_size": 512,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 2, "topk_group": 2, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
        "num_nextn_predict_layers": num_mtp, "hidden_act": "silu", "attention_bias": False,
    }


@dataclass
class TrainSettings:
    """Run-time knobs of one training run."""

    out_dir: Path
    corpus: list[Path] = field(default_factory=list)
    """Files/folders of text; empty = the standard library's Python sources."""
    held_out_percent: int = 5
    vocab_size: int = 2048
    num_mtp: int = 3
    context: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    """lambda: weight of the mean MTP loss (V3 used 0.3, then 0.1)."""
    mtp_weight_late: float | None = 0.1
    """lambda after 70% of the steps (None keeps mtp_weight)."""
    mtp_only: bool = False
    init: Path | None = None
    """An existing checkpoint folder: the frozen trunk for --mtp-only."""
    distill: bool = False
    mtp_depth: int | None = None
    """Draft depths trained (default: one per module); depths beyond num_mtp reuse the last module, as drafting
    deeper than D does."""
    continuations: int = 0
    """With --mtp-only: train on this many windows of the trunk's own continuations of corpus prompts instead of
    corpus windows (generated once, half greedy and half sampled; see continuations.py)."""
    continuation_prompt: int = 64
    """Corpus tokens at the start of each continuation window; MTP losses count only the generated part."""
    continuation_temperature: float = 0.8
    eval_every: int = 200
    eval_windows: int = 64
    save_every: int = 100
    seed: int = 0
    max_minutes: float | None = None
    bias_update_speed: float = 1e-3
    save_dtype: str = "bfloat16"
    device: str = "cpu"
    """Where to train: cpu, or cuda when a GPU is available."""
    arch_overrides: dict = field(default_factory=dict)
    """config.json fields replacing default_architecture()'s (e.g. {"hidden_size": 64})."""

    def validate(self) -> None:
        """Raise TrainingSettingsError naming the first setting of the wrong type, out of range, or not applying."""
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise TrainingSettingsError(f"--out {out} is a file; give a folder (it is created when missing)")
        for name, low in (("steps", 1), ("batch_size", 1), ("context", 2), ("warmup", 0), ("num_mtp", 1),
                          ("eval_every", 1), ("eval_windows", 1), ("save_every", 1), ("seed", 0),
                          ("continuations", 0), ("continuation_prompt", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("vocab_size", self.vocab_size, MIN_VOCAB, MAX_VOCAB)
        _check_int("held_out_percent", self.held_out_percent, 1, 99)
        if self.mtp_depth is not None:
            _check_int("mtp_depth", self.mtp_depth, 1)
        for name, positive in (("lr", True), ("weight_decay", False), ("mtp_weight", False),
                               ("mtp_weight_late", False), ("bias_update_speed", False), ("max_minutes", True),
                               ("continuation_temperature", True)):
            value = getattr(self, name)
            if value is None and name in ("mtp_weight_late", "max_minutes"):
                continue
            number = finite_float(value)
            if number is None or number < 0 or (positive and number == 0):
                bound = "> 0" if positive else ">= 0"
                raise TrainingSettingsError(f"{_option(name)} {show(value)} is invalid: expected a finite number "
                                            f"{bound}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainingSettingsError(f"save_dtype={show(self.save_dtype)}; use one of {', '.join(SAVE_DTYPES)}")
        if self.mtp_only and self.init is None:
            raise TrainingSettingsError("--mtp-only needs --init FOLDER: the checkpoint whose trunk gets MTP modules")
        if self.init is not None and not self.mtp_only:
            raise TrainingSettingsError("--init names the trunk that --mtp-only trains modules for; add --mtp-only")
        if self.continuations and not self.mtp_only:
            raise TrainingSettingsError("--continuations needs --mtp-only: the continuations come from a trained "
                                        "trunk")
        if self.mtp_only and self.arch_overrides:
            raise TrainingSettingsError("--arch does not apply with --mtp-only: the architecture is --init's")
        check_arch_overrides(self.arch_overrides)


MIN_VOCAB = 257
"""A byte-level BPE vocabulary holds at least the 256 bytes and <|endoftext|>."""
MAX_VOCAB = 2**20
SAVE_DTYPES = ("bfloat16", "float32")
NOT_ARCH_OVERRIDES = {"vocab_size": "--vocab-size", "num_nextn_predict_layers": "--num-mtp",
                      "num_mtp_layers": "--num-mtp", "eos_token_id": None, "bos_token_id": None}
"""Architecture fields --arch may not set: those with their own option, and those the tokenizer decides."""


def architecture_fields() -> set[str]:
    """The config.json fields --arch may override: default_architecture()'s and every ModelConfig field."""
    names = set(default_architecture(MIN_VOCAB)) | {f.name for f in fields(ModelConfig)} | {"rope_scaling"}
    return names - set(NOT_ARCH_OVERRIDES) - {"rope"}


def check_arch_overrides(overrides: dict) -> None:
    """Raise TrainingSettingsError for an --arch key that is no architecture field (or has its own option)."""
    known = architecture_fields()
    for key in overrides:
        if key in NOT_ARCH_OVERRIDES:
            instead = NOT_ARCH_OVERRIDES[key]
            raise TrainingSettingsError(f"--arch {key} is not set with --arch: "
                                        + (f"use {instead}" if instead else "the tokenizer decides it"))
        if key not in known:
            raise TrainingSettingsError(f"--arch {show(key)} is not an architecture field; use one of "
                                        f"{', '.join(sorted(known))}")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not is_int(value, low, high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise TrainingSettingsError(f"{_option(name)} {show(value)} is invalid: expected an integer {bound}")


class ExpertLoad:
    """Counts tokens per expert through forward hooks on the gates, for the aux-loss-free bias update (of the
    MTP modules' gates only with `mtp_only`: a frozen trunk keeps its routing)."""

    def __init__(self, model: DeepseekForCausalLM, mtp_only: bool = False):
        modules = model.mtp.modules() if mtp_only else model.modules()
        self.gates = [m for m in modules if isinstance(m, Gate) and hasattr(m, "e_score_correction_bias")]
        self.counts = {id(g): torch.zeros(g.weight.shape[0]) for g in self.gates}
        self.handles = [g.register_forward_hook(self._record) for g in self.gates]

    def _record(self, gate, inputs, output) -> None:
        ids = output[1].detach().flatten().cpu()
        self.counts[id(gate)] += torch.bincount(ids, minlength=gate.weight.shape[0]).float()

    @torch.no_grad()
    def update_biases(self, speed: float) -> None:
        """bias += speed * sign(mean load - load): underloaded experts become more likely (V3 report)."""
        for gate in self.gates:
            load = self.counts[id(gate)]
            if load.sum() > 0:
                gate.e_score_correction_bias += speed * torch.sign(load.mean() - load).to(gate.weight.device)
            load.zero_()


class Trainer:
    """One training run: the data and model it prepares, the loop, its checkpoints and the export.

    --max-minutes counts from the construction on: tokenizer training, data preparation and the continuations are
    inside the budget, and the loop stops early enough for the final evaluation and the export to fit."""

    def __init__(self, settings: TrainSettings):
        settings.validate()
        self.started = time.time()
        self.earlier_seconds = 0.0
        """Wall time of the earlier runs this one resumes (the log's elapsed_s counts them)."""
        self.s = settings
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(settings.seed)
        self.tokenizer, self.train_ids, self.held_ids = self._prepare_data()
        self.model, self.raw_config = self._build_model()
        self.model.to(settings.device)
        self.distill_windows = self._continuations() if settings.continuations else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr, betas=(0.9, 0.95))
        self.load = ExpertLoad(self.model, self.s.mtp_only)
        self.step, self.history = 0, []
        self._resume()

    def elapsed(self) -> float:
        """Seconds since this run started (what --max-minutes counts)."""
        return time.time() - self.started

    def _over_budget(self, reserve: float = 0.0) -> bool:
        return self.s.max_minutes is not None and self.elapsed() + reserve > 60 * self.s.max_minutes

    def _prepare_data(self):
        """Tokenizer (trained once, or the --init checkpoint's) and token arrays for both splits."""
        return prepare_data(self.out, self.s.corpus, self.s.held_out_percent, self.s.vocab_size, self.s.init,
                            self._check_budget)

    def _check_budget(self, stage: str) -> None:
        """Stop before training when preparation alone used up --max-minutes (what it made is kept in OUT)."""
        if self._over_budget():
            raise MTPRuntimeError(
                f"--max-minutes {self.s.max_minutes:g} ran out while {stage} ({self.elapsed() / 60:.1f} min); "
                f"what is done is saved in {self.out}: rerun the same command (with more minutes) to go on")

    @property
    def depth(self) -> int:
        """Draft depths trained."""
        return self.s.mtp_depth or self.s.num_mtp

    @property
    def window_length(self) -> int:
        return self.s.context + self.depth + 1

    def _continuations(self) -> np.ndarray:
        """The trunk's own continuations of training-split prompts, generated once per run folder."""
        if not 0 < self.s.continuation_prompt < self.window_length - 1:
            raise MTPRuntimeError(f"--continuation-prompt {self.s.continuation_prompt} must lie in "
                                  f"1..{self.window_length - 2} (the window is context + depth + 1 tokens)")
        path = self.out / "data" / (f"continuations-{self.s.continuations}x{self.window_length}-"
                                    f"{self.s.continuation_prompt}-{self.s.seed}.npy")
        if not path.is_file():
            from ..runtime import Runtime

            tqdm.write(f"data: generating {self.s.continuations} continuation windows with the trunk into {path}")
            runtime = Runtime(copy.deepcopy(self.model).to("cpu" if self.s.device == "cpu" else self.s.device))
            windows = generate_continuations(
                runtime, self.train_ids, self.s.continuations, self.s.continuation_prompt, self.window_length,
                seed=self.s.seed, temperature=self.s.continuation_temperature)
            np.save(path, windows)
            self._check_budget("generating the continuations")
        return np.load(path)

    def _build_model(self):
        if self.s.mtp_only:
            return self._build_mtp_only()
        raw = {**default_architecture(self.tokenizer.get_vocab_size(), self.s.num_mtp), **self.s.arch_overrides}
        raw["eos_token_id"] = raw["bos_token_id"] = self.tokenizer.token_to_id(corpus.EOS)
        model = DeepseekForCausalLM(ModelConfig.from_dict(raw), num_mtp=self.s.num_mtp)
        init_weights(model)
        return model, raw

    def _build_mtp_only(self):
        """Frozen trunk from --init; its MTP modules are trained further where it has them, fresh otherwise."""
        folder = open_folder(self.s.init)
        base = load_model(folder, torch.device("cpu"), torch.float32)
        raw = dict(folder.raw_config, num_nextn_predict_layers=self.s.num_mtp)
        model = DeepseekForCausalLM(ModelConfig.from_dict(raw), num_mtp=self.s.num_mtp)
        init_weights(model)
        own = model.state_dict()
        reused = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(reused, strict=False)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("mtp.")
        return model, raw

    def _resume(self) -> None:
        state_file = self.out / "train_state.pt"
        if not state_file.is_file():
            return
        state = torch.load(state_file, weights_only=False, map_location=self.s.device)
        if state["step"] > self.s.steps:
            raise TrainingSettingsError(f"{self.out} is already at step {state['step']}, past --steps {self.s.steps}; "
                                        "raise --steps to go on, or train into a new --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        self.earlier_seconds = state.get("elapsed_s", 0.0)
        tqdm.write(f"resuming from step {self.step} ({state_file})")

    def _save_state(self) -> None:
        tmp = self.out / "train_state.pt.tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "history": self.history, "elapsed_s": self.earlier_seconds + self.elapsed(),
                    "settings": _jsonable(asdict(self.s))}, tmp)
        tmp.replace(self.out / "train_state.pt")

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.s.lr, self.s.warmup, self.s.steps)

    def mtp_weight_at(self, step: int) -> float:
        late = self.s.mtp_weight_late
        return late if late is not None and step >= 0.7 * self.s.steps else self.s.mtp_weight

    def windows(self, ids: np.ndarray, count: int, rng: np.random.Generator) -> torch.Tensor:
        """count random windows of context + depth + 1 tokens."""
        length = self.window_length
        starts = rng.integers(0, len(ids) - length, size=count)
        windows = torch.from_numpy(np.stack([ids[i: i + length].astype(np.int64) for i in starts]))
        return windows.to(self.s.device)

    def train(self) -> Path:
        """Run until `steps` (or max_minutes), evaluating and checkpointing; then export the HF folder."""
        bar = tqdm(total=self.s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        tokens_per_step = self.s.batch_size * self.s.context
        reserve = 0.0  # what the final evaluation, checkpoint and export will take: measured as they happen
        while self.step < self.s.steps:
            t0 = time.time()
            metrics = self._train_step()
            self.step += 1
            step_seconds = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['trunk']:.3f}", mtp=f"{metrics['mtp']:.3f}",
                            acc1=f"{metrics['acc'][0]:.2f}", tok_s=f"{tokens_per_step / step_seconds:.0f}")
            t1 = time.time()
            if self.step % self.s.eval_every == 0 or self.step == self.s.steps:
                self._evaluate(self.earlier_seconds + self.elapsed())
            if self.step % self.s.save_every == 0:
                self._save_state()
            reserve = max(reserve, 2 * (time.time() - t1), 4 * step_seconds)
            if self.step < self.s.steps and self._over_budget(reserve):
                bar.write(f"stopping at step {self.step}: --max-minutes {self.s.max_minutes:g} reached (the "
                          "final evaluation and the export fit in what is left)")
                self._evaluate(self.earlier_seconds + self.elapsed())
                break
        bar.close()
        self._save_state()
        return self.export()

    def _train_step(self) -> dict:
        self.model.train()
        rng = np.random.default_rng([self.s.seed, self.step])
        loss_start = 0
        if self.distill_windows is not None:
            rows = rng.integers(0, len(self.distill_windows), size=self.s.batch_size)
            batch = torch.from_numpy(self.distill_windows[rows]).to(self.s.device)
            loss_start = self.s.continuation_prompt
        else:
            batch = self.windows(self.train_ids, self.s.batch_size, rng)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        losses = window_losses(self.model, batch, self.s.context, self.s.distill, not self.s.mtp_only, self.depth,
                               loss_start)
        loss = losses.total(self.mtp_weight_at(self.step), train_trunk=not self.s.mtp_only)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.load.update_biases(self.s.bias_update_speed)
        return {"trunk": losses.trunk.item(), "mtp": float(torch.stack(losses.mtp).mean().detach()),
                "acc": [float(a) for a in losses.mtp_accuracy]}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out next-token loss, perplexity, and per-module MTP loss / top-1 agreement (fixed windows)."""
        self.model.eval()
        batch = self.windows(self.held_ids, self.s.eval_windows, np.random.default_rng(12345))
        parts = [window_losses(self.model, chunk, self.s.context, self.s.distill, depth=self.depth)
                 for chunk in batch.split(16)]
        trunk = float(np.mean([p.trunk.item() for p in parts]))
        mtp = np.mean([[m.item() for m in p.mtp] for p in parts], axis=0).tolist()
        acc = np.mean([[a.item() for a in p.mtp_accuracy] for p in parts], axis=0).tolist()
        for handle_counts in self.load.counts.values():
            handle_counts.zero_()
        return {"held_out_loss": trunk, "perplexity": math.exp(trunk), "mtp_loss": mtp, "mtp_top1": acc}

    def _evaluate(self, elapsed: float) -> None:
        result = {"step": self.step, "elapsed_s": round(elapsed, 1), **self.evaluate()}
        self.history.append(result)
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(result) + "\n")
        tqdm.write(f"step {self.step}: held-out loss {result['held_out_loss']:.3f} (ppl {result['perplexity']:.1f}), "
                   f"MTP top-1 {', '.join(f'{a:.2f}' for a in result['mtp_top1'])}")

    def export(self) -> Path:
        """Write the HF DeepSeek-V3 folder: config.json, model.safetensors (MTP at layers N..N+D-1), tokenizer."""
        folder = self.out / "model"
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.s.save_dtype]
        state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v).cpu()
                 for k, v in self.model.state_dict().items()}
        config = ModelConfig.from_dict(self.raw_config).to_hf_dict()
        config["torch_dtype"] = self.s.save_dtype
        save_checkpoint(folder, config, state, config["num_hidden_layers"])
        shutil.copy(self.out / "tokenizer.json", folder / "tokenizer.json")
        corpus.write_tokenizer_config(folder)
        (folder / "training.json").write_text(json.dumps(
            {"settings": _jsonable(asdict(self.s)), "history": self.history}, indent=2) + "\n", encoding="utf-8")
        return folder


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """Learning rate at `step`: linear warmup to lr, then cosine decay to 10% of it at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def prepare_data(out: Path, corpus_paths: list[Path], held_out_percent: int, vocab_size: int,
                 init: Path | None = None, check_budget: Callable[[str], None] | None = None):
    """(tokenizer, train ids, held-out ids) of a run folder: the tokenizer trained once (or copied from the `init`
    checkpoint), the token arrays encoded once into out/data. `check_budget(stage)` runs after each stage."""
    check_budget = check_budget or (lambda stage: None)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    roots = [Path(p) for p in corpus_paths] or corpus.default_corpus_roots()
    files = corpus.list_files(roots)
    split = corpus.split_files(files, roots, held_out_percent)
    if not split.train or not split.held_out:
        raise MTPRuntimeError("the corpus is too small to hold out whole files; add more files")
    tok_file = out / "tokenizer.json"
    from tokenizers import Tokenizer

    if init is not None and (Path(init) / "tokenizer.json").is_file() and not tok_file.is_file():
        shutil.copy(Path(init) / "tokenizer.json", tok_file)
        corpus.write_tokenizer_config(out)
    if tok_file.is_file():
        tokenizer = Tokenizer.from_file(str(tok_file))
    else:
        tqdm.write(f"tokenizer: training a {vocab_size}-token byte-level BPE on {len(split.train)} files")
        tokenizer = corpus.train_tokenizer(split.train, vocab_size, tok_file)
        if tokenizer.get_vocab_size() < vocab_size:
            tqdm.write(f"tokenizer: {tokenizer.get_vocab_size()} tokens (the corpus holds no more merges than "
                       f"that; --vocab-size asked for {vocab_size})")
    check_budget("preparing the tokenizer")
    arrays = []
    for name, part in (("train", split.train), ("held_out", split.held_out)):
        path = data_dir / f"{name}.npy"
        if not path.is_file():
            tqdm.write(f"data: encoding the {len(part)} {name.replace('_', '-')} files into {path}")
            np.save(path, corpus.encode_files(tokenizer, part))
        arrays.append(np.load(path))
    (data_dir / "held_out_files.txt").write_text("\n".join(map(str, split.held_out)) + "\n", encoding="utf-8")
    check_budget("preparing the data")
    return tokenizer, arrays[0], arrays[1]


def init_weights(model: DeepseekForCausalLM, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings, ones for norms, zeros for the gate bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
