"""Shared by the HTTP tests: the real app on a loopback port and the official ``openai`` client."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import openai
from starlette.applications import Starlette

from rxruntime.engine import Engine
from rxruntime.serving.http.app import create_app
from rxruntime.serving.http.serve import ThreadedServer

JULIA = "My name is Julia."
ASK_NAME = "What is my name?"


def assert_recalls_julia(answer: str, conversation_id: str | None, told: str | None = None) -> None:
    """The answer names Julia; if not, the message says what replays the conversation alone: its
    id (the engine seeds its initial STM with crc32 of it) and the answer to the statement."""
    seed = None if conversation_id is None else zlib.crc32(conversation_id.encode())
    assert "Julia" in answer, (
        f"no recall: {answer!r}; conversation {conversation_id!r} (initial STM seed {seed}); "
        f"the answer to {JULIA!r} was {told!r}"
    )


@contextlib.contextmanager
def served(engine: Engine | Callable[[], Engine], **options: Any) -> Iterator[tuple[str, Starlette]]:
    """(base URL, app) of ``create_app(engine, **options)`` served by uvicorn on 127.0.0.1:<free port>."""
    app = create_app(engine, **options)
    with ThreadedServer(app) as server:
        yield server.url, app


def client(url: str, key: str = "unused") -> openai.OpenAI:
    """The official client pointed at our server; no retries, so each status is seen as sent."""
    return openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=120)


def async_client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=300)
