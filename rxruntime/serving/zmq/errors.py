"""Errors of the transport: what a request, a peer or a connection did wrong (docs/protocol.md).

Engine errors (``QueryTooLongError``, ``ConversationError``, ...) cross the wire under their own
names; these are the ones only a network front can raise.
"""

from __future__ import annotations

from rxruntime.errors import InteractionError
from rxruntime.models.errors import RxTError


class ProtocolError(RxTError, ValueError):
    """A request the server cannot accept: not msgpack, not a map, a missing, unknown or mistyped
    field, a value out of range, too large. ``field`` names the offending field when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConnectionLost(RxTError, ConnectionError):
    """The connection to the server broke (the server died, the network failed, or heartbeats
    stopped): every request and stream in flight on it fails with this, none hangs."""


class AuthenticationError(ConnectionLost):
    """The server refused this client's CURVE key (or the client has the wrong server key)."""


class SlowConsumerError(InteractionError):
    """The server stopped streaming to this client because it stopped reading: its buffered
    replies passed the server's per-peer bound, so its running turns were cancelled."""


class TooManyRequestsError(RxTError):
    """This connection has as many requests in flight as the server allows one peer."""


class RemoteError(RxTError):
    """A server-side error with no local class of the same name."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(f"{error_type}: {message}")
