"""The wire protocol's schema: which fields each request carries, and the checks every value
passes (type and range) before anything reaches the engine. See docs/protocol.md.

A request that fails a check is answered with :class:`ProtocolError` naming the field; nothing of
it reaches the engine, so it uses no turn number and cannot fail another client's turn (a
``top_k`` of 2**64 once overflowed inside a batched prefill and failed every row in it).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from rxruntime import errors
from rxruntime.conversation import ConversationState
from rxruntime.models.errors import ConfigError
from rxruntime.options import MAX_LOGPROBS
from rxruntime.serving.zmq.errors import (
    AuthenticationError,
    ConnectionLost,
    ProtocolError,
    RemoteError,
    SlowConsumerError,
    TooManyRequestsError,
)
from rxruntime.stores import StaleStateError

PROTOCOL = "rxrt/2"
MAX_ID_CHARS = 128
MAX_RID = 2**63 - 1
MAX_STATE_NUMBER = 2**53 - 1  # turns and versions: Redis keeps numbers as doubles, exact up to here


@dataclass(frozen=True)
class Limits:
    """What the served model and the server accept."""

    vocab_size: int
    max_seq_len: int
    max_message_bytes: int = 1 << 20


@dataclass(frozen=True)
class Request:
    op: str
    rid: int
    fields: dict[str, Any]


# ---------------------------------------------------------------------- value checks
def _int(field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{field!r} must be an integer, got {type(value).__name__}", field)
    if not low <= value <= high:
        raise ProtocolError(f"{field!r} must be in [{low}, {high}], got {value}", field)
    return value


def _float(field: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError(f"{field!r} must be a number, got {type(value).__name__}", field)
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ProtocolError(f"{field!r} must be a finite number in {bound}, got {value}", field)
    return number


def conversation_id(field: str, value: Any) -> str:
    """1 to 128 printable characters (no control characters)."""
    if not isinstance(value, str):
        raise ProtocolError(f"{field!r} must be a string, got {type(value).__name__}", field)
    if not 1 <= len(value) <= MAX_ID_CHARS or any(unicodedata.category(ch)[0] == "C" for ch in value):
        raise ProtocolError(f"{field!r} must be 1 to {MAX_ID_CHARS} printable characters", field)
    return value


def _options(value: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"'options' must be a map, got {type(value).__name__}", "options")
    checks: dict[str, Callable[[str, Any], Any]] = {
        "temperature": lambda f, v: _float(f, v, 0.0, 1e6),
        "top_k": lambda f, v: _int(f, v, 0, limits.vocab_size),
        "top_p": lambda f, v: _float(f, v, 0.0, 1.0, low_open=True),
        "seed": lambda f, v: _int(f, v, 0, MAX_RID),
        "max_new_tokens": lambda f, v: _int(f, v, 1, limits.max_seq_len),
        "remember_partial": _bool,
        "thinking_mode": _thinking_mode,  # whether the model has the mode: the engine says (InvalidOptionError)
        "logprobs": lambda f, v: _int(f, v, 0, MAX_LOGPROBS),
    }
    out: dict[str, Any] = {}
    for key, item in value.items():
        check = checks.get(key) if isinstance(key, str) else None
        if check is None:
            raise ProtocolError(f"unknown option {key!r}; 'options' keys are among {sorted(checks)}", "options")
        out[key] = check(f"options.{key}", item)
    return out


def _thinking_mode(field: str, value: Any) -> str:
    if value not in ("fast", "extended"):
        raise ProtocolError(f"{field!r} must be 'fast' or 'extended', got {value!r}", field)
    return str(value)


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{field!r} must be true or false, got {type(value).__name__}", field)
    return value


def _query(value: Any, limits: Limits) -> str | list[int]:
    if isinstance(value, str):
        if not value or len(value.encode()) > limits.max_message_bytes:
            raise ProtocolError("'query' must be a non-empty string", "query")
        return value
    if isinstance(value, list):
        if not 1 <= len(value) <= limits.max_seq_len:
            raise ProtocolError(f"'query' must hold 1 to {limits.max_seq_len} token ids, got {len(value)}", "query")
        for i, token in enumerate(value):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < limits.vocab_size:
                raise ProtocolError(
                    f"'query' token {i} is {token!r}, not a token id in [0, {limits.vocab_size})", "query"
                )
        return value
    raise ProtocolError(f"'query' must be a string or a list of token ids, got {type(value).__name__}", "query")


def _text(field: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{field!r} must be a string, got {type(value).__name__}", field)
    return value


def _state(value: Any) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise ProtocolError("'state' must be bytes (a ConversationState.to_bytes() snapshot)", "state")
    return value


def parse_state(data: bytes) -> ConversationState:
    """A ``restore`` snapshot, refused (ProtocolError, field ``state``) if it is not one, holds
    non-finite values, counts turns or versions a store cannot hold exactly, or has a bad id."""
    try:
        state = ConversationState.from_bytes(data)
    except (errors.ConversationError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"'state' is not a conversation state snapshot ({exc})", "state") from None
    for name in ("turn", "stm_version"):
        value = getattr(state, name)
        if not 0 <= value <= MAX_STATE_NUMBER:
            raise ProtocolError(f"'state' {name} {value} is outside [0, 2**53)", "state")
    if not state.stm.is_floating_point() or not bool(torch.isfinite(state.stm).all()):
        raise ProtocolError("'state' holds non-finite STM values", "state")
    conversation_id("state.conversation_id", state.conversation_id)
    return state


# ---------------------------------------------------------------------- the schema
_Check = Callable[[Any, Limits], Any]
_ID: _Check = lambda v, _: conversation_id("conversation_id", v)  # noqa: E731
# op -> {field: (check, required)}; a field sent as nil counts as absent.
SCHEMA: dict[str, dict[str, tuple[_Check, bool]]] = {
    "ping": {},
    "heartbeat": {},
    "open": {"conversation_id": (_ID, False), "memory_init": (lambda v, lim: _text("memory_init", v, lim), False)},
    "interact": {"conversation_id": (_ID, True), "query": (_query, True), "options": (_options, False)},
    "cancel": {"target": (lambda v, _: _int("target", v, 0, MAX_RID), True)},
    "export": {"conversation_id": (_ID, True)},
    "restore": {"state": (lambda v, _: _state(v), True)},
    "close": {"conversation_id": (_ID, True)},
    "delete": {"conversation_id": (_ID, True)},
}


def decode(payload: bytes, limits: Limits) -> dict[Any, Any]:
    """The request map of one frame (ProtocolError if it is too large, not msgpack, or no map)."""
    if len(payload) > limits.max_message_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the limit of {limits.max_message_bytes}")
    try:
        request = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(request, dict):
        raise ProtocolError("a request must be a msgpack map")
    return request


def request_id(request: dict[Any, Any]) -> int | None:
    """The request's ``rid`` if it is a valid one (the reply to a bad request still carries it)."""
    rid = request.get("rid")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_RID:
        return rid
    return None


def validate(request: dict[Any, Any], limits: Limits) -> Request:
    """Check every field of a decoded request; returns it with clean values or raises ProtocolError."""
    if request_id(request) is None:
        raise ProtocolError(f"'rid' must be an integer in [0, {MAX_RID}]", "rid")
    rid: int = request["rid"]
    op = request.get("op")
    schema = SCHEMA.get(op) if isinstance(op, str) else None
    if schema is None:
        raise ProtocolError(f"unknown op {op!r}; ops are {sorted(SCHEMA)}", "op")
    fields: dict[str, Any] = {}
    for name, value in request.items():
        if name in ("op", "rid"):
            continue
        if name not in schema:
            raise ProtocolError(f"unknown field {name!r} for op {op!r}", str(name))
        if value is not None:
            fields[name] = schema[name][0](value, limits)
    for name, (_, required) in schema.items():
        if required and name not in fields:
            raise ProtocolError(f"missing field {name!r}", name)
    return Request(str(op), rid, fields)


# ---------------------------------------------------------------------- errors on the wire
ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        errors.QueryTooLongError,
        errors.InvalidTokenError,
        errors.InvalidOptionError,
        errors.QueueFullError,
        errors.ModelExecutionError,
        errors.EngineClosedError,
        errors.ConversationError,
        errors.StreamOverflowError,
        StaleStateError,
        ConfigError,
        ProtocolError,
        SlowConsumerError,
        TooManyRequestsError,
        ConnectionLost,
        AuthenticationError,
    )
}


def error_payload(exc: BaseException) -> dict[str, Any]:
    """``{"type", "message"}`` (and ``"field"`` for a ProtocolError) of an error reply."""
    payload: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    field = getattr(exc, "field", None)
    if isinstance(field, str):
        payload["field"] = field
    return payload


def error_from_payload(payload: Any) -> Exception:
    """The typed exception of an error reply (``RemoteError`` for a type with no local class)."""
    if not isinstance(payload, dict):
        return RemoteError("RemoteError", repr(payload))
    kind, message = str(payload.get("type")), str(payload.get("message"))
    cls = ERRORS.get(kind)
    field = payload.get("field")
    field = field if isinstance(field, str) else None
    if cls is ProtocolError:
        return ProtocolError(message, field)
    if cls is errors.InvalidOptionError and field is not None:
        return errors.InvalidOptionError(field, message.removeprefix(f"{field}: "))
    try:
        return cls(message) if cls is not None else RemoteError(kind, message)
    except TypeError:  # a class whose constructor wants more than a message
        return RemoteError(kind, message)
