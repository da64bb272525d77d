"""Pipeable reactivex operators over interaction events (import name: ``rxruntime.operators``).

The operators of one turn live in :mod:`~rxruntime.operators.interaction`, in the order a query
meets them; each transforms the events it is about and passes every other event through, so they
chain into one stream::

    queries.pipe(tokenize(conv), generate(conv), detokenize(tok), memory_started(conv), memory_updated(conv))

which is what :func:`interaction` does, one query at a time. ``memory_started`` and
``memory_updated`` are views of the engine's memory stage (it runs by itself once an answer
completes); their old names ``encode`` and ``update_memory`` still work, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .interaction import (
    Query,
    detokenize,
    generate,
    interaction,
    memory_started,
    memory_updated,
    sampling_params,
    tokenize,
)

_RENAMED = {"encode": "memory_started", "update_memory": "memory_updated"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"rxruntime.operators.{name} is now rxruntime.operators.{new}: it reports the engine's memory "
            "stage, it does not run it",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Query",
    "detokenize",
    "generate",
    "interaction",
    "memory_started",
    "memory_updated",
    "sampling_params",
    "tokenize",
]
