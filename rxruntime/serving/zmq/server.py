"""``rxrt serve``: an engine behind a zmq ROUTER socket, msgpack frames (see docs/protocol.md).

One thread owns the socket: it reads and validates requests, and sends what other threads queue
(a pipe wakes its poller, since a zmq socket must stay on one thread). Work that may block (a
store read, waiting for a memory update) runs on lanes: serial queues on a thread pool, one lane
per hash of the conversation id, so the requests of one conversation run in the order they
arrived and a slow one never stalls the socket.

Who may connect is CURVE's job (``keys``); who owns a conversation is :mod:`.conversations`'; what a
slow or silent peer may cost is :mod:`.peers`'. A peer that is silent for ``peer_timeout_s`` (no
request, no heartbeat) or whose connection is gone is dead: its running turns are cancelled.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import zmq
from reactivex import abc
from reactivex.disposable import SingleAssignmentDisposable

from rxruntime.engine import Engine
from rxruntime.errors import ConversationError
from rxruntime.events import Event, Mailbox
from rxruntime.models.errors import ConfigError
from rxruntime.serving.ownership import Identity, Tenants
from rxruntime.serving.zmq import wire
from rxruntime.serving.zmq.conversations import OwnedConversations
from rxruntime.serving.zmq.curve import ServerKeys
from rxruntime.serving.zmq.errors import ProtocolError, TooManyRequestsError
from rxruntime.serving.zmq.peers import Peer
from rxruntime.serving.zmq.wire import PROTOCOL, Limits, Request

log = logging.getLogger(__name__)

_LANES = 16


def is_loopback(address: str) -> bool:
    """Whether a zmq endpoint is reachable from this machine only (ipc/inproc, or a loopback IP)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: may be public


class Server:
    """Serve ``engine`` at ``address``; ``start()`` runs it on a background thread."""

    def __init__(
        self,
        engine: Engine,
        address: str = "tcp://127.0.0.1:5555",
        *,
        keys: ServerKeys | None = None,
        insecure: bool = False,
        max_message_bytes: int = 1 << 20,
        max_pending_bytes: int = 16 << 20,
        max_inflight: int = 1024,
        heartbeat_s: float = 1.0,
        peer_timeout_s: float = 10.0,
    ) -> None:
        if keys is None and not insecure and not is_loopback(address):
            raise ConfigError(
                f"refusing to serve {address} without authentication: pass keys (rxrt serve --keys DIR, "
                "from rxrt keygen) or insecure=True (--insecure) to serve it to anyone who can reach it"
            )
        self.engine = engine
        self.address = address
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_inflight = max_inflight
        self.peer_timeout_s = peer_timeout_s
        self.heartbeat_s = heartbeat_s
        self.limits = Limits(engine.vocab_size, engine.max_seq_len, max_message_bytes)
        self._ctx = zmq.Context()
        self._auth: Any = None
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 16 * max_message_bytes)  # hard cap: zmq drops the peer
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # full or vanished peers raise, never drop
        ivl = max(1, int(heartbeat_s * 1000))
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(peer_timeout_s * 1000)))
        self._socket.setsockopt(zmq.HEARTBEAT_TTL, max(ivl, int(peer_timeout_s * 1000)))
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".auth"))
            self._auth.start()
            self._auth.configure_curve(domain="rxrt", location=str(keys.authorized))
            self._socket.setsockopt(zmq.CURVE_SERVER, 1)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            self._socket.setsockopt(zmq.ZAP_DOMAIN, b"rxrt")
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # peers, their outboxes and streams; the open conversations
        self._peers: dict[bytes, Peer] = {}
        self._ready: set[bytes] = set()  # peers with something to send
        self.conversations = OwnedConversations(engine)
        self._pool = ThreadPoolExecutor(_LANES, thread_name_prefix="rxrt-serve")
        self._lanes = [Mailbox(self._pool) for _ in range(_LANES)]
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
        next_check = time.monotonic() + self.heartbeat_s
        try:
            while not self._stop.is_set():
                blocked = self._flush()
                ready = dict(poller.poll(20 if blocked else 250))
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 65536)
                if self._socket in ready:
                    self._receive_all()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.heartbeat_s
                    self._reap_silent_peers()
            self._flush()
        finally:
            with self._lock:
                streams = [s for peer in self._peers.values() for s in peer.streams.values()]
                self._peers.clear()
            for stream in streams:
                stream.dispose()
            self._pool.shutdown(wait=True)
            if self._auth is not None:
                self._auth.stop()
            self._socket.close(0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # ------------------------------------------------------------------ peers
    def peer_stats(self) -> dict[str, dict[str, int]]:
        """Per live peer: buffered bytes and messages, streams, requests in flight (for tests, ops)."""
        with self._lock:
            return {
                p.identity.label: {
                    "pending_bytes": p.pending_bytes,
                    "pending": len(p.outbox),
                    "streams": len(p.streams),
                    "inflight": p.inflight,
                }
                for p in self._peers.values()
            }

    def _peer(self, envelope: list[bytes], identity: Identity) -> Peer:
        key = envelope[0]
        now = time.monotonic()
        with self._lock:
            peer = self._peers.get(key)
            if peer is None or peer.identity != identity:
                peer = Peer(key, envelope, identity, now)
                self._peers[key] = peer
            peer.last_seen = now
            return peer

    def _peer_gone(self, key: bytes, reason: str) -> None:
        """A dead peer: cancel its running turns; without keys its conversations become claimable."""
        with self._lock:
            peer = self._peers.pop(key, None)
            self._ready.discard(key)
        if peer is None:
            return
        streams = list(peer.streams.values())
        log.warning("peer %s is gone (%s): cancelling %d running turns", peer.identity.label, reason, len(streams))
        self._dispose(streams)
        if not peer.identity.namespace:
            with self._lock:
                others = any(p.identity == peer.identity for p in self._peers.values())
            if not others:
                self.conversations.tenants.release_owner(peer.identity)

    def _reap_silent_peers(self) -> None:
        deadline = time.monotonic() - self.peer_timeout_s
        with self._lock:
            silent = [key for key, peer in self._peers.items() if peer.last_seen < deadline]
        for key in silent:
            self._peer_gone(key, f"nothing heard for {self.peer_timeout_s:g} s")

    # ------------------------------------------------------------------ socket thread
    def _receive_all(self) -> None:
        for _ in range(100):  # then flush: replies keep flowing under a flood of requests
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            envelope = [f.bytes for f in frames[:-1]]
            payload = frames[-1]
            if self.keys is not None:
                identity = Identity.from_key(str(payload.get("User-Id")))
            else:
                identity = Identity(envelope[0])
            peer = self._peer(envelope, identity)
            rid: int | None = None
            try:
                request = wire.decode(payload.bytes, self.limits)
                rid = wire.request_id(request)
                self._handle(peer, wire.validate(request, self.limits))
            except Exception as exc:  # never let one request take the server down
                if not isinstance(exc, (ProtocolError, ConversationError, TooManyRequestsError)):
                    log.exception("request failed")
                self._reply(peer.key, rid, error=exc)

    def _flush(self) -> bool:
        """Send what peers can take; True if some peer's pipe is full (retry soon)."""
        with self._lock:
            keys = list(self._ready)
        blocked = False
        for key in keys:
            while True:
                with self._lock:
                    peer = self._peers.get(key)
                    if peer is None or not peer.outbox:
                        self._ready.discard(key)
                        break
                    payload = peer.outbox[0]
                try:
                    self._socket.send_multipart([*peer.envelope, payload], zmq.NOBLOCK)
                except zmq.Again:
                    blocked = True
                    cancelled = None
                    with self._lock:
                        peer.blocked = True
                        if peer.pending_bytes > self.max_pending_bytes and not peer.overflowed:
                            cancelled = peer.overflow()
                    if cancelled is not None:
                        self._overflowed(peer, cancelled)
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    self._peer_gone(key, "disconnected")
                    break
                with self._lock:
                    caught_up = peer.sent(payload)
                    dropped = peer.dropped
                if caught_up:
                    log.warning("peer %s reads again; %d replies were discarded", peer.identity.label, dropped)
        return blocked

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the poller
            os.write(self._wake_w, b"x")

    def _send(self, key: bytes, message: dict[str, Any]) -> None:
        """Queue a reply to a peer, from any thread (dropped only if the peer is dead)."""
        payload = msgpack.packb(message, use_bin_type=True)
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                return  # a dead peer: its turns were cancelled, nobody is listening
            cancelled = peer.push(payload, self.max_pending_bytes)
            self._ready.add(key)
        if cancelled is not None:
            self._overflowed(peer, cancelled)
        self._wake()

    def _overflowed(self, peer: Peer, cancelled: list[abc.DisposableBase]) -> None:
        log.warning(
            "peer %s stopped reading: over %d bytes of replies buffered; discarding them, "
            "cancelling its %d running turns and telling it so (SlowConsumerError)",
            peer.identity.label,
            self.max_pending_bytes,
            len(cancelled),
        )
        self._dispose(cancelled)

    def _dispose(self, streams: list[abc.DisposableBase]) -> None:
        """Cancel turns off the socket thread (a cancel may wait for the engine's lock)."""
        if not streams:
            return

        def run() -> None:
            for stream in streams:
                stream.dispose()

        try:
            self._pool.submit(run)
        except RuntimeError:  # shutting down
            run()

    def _reply(
        self, key: bytes, rid: int | None, *, ok: Any = None, error: BaseException | None = None, **extra: Any
    ) -> None:
        message: dict[str, Any] = {"rid": rid, **extra}
        if error is not None:
            message["error"] = wire.error_payload(error)
        elif ok is not None:
            message["ok"] = ok
        self._send(key, message)

    # ------------------------------------------------------------------ requests
    def _handle(self, peer: Peer, request: Request) -> None:
        op, rid, f = request.op, request.rid, request.fields
        if op == "heartbeat":
            self._reply(peer.key, rid, ok={})
        elif op == "ping":
            c = self.engine.config
            info = {
                "protocol": PROTOCOL,
                "layers": c.num_layers,
                "dim": c.dim,
                "stm_size": c.stm_size,
                "vocab_size": c.vocab_size,
                "max_seq_len": c.max_seq_len,
                "auth": "curve" if self.keys is not None else "none",
                "heartbeat_s": self.heartbeat_s,
                "peer_timeout_s": self.peer_timeout_s,
            }
            self._reply(peer.key, rid, ok=info)
        elif op == "cancel":
            self._cancel(peer, rid, f["target"])
        elif op == "interact":
            self._interact(peer, rid, f["conversation_id"], f["query"], f.get("options", {}))
        elif op == "restore":
            state = wire.parse_state(f["state"])
            cid = state.conversation_id
            self._on_lane(peer, rid, cid, lambda: self.conversations.restore(peer.identity, state))
        elif op == "open":
            cid = f.get("conversation_id") or uuid.uuid4().hex[:16]
            self._on_lane(peer, rid, cid, lambda: self.conversations.open(peer.identity, cid, f.get("memory_init")))
        else:
            work: Callable[[Identity, str], dict[str, Any]] = {
                "export": self.conversations.export,
                "close": self.conversations.close,
                "delete": self.conversations.delete,
            }[op]
            cid = f["conversation_id"]
            self._on_lane(peer, rid, cid, lambda: work(peer.identity, cid))

    def _admit(self, peer: Peer) -> None:
        with self._lock:
            if peer.inflight >= self.max_inflight:
                raise TooManyRequestsError(
                    f"{peer.inflight} requests of this connection are in flight (the limit is {self.max_inflight})"
                )
            peer.inflight += 1

    def _done(self, peer: Peer) -> None:
        with self._lock:
            peer.inflight -= 1

    def _lane(self, identity: Identity, cid: str) -> Mailbox:
        return self._lanes[zlib.crc32(Tenants.engine_id(identity, cid).encode()) % _LANES]

    def _on_lane(self, peer: Peer, rid: int, cid: str, work: Callable[[], dict[str, Any]]) -> None:
        """Run ``work`` after every earlier request for this conversation; reply with its result."""
        self._admit(peer)

        def run() -> None:
            with self._lock:
                alive = self._peers.get(peer.key) is peer
            if not alive:  # it died while this waited: nobody to answer, nothing to own
                self._done(peer)
                return
            try:
                self._reply(peer.key, rid, ok=work())
            except Exception as exc:
                if not isinstance(exc, (ConversationError, ProtocolError)):
                    log.warning("request %d failed: %r", rid, exc)
                self._reply(peer.key, rid, error=exc)
            finally:
                self._done(peer)

        self._lane(peer.identity, cid).post(run)

    # ------------------------------------------------------------------ streams
    def _interact(self, peer: Peer, rid: int, cid: str, query: str | list[int], options: dict[str, Any]) -> None:
        slot = SingleAssignmentDisposable()  # a cancel may arrive before the turn has started
        with self._lock:
            if rid in peer.streams:
                raise ProtocolError(f"request id {rid} is already streaming", "rid")
        self._admit(peer)
        with self._lock:
            peer.streams[rid] = slot
        key = peer.key

        def finish() -> bool:
            with self._lock:
                mine = peer.streams.get(rid) is slot
                if mine:
                    del peer.streams[rid]
                    peer.inflight -= 1
                return mine

        def start() -> None:
            try:
                _, conv = self.conversations.access(peer.identity, cid)
                observable = conv.interact(query, **options)
            except Exception as exc:
                if finish():
                    self._reply(key, rid, error=exc)
                return

            def on_next(event: Event) -> None:
                message = event.to_dict()
                message["conversation_id"] = cid
                self._reply(key, rid, event=message)

            def on_error(exc: Exception) -> None:
                if finish():
                    self._reply(key, rid, error=exc)

            def on_completed() -> None:
                if finish():
                    self._reply(key, rid, done=True)

            if not slot.is_disposed:
                slot.disposable = observable.subscribe(on_next, on_error, on_completed)

        self._lane(peer.identity, cid).post(start)

    def _cancel(self, peer: Peer, rid: int, target: int) -> None:
        """Cancel one of this connection's own streams (another's rid is simply not found)."""
        with self._lock:
            stream: abc.DisposableBase | None = peer.streams.pop(target, None)
            if stream is not None:
                peer.inflight -= 1
        if stream is not None:
            self._dispose([stream])
            self._reply(peer.key, target, done=True, cancelled=True)
        self._reply(peer.key, rid, ok={"cancelled": stream is not None})
