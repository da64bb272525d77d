"""Running the HTTP app inside a Ray Serve replica: one request in, its response out as a stream.

The engine replica does not listen on a port; the ingress hands it each request's method, path,
headers and body through a Serve handle. ``AsgiBridge`` feeds those to the unchanged Starlette app
(``create_app``) and yields what the app sends: first ``{"status", "headers"}``, then the body
chunks as they come, so server-sent events stream through Ray as they would from uvicorn. When
the consumer stops reading (the client went away and Serve cancelled the call), the app is told
``http.disconnect``, which cancels the turn exactly as a dropped HTTP connection would.

It also runs the app's lifespan (startup and shutdown), which is what loads and closes the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.types import ASGIApp, Message


class AsgiBridge:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._lifespan_in: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan_out: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan: asyncio.Future[None] | None = None

    async def startup(self) -> None:
        """Run the app's lifespan startup; raise if it failed."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self._app(scope, self._lifespan_in.get, self._lifespan_out.put))
        await self._lifespan_in.put({"type": "lifespan.startup"})
        message = await self._lifespan_out.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {message.get('message', message['type'])}")

    async def shutdown(self) -> None:
        """Run the app's lifespan shutdown (it closes the engine: owed memory updates commit)."""
        if self._lifespan is None or self._lifespan.done():
            return
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        await self._lifespan_out.get()
        with contextlib.suppress(Exception):
            await self._lifespan

    async def request(
        self, method: str, path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """The app's response to one request: a ``{"status", "headers"}`` dict, then body chunks."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # 2.3: the app listens for disconnects
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        out: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await out.put(message)

        task: asyncio.Future[None] = asyncio.ensure_future(self._app(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while True:
                message = await out.get()
                if message is None:
                    task.result()  # the app raised: let the caller see it
                    return
                if message["type"] == "http.response.start":
                    raw = message.get("headers", [])
                    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
                    yield {"status": message["status"], "headers": pairs}
                elif message["type"] == "http.response.body":
                    body_out, more = _coalesce(message, out)
                    if body_out:
                        yield body_out
                    if not more:
                        return
        finally:
            gone.set()  # the consumer stopped reading, or the response is complete
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)


def _coalesce(message: Message, out: asyncio.Queue[Message | None]) -> tuple[bytes, bool]:
    """The body of ``message`` joined with the body messages already queued behind it.

    Every chunk crosses two Ray hops (replica to ingress to proxy); sending what is ready as one
    chunk, instead of one per server-sent event, cuts that cost without delaying anything."""
    parts = [bytes(message.get("body", b""))]
    more = bool(message.get("more_body", False))
    while more and not out.empty():
        following = out.get_nowait()
        if following is None or following["type"] != "http.response.body":
            out.put_nowait(following)  # not ours to take: put it back (it is the last item)
            break
        parts.append(bytes(following.get("body", b"")))
        more = bool(following.get("more_body", False))
    return b"".join(parts), more
