"""Memory-stage records and who hears about them: per-turn watchers and whole-conversation subscribers.

Every memory update of a turn leaves a :class:`MemoryRecord` (queued, started, updated, failed,
skipped), so a watcher that arrives late still gets the story replayed. Callbacks are posted to
the conversation's mailbox, never run here. All functions run under the scheduler's lock.
"""

from __future__ import annotations

from .protocol import MemoryListener
from .state import RECORDS_KEPT, ConvState, MemoryRecord


def set_record(conv: ConvState, turn: int, record: MemoryRecord) -> None:
    conv.records[turn] = record
    if len(conv.records) > RECORDS_KEPT:
        del conv.records[min(conv.records)]
    if record.status == "skipped":
        post_record(conv, turn, record, take_watchers(conv, turn))


def take_watchers(conv: ConvState, turn: int) -> list[MemoryListener]:
    return conv.watchers.pop(turn, [])


def notify_started(conv: ConvState, turn: int) -> None:
    listeners = [*conv.watchers.get(turn, []), *conv.subscribers] if turn > 0 else list(conv.subscribers)
    version = conv.version
    for listener in listeners:
        conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, version))  # type: ignore[misc]


def post_record(
    conv: ConvState, turn: int, record: MemoryRecord, watchers: list[MemoryListener], replay: bool = False
) -> None:
    listeners = watchers if replay else [*watchers, *conv.subscribers]
    for listener in listeners:
        if record.status == "updated":
            if replay:
                conv.mailbox.post(lambda ls=listener: ls.on_memory_started(turn, record.version - 1))  # type: ignore[misc]
            conv.mailbox.post(lambda ls=listener: ls.on_memory_updated(turn, record.version, record.duration))  # type: ignore[misc]
        elif record.status == "failed":
            assert record.error is not None
            error = record.error
            conv.mailbox.post(lambda ls=listener, e=error: ls.on_memory_failed(turn, e, record.version))  # type: ignore[misc]
        elif record.status == "skipped" and listener in watchers:
            conv.mailbox.post(lambda ls=listener: ls.on_memory_skipped(turn))  # type: ignore[misc]


def settle(conv: ConvState, turn: int, record: MemoryRecord) -> None:
    """Record a finished memory stage and tell its watchers and the subscribers."""
    set_record(conv, turn, record)
    post_record(conv, turn, record, take_watchers(conv, turn))
