"""API keys: ``Authorization: Bearer KEY`` on every route but ``/health``.

A valid key becomes the caller's owner tag; the conversations it creates carry that tag in their
ids (:mod:`rxruntime.serving.ownership`), and another key asking for one gets the same 404 as for
an unknown id.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from rxruntime.serving.http.errors import unauthorized
from rxruntime.serving.ownership import owner_tag


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
