"""Runtime: a loaded checkpoint (model, config, tokenizer) and the generate() entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache_layout import CacheLayout
from .checkpoint import CheckpointFiles, load_state_dict, weight_block_size
from .checkpoint.indexer import require_indexers
from .config import ModelConfig
from .auto_draft import StepCosts
from .engine import Engine
from .errors import ConfigError, DeviceError, GenerationSettingsError, TokenizerError
from .forwards import Forwards
from .model import DeepseekForCausalLM
from .model.flash import flash_attn_func
from .model.plan import AttentionPlan
from .parallel import ParallelGroup, check_shardable, shard_model
from .params import DEFAULT_DRAFT_MODE, DraftParams, GenerationRequest
from .sampling import SamplingParams
from .stats import GenerationStats
from .text import StopStrings, TextStream, load_tokenizer
from .threads import check_threads, choose_threads

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


ATTENTION_CHOICES = ("auto", "flash", "sdpa")


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """Check the prefill attention kernel: auto (flash-attn where it can run, else SDPA), flash (required), sdpa."""
    if attention not in ATTENTION_CHOICES:
        raise DeviceError(f"attention {attention!r} is unknown; use one of {', '.join(ATTENTION_CHOICES)}")
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

    def compile(self) -> None:
        """Run batch-1 decoding steps through torch.compile from now on (see compiled.py).

        Each new step shape compiles on first use (tens of seconds; a few seconds when inductor's on-disk cache
        already holds it), so call this for long-running work (benchmarks, serving), not one short generate."""
        if self.device.type != "cpu":
            raise DeviceError(f"compiled decoding is implemented and tested on the CPU only, not {self.device.type}; "
                              "run without --compile")
        if self.config.indexer is not None:
            raise ConfigError(f"compiled decoding is not implemented for {self.config.model_type} (sparse "
                              "attention), which decodes eagerly; run without --compile (bench: --no-compile)")
        from .compiled import CompiledForwards

        if not self.forwards.compiled:
            self.forwards = CompiledForwards(self.model)

    @classmethod
    def from_folder(cls, path: str | Path, device=None, dtype=None, attention: str = "auto",
                    parallel: ParallelGroup | None = None, threads: int | None = None,
                    index_keys_fp8: bool = False) -> "Runtime":
        """Load config.json, the safetensors weights (memory-mapped, one tensor at a time) and tokenizer.json.

        With `parallel`, every rank loads the full checkpoint and then keeps only its share of the attention
        heads, experts and MLP channels (see mtp_runtime.parallel); every rank must then make the same calls.
        index_keys_fp8 stores a sparse-attention model's indexer keys in FP8 (see CacheLayout).
        """
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"model folder {path} does not exist; pass a folder holding an HF config.json")
        if not path.is_dir():
            raise ConfigError(f"model path {path} is a file, not a folder; pass the folder that holds config.json "
                              f"and the *.safetensors files")
        config = ModelConfig.from_file(path / "config.json")
        if parallel is not None:
            check_shardable(config, parallel.world_size)
        device = resolve_device(parallel.device if device is None and parallel is not None else device)
        dtype = resolve_dtype(dtype, device)
        attention = resolve_attention(attention, device, dtype)
        files = CheckpointFiles(path)
        require_indexers(files, config)
        n = config.num_hidden_layers
        num_mtp = files.mtp_layer_count(n)
        with torch.device("meta"):
            model = DeepseekForCausalLM(
                config, num_mtp,
                mtp_own_head=num_mtp > 0 and files.has_our_name("mtp.0.shared_head.head.weight", n),
                mtp_own_embedding=num_mtp > 0 and files.has_our_name("mtp.0.embed_tokens.weight", n))
        expected = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
        raw_config = _raw_config(path)
        state = load_state_dict(files, expected, n, dtype=dtype, device=device,
                                tie_word_embeddings=config.tie_word_embeddings,
                                block_size=weight_block_size(raw_config))
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device)  # the non-persistent buffers (RoPE tables, norm constants) were built on the CPU
        if parallel is not None:
            shard_model(model, parallel)
        return cls(model, load_tokenizer(path), path, attention, parallel, threads, index_keys_fp8)

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
        """Trunk logits [B, T, vocab] (float32) of full sequences, without a cache."""
        ids = _as_batch(input_ids).to(self.device)
        with torch.inference_mode():
            hidden = self.model.forward_trunk(ids, AttentionPlan.causal(*ids.shape, device=self.device))
            return self.model.logits(hidden)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError(
                "a text prompt needs a tokenizer, but this model folder has no tokenizer.json; pass input_ids")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompt: str | Sequence[str] | None = None, *, input_ids=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 draft: str | None = None, num_draft_tokens: int | None = None, tree=None,
                 depth: int | None = None, topk: int | None = None, eos_token_id=None, ignore_eos: bool = False,
                 stop: str | Sequence[str] | None = None, acceptance: str = "exact", stream: bool = False):
        """Generate from one prompt (a str, or input_ids list) or a batch (a list of either).

        draft: 'auto' | 'chain' | 'tree' | 'dynamic' | 'none'; None picks 'auto' (each step drafts the chain
        length, from none to num_draft_tokens, that measured acceptance and step times say is fastest) when the
        checkpoint has MTP modules, else 'none'. acceptance: 'exact' (lossless) or 'typical' (Medusa's typical
        acceptance: LOSSY, faster, sampling only). Returns a GenerationResult (a list for a batch), or a
        GenerationStream when stream=True.
        """
        prompts, batched = self._prompts(prompt, input_ids)
        if seed is None and self.parallel is not None:
            seed = self.parallel.agree_seed()  # ranks must sample alike
        if draft is None:
            draft = DEFAULT_DRAFT_MODE if self.num_mtp_modules else "none"
        request = GenerationRequest(
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            draft=DraftParams.build(draft, num_draft_tokens, tree, depth, topk),
            eos_token_ids=() if ignore_eos else self._eos_ids(eos_token_id),
            stop_strings=(stop,) if isinstance(stop, str) else tuple(stop or ()), acceptance=acceptance)
        request.validate()
        if request.stop_strings and self.tokenizer is None:
            raise TokenizerError("stop strings need a tokenizer, but this model folder has no tokenizer.json")
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
                        step_costs=self.step_costs, cache_layout=self.cache_layout)
        finish = ["length"] * len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        for step in engine.run(prompts):
            for seq, tokens in step.new_tokens.items():
                generated[seq].extend(tokens)
                yield StreamChunk(seq, tokens, texts[seq].push(generated[seq]))
            for seq in step.finished:
                finish[seq] = self._finish_reason(generated[seq], texts[seq], request)
        for seq, prompt in enumerate(prompts):
            text = texts[seq].final(generated[seq]) if self.tokenizer is not None else None
            if text and len(text) > texts[seq].released:
                yield StreamChunk(seq, [], text[texts[seq].released:])
            results.append(GenerationResult(generated[seq], text, engine.stats[seq], prompt, finish[seq]))

    @staticmethod
    def _finish_reason(tokens: list[int], text: TextStream, request: GenerationRequest) -> str:
        if text.stopped:
            return "stop"
        if tokens and tokens[-1] in request.eos_token_ids:
            return "eos"
        return "length"

    def _eos_ids(self, eos_token_id) -> tuple[int, ...]:
        if eos_token_id is not None:
            return tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def _prompts(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise GenerationSettingsError("pass exactly one of prompt (text) or input_ids")
        if prompt is not None:
            batched = not isinstance(prompt, str)
            texts = list(prompt) if batched else [prompt]
            if not texts or any(not isinstance(t, str) or not t for t in texts):
                raise GenerationSettingsError("prompt is empty; give some text (or input_ids)")
            prompts = [self.encode(t) for t in texts]
        else:
            if isinstance(input_ids, torch.Tensor):
                input_ids = input_ids.tolist()
            batched = bool(input_ids) and isinstance(input_ids[0], (list, tuple))
            prompts = [list(p) for p in input_ids] if batched else [list(input_ids)]
        vocab = self.config.vocab_size
        for p in prompts:
            if not p:
                raise GenerationSettingsError("prompt is empty (no tokens); give at least one token")
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise GenerationSettingsError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return prompts, batched


def _as_batch(input_ids) -> torch.Tensor:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


def _raw_config(path: Path) -> dict:
    import json

    return json.loads((path / "config.json").read_text(encoding="utf-8"))
