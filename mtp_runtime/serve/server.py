"""Running the server: bind the socket, start the scheduler thread, serve HTTP with uvicorn, drain on a signal.

Shutdown: the first SIGINT or SIGTERM starts a drain: new requests are answered 503 (and /health turns 503)
while running and queued requests finish, for at most --shutdown-timeout seconds, after which the unfinished
get a 503 error; then the server closes its connections and exits with status 0. A second signal stops at
once: whatever is unfinished gets the 503 error.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Callable

import uvicorn

from ..errors import MTPRuntimeError, TokenizerError
from ..runtime import Runtime
from .app import Api
from .metrics import ServeMetrics
from .protocol import ServedModel
from .scheduler import Scheduler
from .settings import ServeSettings

CLOSE_TIMEOUT_S = 5.0
"""After the drain, seconds uvicorn gives open connections to finish sending before it cancels them."""


class ListenError(MTPRuntimeError):
    """The server cannot listen on the requested host and port."""


def serve(runtime: Runtime, settings: ServeSettings, announce: Callable[[str], None] = print,
          log_level: str = "warning") -> None:
    """Serve `runtime` until a signal ends it; `announce` gets one line with the address once it accepts requests."""
    settings.validate()
    if runtime.tokenizer is None:
        raise TokenizerError(f"serving needs the model's tokenizer, but {runtime.path} has no tokenizer.json; add "
                             "one to the model folder")
    sock = listen(settings.host, settings.port)
    metrics = ServeMetrics()
    scheduler = Scheduler(runtime, settings.max_batch, settings.max_queue, metrics)
    model = ServedModel(runtime, settings.model_name, settings.draft, settings.max_batch, settings.max_queue)
    api = Api(model, scheduler, metrics, settings.api_key, settings.max_body_bytes)
    config = uvicorn.Config(api.app(), log_level=log_level, lifespan="off", access_log=log_level == "debug",
                            timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    message = (f"serving {settings.model_name!r} on http://{host}:{port}/v1 (draft {model.default_draft.mode}, "
               f"max batch {settings.max_batch}); Ctrl-C stops")
    server = _Server(config, scheduler, settings.shutdown_timeout, lambda: announce(message))
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), or ListenError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ListenError(f"cannot listen on {host}:{port}: {error.strerror}; pass a local address as --host, "
                          "e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {error.strerror}; pass another --port (0 picks a "
                          "free one) or --host") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown, and a line printed once it accepts requests."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout: float,
                 on_ready: Callable[[], None]):
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_ready()

    def handle_exit(self, sig: int, frame) -> None:
        if not self.scheduler.draining:
            self.scheduler.drain(self.drain_timeout)  # on_tick ends the server once the scheduler is idle
            return
        self.scheduler.stop(timeout=0)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.scheduler.draining and self.scheduler.idle:
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT and SIGTERM go to handle_exit while serving; unlike uvicorn's own, the signal is not raised
        again afterwards, so a drained server exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
