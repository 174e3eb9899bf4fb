"""Job: one validated API request (its prompts as token ids, limits and decoding settings), and DecodeSettings,
which decide which sequences may share a running batch."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import DraftParams, GenerationRequest
from ..sampling import SamplingParams


@dataclass(frozen=True)
class DecodeSettings:
    """What every row of one batch shares: the engine applies one sampling rule and one draft shape per step."""

    sampling: SamplingParams
    draft: DraftParams
    acceptance: str = "exact"

    @property
    def exclusive(self) -> bool:
        """Seeded sampling decodes in a batch of its own: rows of a batch draw from one generator, so another
        request's rows would change which numbers this one draws. Its output is then that of `generate` with
        the same prompts and seed."""
        return not self.sampling.greedy and self.sampling.seed is not None

    def group_key(self) -> tuple:
        """Requests with equal keys share a batch (greedy decoding ignores the sampling fields and the seed)."""
        if self.sampling.greedy:
            return ("greedy", self.draft)
        sampling = SamplingParams(self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
        return ("sampled", sampling, self.draft, self.acceptance)

    def request(self, max_new_tokens: int) -> GenerationRequest:
        """The engine's request: eos and stop strings are checked per sequence, so the engine gets none."""
        request = GenerationRequest(max_new_tokens=max_new_tokens, sampling=self.sampling, draft=self.draft,
                                    acceptance=self.acceptance)
        request.validate()
        return request


@dataclass(frozen=True)
class Job:
    """A completion or chat request, validated: everything the scheduler and the answer need."""

    kind: str
    """'completion' or 'chat' (the shape of the answer)."""
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    decode: DecodeSettings
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    """stream_options.include_usage: a last chunk carries the usage (and the acceptance figures)."""
    return_token_ids: bool = False
    """Extra field: every choice (and streamed chunk) also carries its token ids."""
