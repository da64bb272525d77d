"""``create_app``: the OpenAI-compatible HTTP front as an ASGI app (Starlette).

An app factory with no module-level state, so it can be served by uvicorn (``rxrt serve --http``),
mounted in another ASGI app, or deployed under Ray Serve. It speaks to the engine only through
rxruntime's public API (``Engine.conversation``, ``Conversation.astream`` / ``replay`` /
``delete``).

Every ``/v1`` route checks the API key when keys are configured; ``/health`` is open, and
``/metrics`` is open unless metrics keys are given (scrapers rarely hold an API key). The chat page
(``/`` and ``/ui/...``, ``routes/page.py``) is open too: it holds nothing, and its API calls carry
the key a person types in; ``ui=False`` leaves it out. Every error is OpenAI's error object with
the matching status (``http/errors.py``). CORS is off unless origins are given. See docs/http.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rxruntime.engine import Engine
from rxruntime.serving.http.bearer import KeyRing
from rxruntime.serving.http.context import Context, EngineSlot
from rxruntime.serving.http.errors import APIError, not_found
from rxruntime.serving.http.history_cache import HistoryCache
from rxruntime.serving.http.metrics import Metrics
from rxruntime.serving.http.registry import CONVERSATION_HEADER, ConversationTable, Registry
from rxruntime.serving.http.routes import page
from rxruntime.serving.http.routes.chat_completions import create_chat_completion
from rxruntime.serving.http.routes.completions import create_completion
from rxruntime.serving.http.routes.conversations import (
    create_conversation,
    delete_conversation,
    get_conversation,
    update_conversation,
)
from rxruntime.serving.http.routes.responses import create_response
from rxruntime.serving.http.routes.status import get_model, health, list_models, metrics

log = logging.getLogger(__name__)

Handler = Callable[[Context, Request, str], Awaitable[Response]]


def create_app(
    engine: Engine | Callable[[], Engine],
    *,
    api_keys: Iterable[str] | KeyRing = (),
    model_name: str = "rxt",
    history_cache_size: int = 512,
    max_open_conversations: int = 10_000,
    idle_close_s: float = 60.0,
    max_body_bytes: int = 1 << 20,
    worker_threads: int = 16,
    owns_engine: bool | None = None,
    on_ready: Callable[[Engine], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
    shared: ConversationTable | None = None,
    history_cache: HistoryCache | None = None,
    cors_origins: Iterable[str] = (),
    metrics_keys: Iterable[str] = (),
    ui: bool = True,
) -> Starlette:
    """An ASGI app serving ``engine`` (or the engine ``engine()`` loads once the app starts).

    ``api_keys``: accepted bearer keys (none: no authentication). ``model_name``: the id
    ``/v1/models`` lists (requests may name any model: there is one). ``history_cache_size``: STMs
    kept for Chat Completions histories. ``max_open_conversations``: with a store, past this many
    open conversations those idle for ``idle_close_s`` are closed (they reopen from the store).
    An engine the app loads itself is closed at shutdown; a given one only with ``owns_engine=True``.
    ``shared`` and ``history_cache`` replace the per-process conversation table and chat history
    cache with shared ones (Redis, under Ray: ``ray/replica.py``); by default both live in the process.
    ``ui``: serve the chat page at ``/`` (docs/http.md, "The page").
    """
    slot = EngineSlot(engine, owns_engine=owns_engine)
    if on_ready is not None:
        slot.on_ready.append(on_ready)
    metrics_ = Metrics(lambda: _engine_stats(slot), model_name)
    ctx = Context(
        slot=slot,
        keys=api_keys if isinstance(api_keys, KeyRing) else KeyRing(api_keys),
        metrics=metrics_,
        registry=Registry(metrics_, max_open_conversations, idle_close_s, shared),
        history=history_cache if history_cache is not None else HistoryCache(history_cache_size),
        model_name=model_name,
        max_body_bytes=max_body_bytes,
        limiter=CapacityLimiter(worker_threads),
        background=ThreadPoolExecutor(4, thread_name_prefix="rxrt-http-bg"),
    )

    scrape_keys = KeyRing(metrics_keys)

    def route(path: str, handler: Handler, methods: list[str], *, public: bool = False) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if path == "/metrics":
                    owner = scrape_keys.authenticate(request)
                else:
                    owner = "" if public else ctx.keys.authenticate(request)
                response = await handler(ctx, request, owner)
            except APIError as exc:
                response = exc.response()
            except Exception as exc:
                log.exception("%s %s failed", request.method, path)
                error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
                response = error.response()
            ctx.metrics.requests.labels(path, str(response.status_code)).inc()
            return response

        return Route(path, endpoint, methods=methods)

    routes = [
        route("/health", health, ["GET"], public=True),
        route("/metrics", metrics, ["GET"]),
        route("/v1/models", list_models, ["GET"]),
        route("/v1/models/{model_id:path}", get_model, ["GET"]),
        route("/v1/completions", create_completion, ["POST"]),
        route("/v1/responses", create_response, ["POST"]),
        route("/v1/chat/completions", create_chat_completion, ["POST"]),
        route("/v1/conversations", create_conversation, ["POST"]),
        route("/v1/conversations/{conversation_id}", get_conversation, ["GET"]),
        route("/v1/conversations/{conversation_id}", update_conversation, ["POST"]),
        route("/v1/conversations/{conversation_id}", delete_conversation, ["DELETE"]),
    ]
    if ui:
        routes += [
            route("/", page.index, ["GET"], public=True),
            route("/ui/{name}", page.asset, ["GET"], public=True),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        slot.start_loading()
        try:
            yield
        finally:
            slot.begin_shutdown()
            if on_shutdown is not None:
                on_shutdown()
            await anyio.to_thread.run_sync(_shutdown, ctx)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return not_found(f"route {request.method} {request.url.path}").response()
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return error.response()

    origins = list(cors_origins)
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[CONVERSATION_HEADER],
            max_age=600,
        )
        for _ in origins[:1]
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={HTTPException: http_error}
    )
    app.state.rxrt = ctx
    return app


def context_of(app: Starlette) -> Context:
    """The app's :class:`Context` (its engine slot, registry, metrics...), for embedding code and tests."""
    ctx: Context = app.state.rxrt
    return ctx


def _shutdown(ctx: Context) -> None:
    ctx.background.shutdown(wait=True)  # chat STMs being cached need the engine: before closing it
    ctx.slot.close()


def _engine_stats(slot: EngineSlot) -> dict[str, int]:
    engine = slot.peek()
    return engine.stats() if engine is not None else {}
