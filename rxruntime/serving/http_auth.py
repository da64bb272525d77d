"""API keys: ``Authorization: Bearer KEY`` on every route but ``/health``, and who owns what.

A conversation belongs to the key that created it. The owner is written into the id itself
(``conv_`` + a short hash of the key + random hex), so ownership survives a restart with a
persistent store and needs no table; a key asking for another key's conversation gets the same 404
as for an unknown id, so ids cannot be probed.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from rxruntime.serving.http_errors import unauthorized

_TAG_LEN = 8


class KeyRing:
    """The accepted keys (none: the server is open and every caller is the same anonymous owner)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k for k in (k.strip() for k in keys) if k)

    @classmethod
    def from_file(cls, path: str | Path, extra: Iterable[str] = ()) -> KeyRing:
        """One key per line; blank lines and lines starting with ``#`` are skipped."""
        lines = Path(path).read_text().splitlines()
        return cls([*extra, *(line for line in lines if not line.lstrip().startswith("#"))])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys themselves (to hand to Ray Serve replicas, which check them)."""
        return self._keys

    def authenticate(self, request: Request) -> str:
        """The caller's owner tag; raises a 401 APIError without a valid bearer key."""
        if not self._keys:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        token = token.strip()
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in self._keys):
            raise unauthorized("invalid API key")
        return owner_tag(token)


def owner_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:_TAG_LEN]


def new_id(prefix: str, owner: str) -> str:
    """A fresh id carrying its owner (``conv_3fa1c2d0`` + 24 random hex digits)."""
    return f"{prefix}_{owner}{uuid.uuid4().hex[:24]}"


def owns(owner: str, object_id: str, prefix: str) -> bool:
    """Whether ``object_id`` was issued to ``owner``; with auth off (owner ``""``) every id matches."""
    return object_id.startswith(f"{prefix}_{owner}") and len(object_id) > len(prefix) + 1
