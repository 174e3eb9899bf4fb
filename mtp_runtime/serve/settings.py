"""ServeSettings: how the server listens, how much it batches and queues, and the drafting requests get by default."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import GenerationSettingsError
from ..params import DraftParams


@dataclass(frozen=True)
class DraftDefaults:
    """The draft options of `serve` (those of `generate`), used by every request that sets none of its own."""

    mode: str = "auto"
    num_draft_tokens: int | None = None
    tree: str | None = None
    depth: int | None = None
    draft_topk: int | None = None

    def params(self) -> DraftParams:
        return DraftParams.build(self.mode, self.num_draft_tokens, self.tree, self.depth, self.draft_topk)


@dataclass(frozen=True)
class ServeSettings:
    """Run-time knobs of one server (none of them changes what a request decodes)."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (the address printed when ready names it)."""
    max_batch: int = 16
    """Sequences decoding at once (each prompt of a request is one); the rest wait in the queue."""
    max_queue: int = 256
    """Sequences waiting at most; a request that does not fit is answered 429."""
    api_key: str | None = None
    """When set, /v1/ requests need `Authorization: Bearer <key>`."""
    model_name: str = "default"
    """The `model` requests name and /v1/models lists."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies are answered 413."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight and queued requests get to finish after SIGINT/SIGTERM; then they get an error."""
    draft: DraftDefaults = field(default_factory=DraftDefaults)

    def validate(self) -> None:
        """Raise GenerationSettingsError naming the first setting out of range."""
        for name, value, low in (("max_batch", self.max_batch, 1), ("max_queue", self.max_queue, 1),
                                 ("max_body_bytes", self.max_body_bytes, 1), ("port", self.port, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GenerationSettingsError(f"--{name.replace('_', '-')}={value!r} must be an integer >= {low}")
        if self.port > 65535:
            raise GenerationSettingsError(f"--port={self.port} must lie in 0..65535 (0 picks a free port)")
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise GenerationSettingsError(
                f"--shutdown-timeout={self.shutdown_timeout!r} must be a number of seconds >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise GenerationSettingsError(
                "--api-key is empty; give a key, or leave the option out to serve without one")
        self.draft.params()
