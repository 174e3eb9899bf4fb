"""Sampling settings and the one logits -> probabilities function shared by target and drafter.

Speculative sampling is lossless only if the target distribution p and the draft distribution q
are processed the same way, so temperature, top-k and top-p live in `logits_to_probs` and
nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationSettingsError
from .validate import is_int, is_number, show, wrong_type

MAX_SEED = 2**64 - 1
"""torch.Generator.manual_seed takes seeds up to this."""
MIN_TEMPERATURE = 1e-30
"""Temperatures below this are computed as this. In float32, exp(-gap / 1e-30) is 0 for every gap above 1e-28, and
two distinct float32 logits of magnitude above 1e-20 always differ by more: the result is the exact limit (a one-hot
of the argmax, ties split evenly), and the scale stays a normal float32."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """Logits are divided by it; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose mass reaches top_p; 1 turns it off."""
    seed: int | None = None
    """Seed of the sampling generator; None draws from torch's global one."""

    def validate(self) -> None:
        """Raise GenerationSettingsError when a field is of the wrong type, out of range, or does not apply."""
        if not is_number(self.temperature):
            raise wrong_type("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationSettingsError(
                f"temperature={self.temperature!r} is invalid: it must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k):
            raise wrong_type("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if self.top_k < 0:
            raise GenerationSettingsError(f"top_k={self.top_k!r} is invalid: it must be an integer >= 0 (0 = off)")
        if not is_number(self.top_p):
            raise wrong_type("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationSettingsError(f"top_p={self.top_p!r} is invalid: it must lie in (0, 1] (1 = off)")
        if self.seed is not None and not is_int(self.seed):
            raise wrong_type("seed", self.seed, "an integer in 0..2**64-1, or None (random)")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise GenerationSettingsError(f"seed={show(self.seed)} is invalid: it must lie in 0..2**64-1")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            knob = f"top_k={self.top_k}" if self.top_k else f"top_p={self.top_p}"
            raise GenerationSettingsError(f"{knob} has no effect with greedy decoding (temperature=0); set a "
                                          "temperature > 0 to sample, or drop it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities: temperature, then top-k, then top-p."""
    params.validate()
    logits = logits.float()
    if params.greedy:
        return one_hot_argmax(logits)
    # shifted by the maximum, every scaled logit is <= 0: a tiny temperature makes the others -inf (probability 0),
    # never inf - inf = NaN
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(shifted / max(params.temperature, MIN_TEMPERATURE), dim=-1)
    if 0 < params.top_k < probs.shape[-1]:
        probs = _renormalise(_top_k(probs, params.top_k))
    if params.top_p < 1:
        probs = _renormalise(_top_p(probs, params.top_p))
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row: [..., V] probabilities -> [...] token ids."""
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    tokens = torch.multinomial(flat, 1, generator=generator)  # [N, 1]
    return tokens.reshape(probs.shape[:-1])


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., V] float32 one-hot of the argmax (the first one on ties)."""
    probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


def _top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Zero every token below the k-th largest probability (tokens tied with it are kept)."""
    kth = probs.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    return probs.masked_fill(probs < kth, 0.0)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [..., V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # the set already holds top_p before this token: drop it (the top token has mass_before 0, so stays)
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def _renormalise(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)
