"""Runtime: a loaded checkpoint (model, config, tokenizer) and the generate() entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache_layout import CacheLayout
from .auto_draft import DepthAcceptance, StepCosts
from .checkpoint import load_model, open_folder
from .config import ModelConfig
from .engine import Engine
from .errors import ConfigError, DeviceError, GenerationSettingsError, TokenizerError
from .forwards import Forwards
from .model import DeepseekForCausalLM
from .model.flash import flash_attn_func
from .model.plan import AttentionPlan
from .parallel import ParallelGroup, check_shardable, shard_model
from .params import GenerationRequest
from .request import (ModelFacts, build_request, check_flag, draft_topk_argument, prompt_ids, prompt_texts,
                      token_ids_in_vocabulary)
from .stats import GenerationStats
from .text import StopStrings, TextStream, load_tokenizer
from .threads import check_threads, choose_threads
from .validate import check_text, show, wrong_type

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    """One sequence's output: new tokens only, their text, and the acceptance statistics."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    """'length' (max_new_tokens), 'eos', or 'stop' (a stop string)."""


@dataclass
class StreamChunk:
    """What one step added to sequence `index`."""

    index: int
    token_ids: list[int]
    text: str


class GenerationStream:
    """Iterate to receive chunks as tokens are accepted; `results` is filled once iteration ends."""

    def __init__(self, chunks: Iterator[StreamChunk], results: list[GenerationResult]):
        self._chunks = chunks
        self.results = results

    def __iter__(self) -> Iterator[StreamChunk]:
        return self._chunks


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types a model can run on here (meta holds no data; others have no kernels for this model)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for `device` (None: cuda if available, else cpu); DeviceError where it cannot run a model."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise wrong_type("device", device, "a device name such as 'cpu' or 'cuda:0', or a torch.device", DeviceError)
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise DeviceError(f"device {str(device)!r} cannot run a model; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} was requested but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s), cuda:0 first")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was requested but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The torch dtype for `dtype` (None: bfloat16 on cuda, float32 elsewhere)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str):
        raise wrong_type("dtype", dtype, f"one of {', '.join(sorted(DTYPES))}, or a torch.dtype", DeviceError)
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


ATTENTION_CHOICES = ("auto", "flash", "sdpa")


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """Check the prefill attention kernel: auto (flash-attn where it can run, else SDPA), flash (required), sdpa."""
    if not isinstance(attention, str) or attention not in ATTENTION_CHOICES:
        raise DeviceError(f"attention={show(attention)} is unknown; use one of {', '.join(ATTENTION_CHOICES)}")
    if attention != "flash":
        return attention
    if flash_attn_func is None:
        raise DeviceError("flash-attn was requested but is not installed; install the gpu extra "
                          "(pip install 'mtp-runtime[gpu]', needs CUDA) or use --attention auto")
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise DeviceError(f"flash-attn needs a CUDA device and bfloat16/float16, not {device.type}/"
                          f"{str(dtype).removeprefix('torch.')}; use --attention auto or sdpa")
    return attention


class Runtime:
    """A loaded DeepSeek-V2/V3/V3.2 checkpoint, ready to score and generate."""

    def __init__(self, model: DeepseekForCausalLM, tokenizer=None, path: Path | None = None,
                 attention: str = "auto", parallel: ParallelGroup | None = None, threads: int | None = None,
                 index_keys_fp8: bool = False):
        self.model = model.eval().requires_grad_(False)  # inference only; ops on grad-free weights dispatch faster
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.path = path
        self.attention = attention
        """Prefill attention kernel: 'auto', 'flash' or 'sdpa' (see resolve_attention)."""
        self.parallel = parallel  # the ranks the model is split over; None: this process holds all of it
        self.forwards: Forwards = Forwards(self.model)
        """How decoding steps run their forwards: eagerly, or compiled after `compile()`."""
        self.step_costs = StepCosts()
        """Measured step times per draft depth, which draft='auto' chooses by; kept across calls."""
        self.depth_acceptance = DepthAcceptance()
        """The acceptance per draft depth that draft='auto' measured; later calls start from it."""
        if index_keys_fp8 and self.config.indexer is None:
            raise ConfigError(f"index_keys_fp8 applies to sparse-attention models (deepseek_v32), not "
                              f"{self.config.model_type}; leave it off")
        self.cache_layout = CacheLayout.for_config(self.config, index_fp8=index_keys_fp8)
        """What the caches hold per slot; DeepSeek-V3.2's indexer keys optionally in FP8 (index_keys_fp8)."""
        self._threads = check_threads(threads)

    @property
    def threads(self) -> int:
        """torch CPU threads every call of this runtime runs with: as asked, else the fastest (threads.py)."""
        if self._threads is None:
            self._threads = choose_threads(self.model) if self.device.type == "cpu" else torch.get_num_threads()
        return self._threads

    def compile(self, cache_dir: str | Path | None = None) -> None:
        """Run batch-1 decoding steps through compiled step graphs from now on (see compiled.py).

        Each new step shape compiles on first use (about a minute for the shipped model on a 2-core CPU) and is
        saved under `cache_dir` (default: beside inductor's on-disk caches), from where a later process loads it
        in seconds; call this for long-running work (benchmarks, serving), not one short generate."""
        if self.device.type != "cpu":
            raise DeviceError(f"compiled decoding is implemented and tested on the CPU only, not {self.device.type}; "
                              "run without --compile")
        if self.config.indexer is not None:
            raise ConfigError(f"compiled decoding is not implemented for {self.config.model_type} (sparse "
                              "attention), which decodes eagerly; run without --compile (bench: --no-compile)")
        from .compiled import CompiledForwards

        if not self.forwards.compiled:
            self.forwards = CompiledForwards(self.model, cache_dir)

    @classmethod
    def from_folder(cls, path: str | Path, device=None, dtype=None, attention: str = "auto",
                    parallel: ParallelGroup | None = None, threads: int | None = None,
                    index_keys_fp8: bool = False) -> "Runtime":
        """Load config.json, the safetensors weights (memory-mapped, one tensor at a time) and tokenizer.json.

        With `parallel`, every rank loads the full checkpoint and then keeps only its share of the attention
        heads, experts and MLP channels (see mtp_runtime.parallel); every rank must then make the same calls.
        index_keys_fp8 stores a sparse-attention model's indexer keys in FP8 (see CacheLayout).
        """
        if not isinstance(path, (str, Path)):
            raise wrong_type("path", path, "a model folder (str or Path), or None for the shipped model", ConfigError)
        if parallel is not None and not isinstance(parallel, ParallelGroup):
            raise wrong_type("parallel", parallel, "a mtp_runtime.parallel.ParallelGroup, or None")
        check_threads(threads)
        folder = open_folder(path)
        if parallel is not None:
            check_shardable(folder.config, parallel.world_size)
        device = resolve_device(parallel.device if device is None and parallel is not None else device)
        dtype = resolve_dtype(dtype, device)
        attention = resolve_attention(attention, device, dtype)
        tokenizer = load_tokenizer(folder.path)
        model = load_model(folder, device, dtype)
        if parallel is not None:
            shard_model(model, parallel)
        return cls(model, tokenizer, folder.path, attention, parallel, threads, index_keys_fp8)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 of a parallel runtime and in a single process: the process that prints."""
        return self.parallel is None or self.parallel.is_main

    @property
    def num_mtp_modules(self) -> int:
        return self.model.num_mtp

    def cache_bytes_per_token(self) -> int:
        """Cache bytes per token of the trunk in this runtime's dtype: the latent, plus any indexer keys."""
        size = self.model.lm_head.weight.element_size()
        return (self.config.latent_cache_bytes_per_token(size)
                + self.config.index_key_bytes_per_token(size, self.cache_layout.index_fp8))

    def logits(self, input_ids) -> torch.Tensor:
        """Trunk logits [B, T, vocab] (float32) of full sequences of one length, without a cache."""
        rows, _ = prompt_ids(input_ids, self.config.vocab_size)
        if len({len(row) for row in rows}) > 1:
            raise GenerationSettingsError("logits() needs sequences of one length; score them separately")
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model.forward_trunk(ids, AttentionPlan.causal(*ids.shape, device=self.device))
            return self.model.logits(hidden)

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no special tokens added)."""
        if not isinstance(text, str):
            raise wrong_type("text", text, "a str")
        check_text(text, "text")
        return self._tokenizer().encode(text, add_special_tokens=False)

    def decode(self, token_ids) -> str:
        """The text of token ids, as generate reports it (special tokens skipped)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, (list, tuple)):
            raise wrong_type("token_ids", token_ids, "a list of token ids")
        ids = token_ids_in_vocabulary(list(token_ids), self.config.vocab_size, "token_ids")
        return self._tokenizer().decode(ids, skip_special_tokens=True)

    def _tokenizer(self, what: str = "text"):
        if self.tokenizer is None:
            raise TokenizerError(f"{what} needs a tokenizer, but this model folder has no tokenizer.json; pass "
                                 "token ids (input_ids)")
        return self.tokenizer

    @property
    def facts(self) -> ModelFacts:
        """What request checks need to know of this model."""
        return ModelFacts(self.num_mtp_modules, self.config.vocab_size, self.eos_token_ids,
                          self.tokenizer is not None)

    def generate(self, prompt: str | Sequence[str] | None = None, *, input_ids=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 draft: str | None = None, num_draft_tokens: int | None = None, tree=None,
                 depth: int | None = None, draft_topk: int | None = None, eos_token_id=None, ignore_eos: bool = False,
                 stop: str | Sequence[str] | None = None, acceptance: str = "exact", stream: bool = False,
                 topk: int | None = None):
        """Generate from one prompt (a str, or input_ids list) or a batch (a list of either).

        draft: 'auto' | 'chain' | 'tree' | 'dynamic' | 'none'; None picks 'tree' when a tree is given, else 'auto'
        (each step drafts the chain length, from none to num_draft_tokens, that measured acceptance and step times
        say is fastest) when the checkpoint has MTP modules, else 'none'. A draft argument the mode does not read is
        an error. acceptance: 'exact' (lossless) or 'typical' (Medusa's typical acceptance: LOSSY, faster, sampling
        only). topk: the old name of draft_topk. Every argument is checked before any is used (request.py says what
        each accepts). Returns a GenerationResult (a list for a batch), or a GenerationStream when stream=True.
        """
        check_flag("stream", stream)
        if seed is None and self.parallel is not None:
            seed = self.parallel.agree_seed()  # ranks must sample alike
        request = build_request(
            self.facts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            draft=draft, num_draft_tokens=num_draft_tokens, tree=tree, depth=depth,
            draft_topk=draft_topk_argument(draft_topk, topk), eos_token_id=eos_token_id, ignore_eos=ignore_eos,
            stop=stop, acceptance=acceptance)
        prompts, batched = self._prompts(prompt, input_ids)
        results: list[GenerationResult] = []
        chunks = self._run(prompts, request, results)
        if stream:
            return GenerationStream(chunks, results)
        for _ in chunks:
            pass
        return results if batched else results[0]

    def _run(self, prompts: list[list[int]], request: GenerationRequest,
             results: list[GenerationResult]) -> Iterator[StreamChunk]:
        """The one loop behind both streaming and non-streaming generation."""
        if self.device.type == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        texts = [TextStream(self.tokenizer, request.stop_strings) for _ in prompts]
        stops = StopStrings(texts) if request.stop_strings else None
        engine = Engine(self.model, request, stops, flash_prefill=self.attention != "sdpa", forwards=self.forwards,
                        step_costs=self.step_costs, depth_acceptance=self.depth_acceptance,
                        cache_layout=self.cache_layout)
        finish = ["length"] * len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        for step in engine.run(prompts):
            for seq, tokens in step.new_tokens.items():
                generated[seq].extend(tokens)
                yield StreamChunk(seq, tokens, texts[seq].push(generated[seq]))
            for seq, reason in step.finished.items():
                finish[seq] = reason
        for seq, prompt in enumerate(prompts):
            text = texts[seq].final(generated[seq]) if self.tokenizer is not None else None
            if text and len(text) > texts[seq].released:
                yield StreamChunk(seq, [], text[texts[seq].released:])
            results.append(GenerationResult(generated[seq], text, engine.stats[seq], prompt, finish[seq]))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence by default: config.json's and the tokenizer's eos token (those inside the
        vocabulary)."""
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(t for t in ids if t < self.config.vocab_size))

    def _prompts(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise GenerationSettingsError("pass exactly one of prompt (text) or input_ids")
        if input_ids is not None:
            return prompt_ids(input_ids, self.config.vocab_size)
        texts, batched = prompt_texts(prompt)
        tokenizer = self._tokenizer("a text prompt")
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        for i, ids in enumerate(prompts):
            if not ids:
                raise GenerationSettingsError(f"prompt {i} encodes to no tokens; give some text (or input_ids)")
        return prompts, batched
