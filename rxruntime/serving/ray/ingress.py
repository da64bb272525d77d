"""The HTTP ingress of the Ray Serve deployment: route each request to an engine replica, stream back.

Serve's proxy hands every HTTP request to this deployment, which reads the routing key
(``router.route_for``: the conversation id, or a chat's history key) and calls an engine
replica through a streaming handle with that key as ``multiplexed_model_id``, so a conversation's
turns reach the replica holding its STM warm. The response (status, headers, then body chunks:
SSE included) is passed through unchanged; authentication and every API error stay the app's.

A replica that dies mid-request (``kill -9``, node lost) must never leave its client hanging:
before the response has started, the client gets a 503 ``replica_failed``; during a server-sent
event stream, an ``error`` event then ``response.failed`` (Responses) or an error chunk (Chat
Completions), then the end of the stream. The turn then was not committed, or was committed in
full: the store holds whole STMs only, and the next turn runs on another replica from the last one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from rxruntime.serving.http.errors import unavailable
from rxruntime.serving.http.turns import sse
from rxruntime.serving.ray.router import route_for

log = logging.getLogger(__name__)

_FAILURES = (RayError, RayServeException)
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


def replica_failed(exc: BaseException) -> str:
    return (
        f"the replica serving this request failed ({type(exc).__name__}); this turn was not answered in full. "
        "The conversation keeps its last committed memory and its next turn runs on another replica"
    )


class Ingress:
    def __init__(self, engine: DeploymentHandle[Any]) -> None:
        self._engine = engine

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        route = route_for(request.method, request.url.path, body)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        handle = self._engine.options(stream=True, multiplexed_model_id=route.key or "")
        chunks = handle.handle.remote(request.method, request.url.path, request.url.query, headers, body, route)
        assert isinstance(chunks, DeploymentResponseGenerator)
        try:
            start = await chunks.__anext__()
        except _FAILURES as exc:
            log.warning("%s %s: replica failed before answering: %s", request.method, request.url.path, exc)
            return unavailable(replica_failed(exc), "replica_failed").response()
        except StopAsyncIteration:
            return unavailable("the replica ended the request without an answer", "replica_failed").response()
        assert isinstance(start, dict)
        out_headers = {k: v for k, v in start["headers"] if k.lower() not in _HOP_BY_HOP}
        events = out_headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(
            _rest(chunks, events, request.url.path), status_code=int(start["status"]), headers=out_headers
        )


async def _rest(chunks: Any, events: bool, path: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except _FAILURES as exc:
        log.warning("%s: replica failed mid-response: %s", path, exc)
        if events:
            for event in failure_events(path, replica_failed(exc)):
                yield event


def failure_events(path: str, message: str) -> list[bytes]:
    """The events that end a server-sent event stream whose replica died, in that API's shape."""
    error = {"message": message, "type": "server_error", "param": None, "code": "replica_failed"}
    if path == "/v1/chat/completions":
        return [sse({"error": error}), sse("[DONE]")]
    response = {"status": "failed", "error": {"code": "replica_failed", "message": message}}
    failed = {"type": "response.failed", "response": response}
    return [sse({"type": "error", **error}, "error"), sse(failed, "response.failed")]
