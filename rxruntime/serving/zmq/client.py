"""A client for ``rxrt serve``: remote conversations with the local API (see docs/protocol.md).

    with Client("tcp://127.0.0.1:5555", keys=ClientKeys.load("keys", "alice")) as client:
        conv = client.open()                              # or open("ada"): resumes a stored one
        conv.interact("Hi, I'm Ada.").subscribe(print)    # the same events as locally
        print(conv.ask("What's my name?"))
        async for event in conv.astream("..."): ...

One background thread owns the DEALER socket (zmq sockets are single-threaded); requests are
queued to it and replies dispatched by request id. Events of a remote turn are delivered in
order, one at a time, on the conversation's mailbox, as locally. Server errors come back as the
same typed exceptions (``QueryTooLongError``, ``ConversationError``, ...).

The client notices a dead server: it sends a heartbeat every ``heartbeat_s`` and watches the
connection, so when the connection drops, or nothing has come back for ``heartbeat_timeout_s``,
every request and stream in flight fails with :class:`ConnectionLost` instead of hanging.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgpack
import reactivex
import zmq
from reactivex import Observable, abc
from reactivex.disposable import Disposable
from zmq.utils.monitor import recv_monitor_message

from rxruntime import errors
from rxruntime.conversation import ConversationState, TurnMethods
from rxruntime.events import Event, Mailbox, from_dict
from rxruntime.operators import Query
from rxruntime.serving.zmq.curve import ClientKeys
from rxruntime.serving.zmq.errors import AuthenticationError, ConnectionLost, RemoteError
from rxruntime.serving.zmq.wire import error_from_payload, error_payload

__all__ = ["Client", "ConnectionLost", "RemoteConversation", "RemoteError"]

_HEARTBEAT_RID = 0  # requests count from 1
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,  # the server's authenticator refused our key
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,  # e.g. CURVE with the wrong server key
)
_MONITORED = zmq.EVENT_DISCONNECTED
for _event in _HANDSHAKE_FAILED:
    _MONITORED |= _event


class Client:
    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        keys: ClientKeys | None = None,
        timeout: float = 60.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 10.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A random routing id: without keys it is this client's identity (it owns what it opens).
        self._socket.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(16))
        # Queue only on a live connection: a request never reaches a server that restarted after
        # its requester was told the connection was lost.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        ivl = max(1, int(heartbeat_s * 1000))
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(heartbeat_timeout_s * 1000)))
        self._has_keys = keys is not None
        if keys is not None:
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        self._monitor = self._socket.get_monitor_socket(_MONITORED)
        self._socket.connect(address)
        self._rids = itertools.count(1)
        self._handlers: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._outbox: deque[bytes] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._delivery = ThreadPoolExecutor(8, thread_name_prefix="rxrt-client")
        self._closed = threading.Event()
        self._last_heard = time.monotonic()
        self._refused = False  # a handshake failed since the last reply
        self._connected = False  # until the first reply: before that, requests wait up to ``timeout``
        self._thread = threading.Thread(target=self._loop, name="rxrt-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def ping(self) -> dict[str, Any]:
        """Server information; raises ConnectionLost / TimeoutError if nobody answers."""
        result: dict[str, Any] = self.call("ping")
        return result

    def open(self, conversation_id: str | None = None, *, memory_init: str | None = None) -> RemoteConversation:
        """Open a conversation (a new one, or a stored one of yours resumed by the server)."""
        ok = self.call("open", conversation_id=conversation_id, memory_init=memory_init)
        return RemoteConversation(self, str(ok["conversation_id"]))

    def restore(self, state: ConversationState) -> RemoteConversation:
        """Load a snapshot into the conversation of its id (yours, or a new one)."""
        ok = self.call("restore", state=state.to_bytes())
        return RemoteConversation(self, str(ok["conversation_id"]))

    def delete(self, conversation_id: str) -> None:
        """Remove one of your conversations from the server and its store."""
        self.call("delete", conversation_id=conversation_id)

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
                future.set_exception(error_from_payload(message["error"]))
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

    def _fail_all(self, exc: Exception) -> None:
        """Every request in flight ends with ``exc`` (unsent ones are never sent)."""
        self._outbox.clear()
        with self._lock:
            handlers = list(self._handlers.values())
            self._handlers.clear()
        message = {"error": error_payload(exc)}
        for handler in handlers:
            handler(message)

    # ------------------------------------------------------------------ socket thread
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the poller
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(20 if self._outbox else 100))
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 65536)
                if self._socket in ready:
                    self._receive_all()
                if self._monitor in ready:
                    self._receive_all()  # what arrived before the connection dropped comes first
                    self._on_monitor_event()
                if self._refused and self._handlers:  # no request can get through until keys change
                    self._fail_all(self._refusal())
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_s
                    if not self._outbox:
                        self._outbox.append(msgpack.packb({"op": "heartbeat", "rid": _HEARTBEAT_RID}))
                    limit = self.heartbeat_timeout_s if self._connected else self.timeout
                    if now - self._last_heard > limit:
                        self._last_heard = now  # one failure per silence; later requests get a fresh wait
                        what = "no reply from" if self._connected else "could not reach"
                        self._connected = False
                        self._fail_all(ConnectionLost(f"{what} {self.address} for {limit:g} s"))
                self._send_outbox()
        finally:
            self._fail_all(ConnectionLost("the client was closed"))
            self._socket.disable_monitor()
            self._monitor.close(0)
            self._socket.close(0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _send_outbox(self) -> None:
        while self._outbox:
            try:
                self._socket.send(self._outbox[0], zmq.NOBLOCK)
            except zmq.Again:  # not connected (yet, or any more): the heartbeat deadline decides
                return
            self._outbox.popleft()

    def _on_monitor_event(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            refused = self._refusal()
            if kind in _HANDSHAKE_FAILED and not self._has_keys:
                continue  # not our server (or not up yet): requests wait up to ``timeout`` as before
            if kind in _HANDSHAKE_FAILED:
                self._refused = True  # until a reply comes through: every drop until then is this
                self._fail_all(refused)
            elif kind == zmq.EVENT_DISCONNECTED and (self._connected or self._refused):
                # a connection that had worked: what was in flight on it is gone
                self._connected, self._last_heard = False, time.monotonic()
                lost = ConnectionLost(f"the connection to {self.address} was lost")
                self._fail_all(refused if self._refused else lost)
            # a connection that never answered: requests wait up to ``timeout`` for one that does

    def _refusal(self) -> AuthenticationError:
        return AuthenticationError(
            f"the CURVE handshake with {self.address} failed: the server refused this client's key, "
            "or this client has the wrong server key, or one side has no keys"
        )

    def _receive_all(self) -> None:
        while True:
            try:
                payload = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard, self._connected, self._refused = time.monotonic(), True, False
            self._dispatch(payload)

    def _dispatch(self, payload: bytes) -> None:
        try:
            message = msgpack.unpackb(payload, raw=False)
        except Exception:
            return
        if not isinstance(message, dict):
            return
        rid = message.get("rid")
        if rid is None and "error" in message:  # about the whole connection (e.g. SlowConsumerError)
            self._fail_all(error_from_payload(message["error"]))
            return
        if not isinstance(rid, int) or rid == _HEARTBEAT_RID:
            return
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
                    exc = error_from_payload(message["error"])
                    self._mailbox.post(lambda: observer.on_error(exc))
                elif message.get("done"):
                    finished.set()
                    self._mailbox.post(observer.on_completed)

            rid = self._client.send("interact", handle, conversation_id=self._id, query=body, options=options)

            def cancel() -> None:
                if not finished.is_set():
                    self._client._drop(rid)
                    with contextlib.suppress(errors.EngineClosedError):
                        self._client.send("cancel", None, target=rid)

            return Disposable(cancel)

        return reactivex.create(subscribe)

    def export_state(self) -> ConversationState:
        """The conversation's memory, after its pending turns (as ``Conversation.export_state``)."""
        ok = self._client.call("export", conversation_id=self._id)
        return ConversationState.from_bytes(ok["state"])

    def close(self) -> None:
        """Unload the conversation from the server (a store keeps its memory)."""
        self._client.call("close", conversation_id=self._id)

    def delete(self) -> None:
        """Remove the conversation from the server and its store."""
        self._client.delete(self._id)

    def __repr__(self) -> str:
        return f"RemoteConversation(id={self._id!r}, server={self._client.address!r})"
