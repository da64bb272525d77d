"""``rxrt serve``: an engine behind a zmq ROUTER socket, msgpack frames (see docs/protocol.md).

One thread owns the socket: it reads requests, starts turns on the engine, and sends the events
that the engine's delivery threads queue for it (a pipe wakes the poller, since zmq sockets must
stay on one thread). Blocking requests (export, restore, open with a store) run on a small
thread pool, so a slow one never stalls the event stream of other conversations.

Every bad request gets an error reply and loses nothing else: a frame that is not msgpack, a
missing field, an oversized message, an unknown conversation or op, an over-long query.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import zmq
from reactivex import abc
from reactivex.disposable import SingleAssignmentDisposable

from rxruntime.conversation import Conversation, ConversationState
from rxruntime.engine import Engine
from rxruntime.errors import ConversationError, RxTError
from rxruntime.events import Event

log = logging.getLogger(__name__)

PROTOCOL = "rxrt/1"
_OPTIONS = {"temperature", "top_k", "top_p", "seed", "max_new_tokens", "remember_partial"}


class ProtocolError(RxTError, ValueError):
    """A request the server cannot read: not msgpack, not a map, a missing field, too large."""


class Server:
    def __init__(self, engine: Engine, address: str = "tcp://127.0.0.1:5555", *, max_message_bytes: int = 1 << 20):
        self.engine = engine
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 16 * max_message_bytes)  # hard cap: zmq drops the peer
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._outbox: deque[list[bytes]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._streams: dict[tuple[bytes, int], abc.DisposableBase] = {}
        self._streams_lock = threading.Lock()
        self._conversations: dict[str, Conversation] = {}
        self._conv_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="rxrt-serve")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Server:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="rxrt-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(500))
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 65536)
                self._flush()
                if self._socket in ready:
                    self._receive_all()
            self._flush()
        finally:
            with self._streams_lock:
                streams = list(self._streams.values())
                self._streams.clear()
            for stream in streams:
                stream.dispose()
            self._pool.shutdown(wait=True)
            self._socket.close(0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # ------------------------------------------------------------------ socket thread
    def _receive_all(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            envelope, payload = frames[:-1], frames[-1]
            try:
                self._handle(envelope, payload)
            except ProtocolError as exc:
                self._reply(envelope, None, error=exc)
            except Exception as exc:  # never let one request take the server down
                log.exception("request failed")
                self._reply(envelope, None, error=exc)

    def _flush(self) -> None:
        while self._outbox:
            frames = self._outbox.popleft()
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # the peer's queue is full: it is gone or far behind; drop, it will time out
                log.warning("dropping a reply to a peer that is not reading")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the poller
            os.write(self._wake_w, b"x")

    def _send(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        """Queue a reply from any thread."""
        self._outbox.append([*envelope, msgpack.packb(message, use_bin_type=True)])
        self._wake()

    def _reply(
        self, envelope: list[bytes], rid: Any, *, ok: Any = None, error: BaseException | None = None, **extra: Any
    ) -> None:
        message: dict[str, Any] = {"rid": rid, **extra}
        if error is not None:
            message["error"] = {"type": type(error).__name__, "message": str(error)}
        elif ok is not None:
            message["ok"] = ok
        self._send(envelope, message)

    # ------------------------------------------------------------------ requests
    def _handle(self, envelope: list[bytes], payload: bytes) -> None:
        if len(payload) > self.max_message_bytes:
            raise ProtocolError(f"message of {len(payload)} bytes exceeds the limit of {self.max_message_bytes}")
        try:
            request = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            raise ProtocolError(f"not a msgpack message ({exc})") from None
        if not isinstance(request, dict):
            raise ProtocolError("a request must be a msgpack map")
        rid = request.get("rid")
        op = request.get("op")
        handler: Callable[[list[bytes], Any, dict[str, Any]], None] | None = {
            "ping": self._ping,
            "open": self._open,
            "interact": self._interact,
            "cancel": self._cancel,
            "export": self._export,
            "restore": self._restore,
            "close": self._close,
        }.get(str(op))
        if handler is None:
            self._reply(envelope, rid, error=ProtocolError(f"unknown op {op!r}"))
            return
        try:
            handler(envelope, rid, request)
        except (RxTError, ValueError, TypeError) as exc:
            self._reply(envelope, rid, error=exc)

    def _ping(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        c = self.engine.config
        info = {"protocol": PROTOCOL, "layers": c.num_layers, "dim": c.dim, "stm_size": c.stm_size}
        self._reply(envelope, rid, ok=info)

    def _open(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        conversation_id = _optional_str(request, "conversation_id")
        memory_init = _optional_str(request, "memory_init")

        def work() -> None:
            try:
                conv = self._conversation(conversation_id, memory_init=memory_init, create=True)
                self._reply(envelope, rid, ok={"conversation_id": conv.id, "stm_version": conv.stm_version})
            except Exception as exc:
                self._reply(envelope, rid, error=exc)

        self._pool.submit(work)

    def _interact(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        conversation_id = _required_str(request, "conversation_id")
        query = request.get("query")
        if not isinstance(query, str) and not (
            isinstance(query, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in query)
        ):
            raise ProtocolError("'query' must be a string or a list of token ids")
        options = request.get("options") or {}
        if not isinstance(options, dict) or set(options) - _OPTIONS:
            raise ProtocolError(f"'options' must be a map with keys among {sorted(_OPTIONS)}")
        key = (b"".join(envelope), int(rid) if isinstance(rid, int) else -1)
        slot = SingleAssignmentDisposable()  # a cancel may arrive before the turn has started
        with self._streams_lock:
            if key in self._streams:
                raise ProtocolError(f"request id {rid!r} is already streaming")
            self._streams[key] = slot

        def start() -> None:  # may read the store: off the socket thread
            try:
                conv = self._conversation(conversation_id, create=False)
                observable = conv.interact(query, **options)
            except Exception as exc:
                self._forget(key)
                self._reply(envelope, rid, error=exc)
                return

            def on_next(event: Event) -> None:
                self._reply(envelope, rid, event=event.to_dict())

            def on_error(exc: Exception) -> None:
                self._forget(key)
                self._reply(envelope, rid, error=exc)

            def on_completed() -> None:
                self._forget(key)
                self._reply(envelope, rid, done=True)

            slot.disposable = observable.subscribe(on_next, on_error, on_completed)  # no-op if cancelled

        self._pool.submit(start)

    def _cancel(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        target = request.get("target")
        key = (b"".join(envelope), int(target) if isinstance(target, int) else -1)
        with self._streams_lock:
            stream = self._streams.pop(key, None)
        if stream is not None:
            stream.dispose()
            self._reply(envelope, target, done=True, cancelled=True)

    def _export(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        conversation_id = _required_str(request, "conversation_id")

        def work() -> None:
            try:
                state = self._conversation(conversation_id, create=False).export_state()
                self._reply(envelope, rid, ok={"state": state.to_bytes()})
            except Exception as exc:
                self._reply(envelope, rid, error=exc)

        self._pool.submit(work)

    def _restore(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        data = request.get("state")
        if not isinstance(data, bytes):
            raise ProtocolError("'state' must be bytes (a ConversationState.to_bytes() snapshot)")
        state = ConversationState.from_bytes(data)

        def work() -> None:
            try:
                with self._conv_lock:
                    conv = self._conversations.get(state.conversation_id)
                if conv is None:
                    conv = self.engine.conversation(state=state)
                    with self._conv_lock:
                        self._conversations[conv.id] = conv
                else:
                    conv.load_state(state)
                self._reply(envelope, rid, ok={"conversation_id": conv.id, "stm_version": conv.stm_version})
            except Exception as exc:
                self._reply(envelope, rid, error=exc)

        self._pool.submit(work)

    def _close(self, envelope: list[bytes], rid: Any, request: dict[str, Any]) -> None:
        conversation_id = _required_str(request, "conversation_id")
        with self._conv_lock:
            conv = self._conversations.pop(conversation_id, None)
        if conv is None:
            raise ConversationError(f"unknown conversation {conversation_id!r}")
        conv.close()
        self._reply(envelope, rid, ok={"conversation_id": conversation_id})

    # ------------------------------------------------------------------ helpers
    def _conversation(
        self, conversation_id: str | None, *, memory_init: str | None = None, create: bool
    ) -> Conversation:
        """The open conversation, or one resumed from the store, or (``create``) a new one."""
        with self._conv_lock:
            if conversation_id is not None and conversation_id in self._conversations:
                return self._conversations[conversation_id]
            stored = (
                conversation_id is not None
                and self.engine.store is not None
                and self.engine.store.get(conversation_id) is not None
            )
            if not create and not stored:
                raise ConversationError(f"unknown conversation {conversation_id!r}; open it first")
            conv = self.engine.conversation(conversation_id, memory_init=memory_init)
            self._conversations[conv.id] = conv
            return conv

    def _forget(self, key: tuple[bytes, int]) -> None:
        with self._streams_lock:
            self._streams.pop(key, None)


def _optional_str(request: dict[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{name!r} must be a string")
    return value


def _required_str(request: dict[str, Any], name: str) -> str:
    value = _optional_str(request, name)
    if value is None:
        raise ProtocolError(f"missing field {name!r}")
    return value
