"""The JSON objects the API answers with, in OpenAI's shapes: completions, chat completions, their streamed chunks,
usage, and the extra `acceptance` object (this request's MTP drafting figures)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats import GenerationStats


@dataclass
class Choice:
    """One finished sequence of a request."""

    index: int
    text: str
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)


def acceptance(stats: GenerationStats) -> dict:
    """MTP drafting figures of a sequence (or of several, merged): tau, acceptance per depth and the counts."""
    return {
        "tau": stats.tau,
        "acceptance_per_depth": stats.acceptance_per_depth,
        "cumulative_acceptance": stats.cumulative_acceptance,
        "mean_accepted_length": stats.mean_accepted_length,
        "steps": stats.steps,
        "draft_steps": stats.draft_steps,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": sum(stats.depth_accepts),
    }


def merged_stats(choices: list[Choice]) -> GenerationStats:
    total = GenerationStats()
    for choice in choices:
        total = total.merge(choice.stats)
    return total


def usage(choices: list[Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(request_id: str, created: int, model: str, choices: list[Choice], token_ids: bool) -> dict:
    """A text_completion object."""
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [_completion_choice(c, token_ids) for c in sorted(choices, key=lambda c: c.index)],
        "usage": usage(choices),
        "acceptance": acceptance(merged_stats(choices)),
    }


def _completion_choice(choice: Choice, token_ids: bool) -> dict:
    out = {"text": choice.text, "index": choice.index, "logprobs": None, "finish_reason": choice.finish_reason}
    if token_ids:
        out["token_ids"] = choice.token_ids
    return out


def chat_completion(request_id: str, created: int, model: str, choices: list[Choice], token_ids: bool) -> dict:
    """A chat.completion object."""
    rows = []
    for c in sorted(choices, key=lambda c: c.index):
        row = {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
               "finish_reason": c.finish_reason}
        if token_ids:
            row["token_ids"] = c.token_ids
        rows.append(row)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": rows,
            "usage": usage(choices), "acceptance": acceptance(merged_stats(choices))}


def chunk(kind: str, request_id: str, created: int, model: str, index: int, text: str,
          finish_reason: str | None = None, token_ids: list[int] | None = None, first: bool = False,
          stats: GenerationStats | None = None) -> dict:
    """One streamed chunk of choice `index`: text_completion (kind 'completion') or chat.completion.chunk; the
    chunk that finishes a choice carries that choice's acceptance figures."""
    if kind == "chat":
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        row = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        row = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    if token_ids is not None:
        row["token_ids"] = token_ids
    out = {"id": request_id, "object": obj, "created": created, "model": model, "choices": [row]}
    if stats is not None:
        out["acceptance"] = acceptance(stats)
    return out


def usage_chunk(kind: str, request_id: str, created: int, model: str, choices: list[Choice]) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage and acceptance."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(choices), "acceptance": acceptance(merged_stats(choices))}
