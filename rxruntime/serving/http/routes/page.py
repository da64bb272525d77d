"""``GET /`` and ``GET /ui/{name}``: the chat page that shows the STM working (docs/http.md, "The page").

Plain HTML, JavaScript and CSS shipped as package data in ``http/web/``: no build step, nothing
fetched from another origin (the ``Content-Security-Policy`` header forbids it). The page needs no
key: it holds no data and calls the same ``/v1`` API as any client, with the bearer key a person
types in. Only the files listed here are served, so no path from a request reaches the filesystem.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import not_found

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("rxruntime.serving.http") / "web" / name).read_bytes()


async def index(ctx: Context, request: Request, owner: str) -> Response:
    return _file("index.html")


async def asset(ctx: Context, request: Request, owner: str) -> Response:
    name = request.path_params["name"]
    if name not in _TYPES or name == "index.html":
        raise not_found(f"page asset {name!r}")
    return _file(name)


def _file(name: str) -> Response:
    return Response(_read(name), media_type=_TYPES[name], headers=_HEADERS)
