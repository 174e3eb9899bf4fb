"""`mtp-runtime serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and MTP metrics.

    from mtp_runtime.serve import ServeSettings, serve
    serve(mtp_runtime.load(), ServeSettings(port=8000, max_batch=16))   # until SIGINT/SIGTERM

Modules: `settings` (ServeSettings), `protocol` (request bodies -> Jobs, every field checked), `job` (Job,
DecodeSettings: which requests share a batch), `sequence` (a request and its prompts on their way through),
`group` (one running batch and its engine), `scheduler` (the thread that runs every step), `metrics`
(Prometheus), `responses` (OpenAI's JSON shapes), `app` (the Starlette routes), `server` (uvicorn, signals).
Needs the `serve` extra: pip install 'mtp-runtime[serve]'.
"""

from .errors import ApiError
from .server import ListenError, serve
from .settings import DraftDefaults, ServeSettings

__all__ = ["ApiError", "ListenError", "serve", "DraftDefaults", "ServeSettings"]
