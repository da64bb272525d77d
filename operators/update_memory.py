"""``update_memory``: ``MemoryUpdateStarted`` -> it, then ``MemoryUpdated`` once STM(t) is committed.

Commit means the conversation's STM now is the new version and its next query may run. If the
update fails, ``InteractionFailed`` (stage ``memory``) and the error follow; the STM keeps its last
committed version.

Marble::

    in:   --M(v3)------------|
    out:  --M(v3)---U(v4)----|
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc

from rxruntime.events import Event, MemoryUpdated, MemoryUpdateStarted

from ._util import ConversationRef, create, failed, ordered


def update_memory(conv: ConversationRef) -> Callable[[Observable[Event]], Observable[Event]]:
    backend = conv.backend

    def committed(start: MemoryUpdateStarted) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            cid = start.conversation_id

            class Watcher:
                def on_memory_started(self, turn: int, stm_version: int) -> None:
                    pass

                def on_memory_updated(self, turn: int, stm_version: int, duration_s: float) -> None:
                    observer.on_next(
                        MemoryUpdated(conversation_id=cid, turn=turn, stm_version=stm_version, duration_s=duration_s)
                    )
                    observer.on_completed()

                def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
                    observer.on_next(failed(start, exc, "memory", stm_version))
                    observer.on_error(exc)

                def on_memory_skipped(self, turn: int) -> None:
                    observer.on_completed()

            return backend.watch_memory(cid, start.turn, Watcher())

        return reactivex.concat(reactivex.of(start), create(subscribe))

    def route(event: Event) -> Observable[Event] | None:
        return committed(event) if isinstance(event, MemoryUpdateStarted) else None

    return ordered(route)
