"""Server-sent events: the framing both streaming APIs use.

A few lines of our own rather than a dependency: an event is ``event: NAME`` (optional) and one
``data:`` line of compact JSON, then a blank line. Starlette's ``StreamingResponse`` cancels the
generator when the client disconnects, which is what cancels the turn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def sse_response(chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={**_HEADERS, **(headers or {})})
