"""Small helpers shared by the operators."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, Disposable, SerialDisposable

from rxruntime.engine import Backend
from rxruntime.events import Event, InteractionFailed


class ConversationRef(Protocol):
    """What an operator needs to know about a conversation: its id and the engine running it."""

    @property
    def id(self) -> str: ...

    @property
    def backend(self) -> Backend: ...


def failed(event_source: Event, exc: Exception, stage: str, stm_version: int) -> InteractionFailed:
    return InteractionFailed(
        conversation_id=event_source.conversation_id,
        turn=event_source.turn,
        error_type=type(exc).__name__,
        message=str(exc),
        stage=stage,  # type: ignore[arg-type]
        stm_version=stm_version,
    )


def fail_with(event: InteractionFailed, exc: Exception) -> Observable[Event]:
    """Emit ``InteractionFailed`` and then the typed error (Rx streams end on errors)."""
    return reactivex.concat(reactivex.of(event), reactivex.throw(exc))


def create(subscribe: Callable[[abc.ObserverBase[Any]], Callable[[], None]]) -> Observable[Any]:
    """``reactivex.create`` for callbacks that return a plain ``dispose`` function."""

    def on_subscribe(observer: abc.ObserverBase[Any], scheduler: abc.SchedulerBase | None = None) -> abc.DisposableBase:
        return Disposable(subscribe(observer))

    return reactivex.create(on_subscribe)


_Item = tuple[str, Any]


def ordered(project: Callable[[Any], Observable[Any] | None]) -> Callable[[Observable[Any]], Observable[Any]]:
    """``concat_map`` with the ordering the event pipeline needs.

    ``project(item)`` returns an Observable to run before the next item, or None to pass the item
    through as is. Unlike ``concat_map``: pass-through items are emitted synchronously (no hop
    through the trampoline, where a following upstream error would overtake them), and an upstream
    error or completion is delivered only after the output of every earlier item. So
    ``InteractionFailed`` always reaches the subscriber before its error.
    """

    def operator(source: Observable[Any]) -> Observable[Any]:
        def on_subscribe(
            observer: abc.ObserverBase[Any], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            queue: deque[_Item] = deque()
            lock = threading.RLock()
            state = {"draining": False, "inner": False, "stopped": False}
            inner = SerialDisposable()

            def inner_completed() -> None:
                with lock:
                    state["inner"] = False
                drain()

            def inner_error(exc: Exception) -> None:
                with lock:
                    state["stopped"] = True
                observer.on_error(exc)

            def drain() -> None:
                with lock:
                    if state["draining"]:
                        return
                    state["draining"] = True
                try:
                    while True:
                        with lock:
                            if state["inner"] or state["stopped"] or not queue:
                                return
                            kind, value = queue.popleft()
                            if kind != "item":
                                state["stopped"] = True
                        if kind == "error":
                            observer.on_error(value)
                            return
                        if kind == "completed":
                            observer.on_completed()
                            return
                        result = project(value)
                        if result is None:
                            observer.on_next(value)
                            continue
                        with lock:
                            state["inner"] = True
                        inner.disposable = result.subscribe(
                            observer.on_next, inner_error, inner_completed, scheduler=scheduler
                        )
                finally:
                    with lock:
                        state["draining"] = False
                    # an inner that completed while we held the drain flag left work behind
                    with lock:
                        pending = bool(queue) and not state["inner"] and not state["stopped"]
                    if pending:
                        drain()

            def push(kind: str, value: Any = None) -> None:
                with lock:
                    queue.append((kind, value))
                drain()

            upstream = source.subscribe(
                lambda x: push("item", x),
                lambda e: push("error", e),
                lambda: push("completed"),
                scheduler=scheduler,
            )
            return CompositeDisposable(upstream, inner)

        return reactivex.create(on_subscribe)

    return operator
