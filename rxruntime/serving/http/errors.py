"""Errors of the HTTP front in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The official SDKs pick their exception class from the status code (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...), so each failure maps to the
status an OpenAI server would send, and ``param`` names the request field at fault.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from rxruntime.errors import (
    ConversationError,
    EngineClosedError,
    InvalidOptionError,
    InvalidTokenError,
    QueryTooLongError,
    QueueFullError,
    StreamOverflowError,
)
from rxruntime.models.errors import ConfigError


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's error object."""

    def __init__(
        self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_field(param: str, message: str) -> APIError:
    """400 naming the field (``messages[2].content``, ``temperature``, ...)."""
    return APIError(400, f"{param}: {message}", type="invalid_request_error", param=param, code="invalid_value")


def not_found(what: str, param: str | None = None) -> APIError:
    return APIError(404, f"{what} not found", type="invalid_request_error", param=param, code="not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code)


def from_engine_error(exc: BaseException, param: str | None = None) -> APIError:
    """The HTTP error for an exception the engine raised while starting or running a turn.

    ``param`` is the request field that carried the query (``input`` or ``messages``)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueryTooLongError):
        return APIError(413, str(exc), type="invalid_request_error", param=param, code="query_too_long")
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full")
    if isinstance(exc, EngineClosedError):
        return unavailable(f"the server is shutting down ({exc})", "shutting_down")
    if isinstance(exc, InvalidOptionError):
        return bad_field(exc.field, str(exc))
    if isinstance(exc, (InvalidTokenError, ConfigError)):
        return APIError(400, str(exc), type="invalid_request_error", param=param, code="invalid_value")
    if isinstance(exc, ConversationError):
        return APIError(404, str(exc), type="invalid_request_error", param="conversation", code="not_found")
    if type(exc).__module__.partition(".")[0] == "redis":  # the shared store (Redis) is down or unreachable
        message = f"the conversation store is unavailable ({type(exc).__name__}: {exc}); nothing was written"
        return unavailable(message, "store_unavailable")
    if isinstance(exc, StreamOverflowError):
        return APIError(500, str(exc), type="server_error", code="stream_overflow")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
