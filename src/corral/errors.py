"""The one exception hierarchy of corral.

Every failure is a :class:`CorralError` carrying a machine-readable ``code`` and a readable
``message``; subclasses add structured fields (a rate limit carries ``retry_after_s``). Control
flow is not an error: shutdown is an ``asyncio.Event`` set by the signal handlers, and stopping a
run is ``asyncio`` cancellation.
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every corral failure: ``code`` for programs, ``message`` for people."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class ConfigError(CorralError):
    """A configuration file or value is invalid; the message names the key."""

    code = "config_error"


class NodeTaken(ConfigError):
    """Another live daemon has this daemon's ``[daemon] node_id`` on the shared queue."""

    code = "node_taken"


class BadRequest(CorralError):
    """The client sent something corral cannot accept."""

    code = "bad_request"
    http_status = 400


class NotFound(CorralError):
    code = "not_found"
    http_status = 404


class Conflict(CorralError):
    """The request is valid but not in the task's current state."""

    code = "conflict"
    http_status = 409


class PayloadTooLarge(BadRequest):
    code = "payload_too_large"
    http_status = 413


class StoreUnavailable(CorralError):
    """The store cannot be reached (a wrong URL, refused connection, bad credentials)."""

    code = "store_unavailable"
    http_status = 503


class ShuttingDown(CorralError):
    code = "shutting_down"
    http_status = 503


class LLMError(CorralError):
    """An OpenAI-compatible server failed. ``status`` is the HTTP status when there was one."""

    code = "llm_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        partial_content: str = "",
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.partial_content = partial_content
        self.retryable = retryable


class RateLimitError(LLMError):
    """429/529 from a peer. ``retry_after_s`` is the cool-down the peer asked for, if any."""

    code = "rate_limited"


class StreamError(LLMError):
    """A stream broke, carried an error, or ended early; ``partial_content`` keeps what came."""

    code = "stream_error"
