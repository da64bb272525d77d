"""``encode``: ``AnswerCompleted`` -> the answer, then ``MemoryUpdateStarted``.

When an answer completes, the engine always runs its memory update (so no turn is lost if a
subscriber leaves): the encoder reads ``[BOS][Q] query [A] answer [EOS]`` and memory attention
writes the STM, on the memory thread or CUDA stream. This operator reports the start of that
stage for the turn: ``MemoryUpdateStarted`` carries the STM version being replaced. A cancelled
turn that is not remembered has no memory stage: the answer passes through alone.

Marble::

    in:   --A----------|
    out:  --A---M(v3)--|
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc

from rxruntime.events import AnswerCompleted, Event, MemoryUpdateStarted

from ._util import ConversationRef, create, failed, ordered


def encode(conv: ConversationRef) -> Callable[[Observable[Event]], Observable[Event]]:
    backend = conv.backend

    def started(answer: AnswerCompleted) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            cid = answer.conversation_id

            class Watcher:
                def on_memory_started(self, turn: int, stm_version: int) -> None:
                    observer.on_next(MemoryUpdateStarted(conversation_id=cid, turn=turn, stm_version=stm_version))
                    observer.on_completed()

                def on_memory_updated(self, turn: int, stm_version: int, duration_s: float) -> None:
                    observer.on_completed()  # only reached if the start was already reported

                def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
                    observer.on_next(failed(answer, exc, "memory", stm_version))
                    observer.on_error(exc)

                def on_memory_skipped(self, turn: int) -> None:
                    observer.on_completed()

            return backend.watch_memory(cid, answer.turn, Watcher())

        return reactivex.concat(reactivex.of(answer), create(subscribe))

    def route(event: Event) -> Observable[Event] | None:
        return started(event) if isinstance(event, AnswerCompleted) else None

    return ordered(route)
