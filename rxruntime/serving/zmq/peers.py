"""One connected client as the server sees it: identity, liveness, streams, and a bounded outbox.

zmq's ROUTER silently drops a message when a peer's pipe is full. The server therefore sends with
``ROUTER_MANDATORY`` (a full pipe answers EAGAIN, a vanished peer EHOSTUNREACH) and keeps what did
not fit here, up to ``max_bytes`` per peer. Past that, once zmq refuses more too, the peer is *overflowed*: its buffered
replies are discarded, its running turns cancelled, and it is told so with ``SlowConsumerError``
(one error per cancelled stream, one for everything else) as soon as it reads again. Nothing is
dropped without the peer being told, and a peer that never reads costs at most ``max_bytes``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgpack
from reactivex import abc

from rxruntime.serving.ownership import Identity
from rxruntime.serving.zmq.errors import SlowConsumerError
from rxruntime.serving.zmq.wire import error_payload


@dataclass
class Peer:
    key: bytes  # the ROUTER routing id
    envelope: list[bytes]  # frames before the payload (routing id, and a REQ client's delimiter)
    identity: Identity
    last_seen: float
    outbox: deque[bytes] = field(default_factory=deque)
    pending_bytes: int = 0
    streams: dict[int, abc.DisposableBase] = field(default_factory=dict)
    inflight: int = 0  # requests accepted and not yet answered (streams included)
    blocked: bool = False  # zmq's pipe to it was full at the last send
    overflowed: bool = False
    dropped: int = 0  # replies discarded since the last overflow

    def push(self, payload: bytes, max_bytes: int) -> list[abc.DisposableBase] | None:
        """Buffer one reply. Returns the streams to cancel if this push overflowed the peer: over
        ``max_bytes`` wait here *and* zmq refused more (a peer that reads is never cut off)."""
        if self.overflowed:
            self.dropped += 1
            return None
        self.outbox.append(payload)
        self.pending_bytes += len(payload)
        if self.pending_bytes <= max_bytes or not self.blocked:
            return None
        return self.overflow()

    def overflow(self) -> list[abc.DisposableBase]:
        self.overflowed = True
        self.dropped = len(self.outbox)
        self.outbox.clear()
        self.pending_bytes = 0
        cancelled = list(self.streams.items())
        self.streams.clear()
        self.inflight -= len(cancelled)
        for rid, _ in cancelled:
            exc = SlowConsumerError(f"stream {rid} cancelled: the client stopped reading its replies")
            self._raw({"rid": rid, "error": error_payload(exc)})
        notice = SlowConsumerError(
            f"the client stopped reading: {self.dropped} buffered replies were discarded and "
            f"{len(cancelled)} running turns cancelled; every request in flight has failed"
        )
        self._raw({"rid": None, "error": error_payload(notice)})
        return [stream for _, stream in cancelled]

    def _raw(self, message: dict[str, object]) -> None:
        payload = msgpack.packb(message, use_bin_type=True)
        self.outbox.append(payload)
        self.pending_bytes += len(payload)

    def sent(self, payload: bytes) -> bool:
        """The head of the outbox went out; True when an overflowed peer has caught up."""
        self.blocked = False
        self.outbox.popleft()
        self.pending_bytes -= len(payload)
        if self.overflowed and not self.outbox:
            self.overflowed = False
            return True
        return False
