"""A client for ``rxrt serve``: remote conversations with the local API (see docs/protocol.md).

    with Client("tcp://127.0.0.1:5555") as client:
        conv = client.open()                              # or open("alice"): resumes a stored one
        conv.interact("Hi, I'm Ada.").subscribe(print)    # the same events as locally
        print(conv.ask("What's my name?"))
        async for event in conv.astream("..."): ...

One background thread owns the DEALER socket (zmq sockets are single-threaded); requests are
queued to it and replies dispatched by request id. Events of a remote turn are delivered in
order, one at a time, on the conversation's mailbox, as locally. Server errors come back as
the same typed exceptions (``QueryTooLongError``, ``ConversationError``, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgpack
import reactivex
import zmq
from reactivex import Observable, abc
from reactivex.disposable import Disposable

from rxruntime import errors
from rxruntime.conversation import ConversationState, TurnMethods
from rxruntime.events import Event, from_dict
from rxruntime.mailbox import Mailbox
from rxruntime.models.errors import ConfigError, RxTError
from rxruntime.operators.tokenize import Query
from rxruntime.server import ProtocolError
from rxruntime.stores import StaleStateError


class RemoteError(RxTError):
    """A server-side error with no local class of the same name."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(f"{error_type}: {message}")


_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        errors.QueryTooLongError,
        errors.InvalidTokenError,
        errors.ModelExecutionError,
        errors.EngineClosedError,
        errors.ConversationError,
        errors.StreamOverflowError,
        StaleStateError,
        ConfigError,
        ProtocolError,
    )
}


def _error(payload: dict[str, Any]) -> Exception:
    kind, message = str(payload.get("type")), str(payload.get("message"))
    cls = _ERRORS.get(kind)
    return cls(message) if cls is not None else RemoteError(kind, message)


class Client:
    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, timeout: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._rids = itertools.count(1)
        self._handlers: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._outbox: deque[bytes] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._delivery = ThreadPoolExecutor(8, thread_name_prefix="rxrt-client")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rxrt-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def ping(self) -> dict[str, Any]:
        """Server information; raises TimeoutError if nobody answers."""
        result: dict[str, Any] = self.call("ping")
        return result

    def open(self, conversation_id: str | None = None, *, memory_init: str | None = None) -> RemoteConversation:
        """Open a conversation (a new one, or a stored one resumed by the server)."""
        ok = self.call("open", conversation_id=conversation_id, memory_init=memory_init)
        return RemoteConversation(self, str(ok["conversation_id"]))

    def restore(self, state: ConversationState) -> RemoteConversation:
        ok = self.call("restore", state=state.to_bytes())
        return RemoteConversation(self, str(ok["conversation_id"]))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        self._thread.join(5)
        self._delivery.shutdown(wait=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def call(self, op: str, **fields: Any) -> Any:
        """Send a request and wait for its ``ok`` reply (or raise its typed error)."""
        future: Future[Any] = Future()

        def handle(message: dict[str, Any]) -> None:
            if "error" in message:
                future.set_exception(_error(message["error"]))
            else:
                future.set_result(message.get("ok"))

        rid = self.send(op, handle, **fields)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            self._drop(rid)
            raise TimeoutError(f"no reply to {op!r} from {self.address} within {self.timeout} s") from None

    def send(self, op: str, handler: Callable[[dict[str, Any]], None] | None, **fields: Any) -> int:
        """Queue a request; ``handler`` gets every reply with its request id (on the client thread)."""
        if self._closed.is_set():
            raise errors.EngineClosedError("the client is closed")
        rid = next(self._rids)
        if handler is not None:
            with self._lock:
                self._handlers[rid] = handler
        self._outbox.append(msgpack.packb({"op": op, "rid": rid, **fields}, use_bin_type=True))
        self._wake()
        return rid

    def _drop(self, rid: int) -> None:
        with self._lock:
            self._handlers.pop(rid, None)

    # ------------------------------------------------------------------ socket thread
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the poller
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(500))
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 65536)
                while self._outbox:
                    self._socket.send(self._outbox.popleft())
                if self._socket in ready:
                    while True:
                        try:
                            payload = self._socket.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(payload)
        finally:
            self._socket.close(0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _dispatch(self, payload: bytes) -> None:
        try:
            message = msgpack.unpackb(payload, raw=False)
        except Exception:
            return
        if not isinstance(message, dict):
            return
        rid = message.get("rid")
        if not isinstance(rid, int):
            return  # a reply to a request the server could not read at all
        with self._lock:
            handler = self._handlers.get(rid)
            final = "ok" in message or "error" in message or message.get("done")
            if handler is not None and final:
                del self._handlers[rid]
        if handler is not None:
            handler(message)


class RemoteConversation(TurnMethods):
    """A conversation served by ``rxrt serve``: ``interact``, ``astream``, ``ask``, ``export_state``."""

    def __init__(self, client: Client, conversation_id: str) -> None:
        self._client = client
        self._id = conversation_id
        self._mailbox = Mailbox(client._delivery)

    @property
    def id(self) -> str:
        return self._id

    def interact(self, query: Query, **options: Any) -> Observable[Event]:
        """The events of one turn, streamed from the server (cold: subscribing sends the query;
        disposing before the answer completes cancels it on the server)."""
        body: Any = query if isinstance(query, str) else [int(i) for i in query]

        def subscribe(observer: abc.ObserverBase[Event], scheduler: abc.SchedulerBase | None = None) -> Disposable:
            finished = threading.Event()

            def handle(message: dict[str, Any]) -> None:
                if "event" in message:
                    event = from_dict(message["event"])
                    self._mailbox.post(lambda: observer.on_next(event))
                elif "error" in message:
                    finished.set()
                    exc = _error(message["error"])
                    self._mailbox.post(lambda: observer.on_error(exc))
                elif message.get("done"):
                    finished.set()
                    self._mailbox.post(observer.on_completed)

            rid = self._client.send("interact", handle, conversation_id=self._id, query=body, options=options)

            def cancel() -> None:
                if not finished.is_set():
                    self._client._drop(rid)
                    self._client.send("cancel", None, target=rid)

            return Disposable(cancel)

        return reactivex.create(subscribe)

    def export_state(self) -> ConversationState:
        """The conversation's memory, after its pending turns (as ``Conversation.export_state``)."""
        ok = self._client.call("export", conversation_id=self._id)
        return ConversationState.from_bytes(ok["state"])

    def close(self) -> None:
        self._client.call("close", conversation_id=self._id)

    def __repr__(self) -> str:
        return f"RemoteConversation(id={self._id!r}, server={self._client.address!r})"
