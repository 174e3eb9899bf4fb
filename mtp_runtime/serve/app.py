"""The HTTP API (Starlette): OpenAI's completion, chat and model routes, /health and /metrics.

  POST /v1/completions         text completion, streamed as server-sent events with "stream": true
  POST /v1/chat/completions    the same over the tokenizer's chat template (a 400 when the model has none)
  GET  /v1/models              the served model
  GET  /health                 200 while serving, 503 while draining
  GET  /metrics                Prometheus text format (ServeMetrics)

Every refusal is an OpenAI-style error object with its status (400 bad field, 401 missing or wrong key with
--api-key, 404 unknown route or model, 405 wrong method, 413 body too large, 429 queue full, 503 shutting
down, 500 a failure while decoding); none of them touches the running batch. A client that disconnects, in a
stream or while waiting for a whole answer, cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import responses
from .errors import ApiError
from .job import Job
from .metrics import ServeMetrics
from .protocol import ServedModel, parse_chat, parse_completion
from .scheduler import Scheduler
from .sequence import Failed, Finished, Submission, Tokens

log = logging.getLogger("mtp_runtime.serve")
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"


class Api:
    """The route handlers over one model, scheduler and set of metrics."""

    def __init__(self, model: ServedModel, scheduler: Scheduler, metrics: ServeMetrics, api_key: str | None,
                 max_body_bytes: int):
        self.model = model
        self.scheduler = scheduler
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self._guarded(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guarded(self.chat), methods=["POST"]),
            Route("/v1/models", self._guarded(self.models), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion(await self._body(request), self.model))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, parse_chat(await self._body(request), self.model))

    async def models(self, request: Request) -> Response:
        card = {"id": self.model.name, "object": "model", "created": self.started, "owned_by": "mtp-runtime",
                "max_model_len": self.model.context, "draft": self.model.default_draft.mode,
                "mtp_modules": self.model.runtime.num_mtp_modules}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        scheduler = self.scheduler
        body = {"status": "draining" if scheduler.draining else "ok", "model": self.model.name,
                "draft": self.model.default_draft.mode, "running": scheduler.running_rows,
                "waiting": scheduler.waiting_rows, "max_batch": scheduler.max_batch}
        return JSONResponse(body, status_code=503 if scheduler.draining else 200)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _guarded(self, handler):
        """The handler behind the API key check, with ApiError (and any other failure) answered as an error."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as error:
                return self._error(error)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return self._error(ApiError(500, "the server failed on this request (see its log); other requests "
                                            "are not affected", code="internal_error"))

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "key the server was started with (--api-key)", code="invalid_api_key")

    def _error(self, error: ApiError) -> JSONResponse:
        self.metrics.request_refused.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server answers {ROUTES}"
        else:
            message = f"no route {request.method} {request.url.path}; this server answers {ROUTES}"
        return self._error(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else
                                    "method_not_allowed"))

    async def _body(self, request: Request) -> dict:
        """The JSON object of the body (413 past --max-body-bytes, 400 if it is not a JSON object)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than this server takes ({limit} bytes, "
                             "--max-body-bytes); send a shorter prompt", code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except ValueError as error:
            raise ApiError(400, f"the body is not valid JSON ({error}); send a JSON object",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object of request fields", code="invalid_json")
        return data

    async def _generate(self, request: Request, job: Job) -> Response:
        runtime = self.model.runtime
        submission = Submission(job, runtime.tokenizer, runtime.eos_token_ids, asyncio.get_running_loop())
        self.scheduler.submit(submission)
        answer = _Answer(job, self.model.name)
        if job.stream:
            return StreamingResponse(self._events(submission, answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = asyncio.ensure_future(_choices(submission))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({choices, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not choices.done():  # the client has gone: nobody reads the answer
            choices.cancel()
            self.scheduler.cancel(submission)
            return Response(status_code=499)
        return JSONResponse(answer.whole(choices.result()))

    async def _events(self, submission: Submission, answer: "_Answer"):
        """Server-sent events: a chunk per step and choice, each choice's finishing chunk, then [DONE]."""
        finished = False
        try:
            async for event in submission.stream():
                data = answer.event(event)
                if data is not None:
                    yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            if answer.job.include_usage and not answer.failed:
                yield f"data: {json.dumps(answer.usage())}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client disconnected mid-stream (the response task was cancelled)
                self.scheduler.cancel(submission)


class _Answer:
    """The id and timestamps of one answer, and the choices finished so far."""

    def __init__(self, job: Job, model: str):
        self.job = job
        self.model = model
        self.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices: list[responses.Choice] = []
        self.started: set[int] = set()  # choices that sent a chunk (chat: the first carries the role)
        self.failed = False

    def whole(self, choices: list[responses.Choice]) -> dict:
        build = responses.chat_completion if self.job.kind == "chat" else responses.completion
        return build(self.id, self.created, self.model, choices, self.job.return_token_ids)

    def event(self, event) -> dict | None:
        """The chunk an event becomes (None: nothing to send, e.g. text held back and no token ids asked)."""
        if isinstance(event, Failed):
            self.failed = True
            return event.error.body()
        if isinstance(event, Tokens):
            if not event.text and not (self.job.return_token_ids and event.token_ids):
                return None
            return self._chunk(event.index, event.text, token_ids=event.token_ids)
        if isinstance(event, Finished):
            choice = event.choice
            self.choices.append(choice)
            return self._chunk(choice.index, "", finish_reason=choice.finish_reason, token_ids=[], stats=choice.stats)
        raise TypeError(f"unknown event {event!r}")

    def _chunk(self, index: int, text: str, token_ids: list[int], finish_reason: str | None = None,
               stats=None) -> dict:
        first = index not in self.started
        self.started.add(index)
        return responses.chunk(self.job.kind, self.id, self.created, self.model, index, text, finish_reason,
                               token_ids if self.job.return_token_ids else None, first, stats)

    def usage(self) -> dict:
        return responses.usage_chunk(self.job.kind, self.id, self.created, self.model, self.choices)


async def _choices(submission: Submission) -> list[responses.Choice]:
    """Every finished choice of a request (raises its ApiError if it failed)."""
    choices = []
    async for event in submission.stream():
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            choices.append(event.choice)
    return choices


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read, so only that message can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
