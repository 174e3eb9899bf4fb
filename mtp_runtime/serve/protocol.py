"""Request bodies of /v1/completions and /v1/chat/completions, parsed into Jobs: every field checked, and each bad
one answered with a 400 that names it (`param`) and says what is allowed. Fields OpenAI defines that this server
does not implement are refused unless they hold their no-op value, so that nothing a client asks is ignored.

Extra fields (as vLLM takes them): top_k, ignore_eos, return_token_ids, and the draft settings of `generate`
(draft, num_draft_tokens, tree, depth, draft_topk) plus acceptance ('exact' or the lossy 'typical').

Seeded sampling is reproducible: such a request decodes in a batch of its own (DecodeSettings.exclusive), and
draft 'auto' then chooses its chain lengths from modelled, not measured, step costs (see auto_draft.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import GenerationSettingsError
from ..params import DraftParams
from ..runtime import Runtime
from ..sampling import SamplingParams
from .errors import ApiError
from .job import DecodeSettings, Job
from .settings import DraftDefaults

COMPLETION_MAX_TOKENS = 16
"""OpenAI's default max_tokens for completions (chat defaults to the rest of the context)."""
MAX_STOP_STRINGS = 16
DRAFT_FIELDS = ("draft", "num_draft_tokens", "tree", "depth", "draft_topk")
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
                 "top_k", "ignore_eos", "return_token_ids", "acceptance", *DRAFT_FIELDS}
NO_OP_VALUES = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,),
                "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}
"""OpenAI fields this server does not implement, accepted only with these values (or null)."""
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "n", "best_of", "echo", "suffix", "logprobs", "presence_penalty",
                                     "frequency_penalty", "logit_bias"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "n", "logprobs", "top_logprobs",
                               "presence_penalty", "frequency_penalty", "logit_bias"}


@dataclass
class ServedModel:
    """The model behind the API and the limits requests are checked against."""

    runtime: Runtime
    name: str
    draft: DraftDefaults
    max_batch: int
    max_queue: int

    @functools.cached_property
    def default_draft(self) -> DraftParams:
        return self.draft.params()

    @property
    def context(self) -> int:
        """Positions a prompt and its completion share."""
        return self.runtime.config.max_position_embeddings

    @property
    def chat_template(self) -> str | dict | None:
        return getattr(self.runtime.tokenizer, "chat_template", None)


def parse_completion(body: dict, model: ServedModel) -> Job:
    """A /v1/completions body as a Job (raises ApiError 400/404)."""
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise ApiError(400, "the request has no prompt; send \"prompt\": a string, a list of strings, or token ids",
                       param="prompt", code="missing_field")
    prompts = _prompts(body["prompt"], model)
    return _job(body, model, "completion", prompts, _integer(body, "max_tokens", COMPLETION_MAX_TOKENS, 1))


def parse_chat(body: dict, model: ServedModel) -> Job:
    """A /v1/chat/completions body as a Job: the messages rendered by the tokenizer's chat template."""
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    if model.chat_template is None:
        raise ApiError(400, f"model {model.name!r} has no chat template (its tokenizer_config.json sets no "
                       "chat_template), so /v1/chat/completions cannot format messages; use /v1/completions "
                       "with a plain prompt", param="messages", code="no_chat_template")
    prompt = _render_chat(body.get("messages"), model)
    given = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    if len(given) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens were both given; send one of them",
                       param="max_completion_tokens", code="invalid_value")
    name = given[0] if given else "max_tokens"
    default = max(model.context - len(prompt), 1)
    return _job(body, model, "chat", [prompt], _integer(body, name, default, 1))


def _job(body: dict, model: ServedModel, kind: str, prompts: list[list[int]], max_tokens: int) -> Job:
    _check_name(body.get("model"), model)
    for prompt in prompts:
        _check_context(len(prompt), max_tokens, model.context)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with \"stream\": true", param="stream_options",
                       code="invalid_value")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "stream_options must be an object with one field, include_usage (true or false)",
                       param="stream_options", code="invalid_value")
    include_usage = _boolean(options or {}, "include_usage")
    sampling, draft = _sampling(body), _draft(body, model)
    decode = DecodeSettings(sampling, draft, _choice(body, "acceptance", ("exact", "typical")))
    try:
        decode.request(max_tokens)
    except GenerationSettingsError as error:
        raise ApiError(400, str(error), param="acceptance", code="invalid_value") from None
    return Job(kind=kind, prompts=tuple(tuple(p) for p in prompts), max_tokens=max_tokens, decode=decode,
               stop=_stop(body.get("stop"), model), ignore_eos=_boolean(body, "ignore_eos"), stream=stream,
               include_usage=include_usage, return_token_ids=_boolean(body, "return_token_ids"))


def _check_fields(body: dict, allowed: set[str], endpoint: str) -> None:
    for name, value in body.items():
        if name not in allowed:
            raise ApiError(400, f"unknown field {name!r} for {endpoint}; see the README's Serving section for the "
                           "fields this server takes", param=name, code="unknown_field")
        if name in NO_OP_VALUES and value is not None and value not in NO_OP_VALUES[name]:
            raise ApiError(400, f"{name}={value!r} is not supported by this server; leave {name} out",
                           param=name, code="unsupported_value")


def _check_name(name, model: ServedModel) -> None:
    if name is not None and name != model.name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {model.name!r} "
                       "(GET /v1/models lists it)", param="model", code="model_not_found")


def _check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, but the model's context holds {context} "
                       "positions including the completion; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    if prompt_tokens + max_tokens > context:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {context} positions; lower max_tokens to at most {context - prompt_tokens}",
                       param="max_tokens", code="context_length_exceeded")


def _prompts(prompt, model: ServedModel) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists -> token ids per prompt."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a non-empty string, a list of strings, a list of token ids, or a list "
                       "of token-id lists", param="prompt", code="invalid_type")
    if len(prompts) > min(model.max_batch, model.max_queue):
        raise ApiError(400, f"the request has {len(prompts)} prompts, but this server decodes at most "
                       f"{model.max_batch} sequences at once and queues at most {model.max_queue} "
                       "(--max-batch, --max-queue); send fewer prompts per request", param="prompt",
                       code="too_many_prompts")
    return [_token_ids(p, model) for p in prompts]


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(prompt, model: ServedModel) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty; give some text", param="prompt", code="empty_prompt")
        ids = model.runtime.encode(prompt)
        if not ids:
            raise ApiError(400, f"the prompt {prompt[:40]!r} encodes to no tokens; give some text", param="prompt",
                           code="empty_prompt")
        return ids
    vocab = model.runtime.config.vocab_size
    if not prompt or not all(_is_token(t) for t in prompt):
        raise ApiError(400, "a token-id prompt must be a non-empty list of integers", param="prompt",
                       code="invalid_type")
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt",
                       code="invalid_value")
    return list(prompt)


def _render_chat(messages, model: ServedModel) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages",
                       code="invalid_type")
    plain = [{"role": _role(m), "content": _content(m)} for m in messages]
    try:
        text = model.runtime.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2 raises its own types for a template that rejects the messages
        raise ApiError(400, f"the model's chat template cannot format these messages: {error}", param="messages",
                       code="invalid_value") from None
    return _token_ids(text, model)


def _role(message) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, "every message must be an object with a string \"role\"", param="messages",
                       code="invalid_type")
    return message["role"]


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "a message's content must be a string or a list of {\"type\": \"text\", \"text\"} parts "
                   "(this model reads text only)", param="messages", code="invalid_type")


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body, "top_k", 0, -1)
    seed = body.get("seed")
    if seed is not None and (not _is_token(seed) or not -2**63 <= seed < 2**64):
        raise ApiError(400, f"seed={seed!r} must be an integer (64-bit)", param="seed", code="invalid_value")
    sampling = SamplingParams(temperature, 0 if top_k == -1 else top_k, top_p, seed)  # vLLM: top_k -1 is off too
    for name in ("temperature", "top_p"):
        try:
            SamplingParams(**{name: getattr(sampling, name)}).validate()
        except GenerationSettingsError as error:
            raise ApiError(400, str(error), param=name, code="invalid_value") from None
    return sampling


def _draft(body: dict, model: ServedModel) -> DraftParams:
    """The server's draft settings, or the request's: with "draft" its own fields only; without, the server's
    with the request's fields over them (a tree shape alone implies draft 'tree')."""
    given = {name: body[name] for name in DRAFT_FIELDS if body.get(name) is not None}
    if not given:
        params = model.default_draft
    else:
        base = {} if "draft" in given else {name: getattr(model.draft, name) for name in DRAFT_FIELDS[1:]}
        fields = {**base, **given}
        mode = given.get("draft", "tree" if "tree" in given else model.draft.mode)
        if not isinstance(mode, str):
            raise ApiError(400, f"draft={mode!r} must be a string", param="draft", code="invalid_type")
        try:
            params = DraftParams.build(mode, fields.get("num_draft_tokens"), fields.get("tree"),
                                       fields.get("depth"), fields.get("draft_topk"))
        except GenerationSettingsError as error:
            raise ApiError(400, str(error), param=next(iter(given)), code="invalid_value") from None
    if params.mode != "none" and model.runtime.num_mtp_modules == 0:
        raise ApiError(400, f"model {model.name!r} has no MTP modules, so it cannot draft; send \"draft\": \"none\"",
                       param="draft", code="invalid_value")
    return params


def _stop(stop, model: ServedModel) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of non-empty strings", param="stop",
                       code="invalid_value")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop lists {len(stops)} strings; give at most {MAX_STOP_STRINGS}", param="stop",
                       code="invalid_value")
    return tuple(stops)


def _integer(body: dict, name: str, default: int, low: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_token(value) or value < low:
        raise ApiError(400, f"{name}={value!r} must be an integer >= {low}", param=name, code="invalid_value")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name}={value!r} must be a finite number", param=name, code="invalid_type")
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r} must be true or false", param=name, code="invalid_type")
    return value


def _choice(body: dict, name: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name)
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise ApiError(400, f"{name}={value!r} must be one of {', '.join(allowed)}", param=name,
                       code="invalid_value")
    return value
