"""Who owns which conversation, for every front: a conversation belongs to the identity that opened it.

Both fronts follow one rule: someone else's conversation is reported exactly like one that does
not exist, so ids cannot be probed. They differ in what an identity is and where ownership is kept.

**zmq** (:class:`Identity`, :class:`Tenants`). With CURVE keys an identity is the client's public
key, and the conversation ids it names live in a namespace of their own (engine id
``<key fingerprint>/<id>``), so ownership survives restarts and reconnects and two clients may
both call a conversation "ada". Without keys an identity is
one connection (its zmq routing id): it owns what it opened or resumed while it lives, and what it
owned becomes claimable again once the server has seen it die.

**HTTP** (:func:`owner_tag`, :func:`new_id`, :func:`owns`). An identity is a bearer key. The
owner is written into the id itself (``conv_`` + a short hash of the key + random hex), so
ownership survives a restart with a persistent store and needs no table; with authentication off
every caller is the same anonymous owner (tag ``""``).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """``owner`` is the CURVE public key (z85) or the connection's routing id; ``namespace`` is
    empty without keys."""

    owner: bytes
    namespace: str = ""

    @classmethod
    def from_key(cls, public_key: str) -> Identity:
        return cls(public_key.encode(), hashlib.sha256(public_key.encode()).hexdigest()[:16])

    @property
    def label(self) -> str:
        """For logs: a short, stable name that does not print a key."""
        return f"key:{self.namespace}" if self.namespace else f"conn:{self.owner.hex()[:12]}"


class Tenants:
    """The ownership table (thread-safe). Entries live until close, delete, or (without keys) the
    owner's death, so its size is bounded by the conversations clients hold open."""

    def __init__(self) -> None:
        self._owners: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def engine_id(identity: Identity, conversation_id: str) -> str:
        return f"{identity.namespace}/{conversation_id}" if identity.namespace else conversation_id

    @staticmethod
    def client_id(identity: Identity, engine_id: str) -> str:
        prefix = f"{identity.namespace}/"
        return engine_id[len(prefix) :] if identity.namespace and engine_id.startswith(prefix) else engine_id

    def owns(self, identity: Identity, engine_id: str) -> bool:
        with self._lock:
            return self._owners.get(engine_id) == identity.owner

    def claim(self, identity: Identity, engine_id: str) -> bool:
        """Take an unowned conversation (or confirm one already ours); False if another owns it."""
        with self._lock:
            owner = self._owners.setdefault(engine_id, identity.owner)
            return owner == identity.owner

    def release(self, engine_id: str) -> None:
        with self._lock:
            self._owners.pop(engine_id, None)

    def release_owner(self, identity: Identity) -> list[str]:
        """Forget everything ``identity`` owned; returns those engine ids."""
        with self._lock:
            ids = [cid for cid, owner in self._owners.items() if owner == identity.owner]
            for cid in ids:
                del self._owners[cid]
            return ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._owners)


# ---------------------------------------------------------------------- HTTP: the owner in the id
_TAG_LEN = 8


def owner_tag(key: str) -> str:
    """The short hash of a bearer key that the ids it creates carry."""
    return hashlib.sha256(key.encode()).hexdigest()[:_TAG_LEN]


def new_id(prefix: str, owner: str) -> str:
    """A fresh id carrying its owner (``conv_3fa1c2d0`` + 24 random hex digits)."""
    return f"{prefix}_{owner}{uuid.uuid4().hex[:24]}"


def owns(owner: str, object_id: str, prefix: str) -> bool:
    """Whether ``object_id`` was issued to ``owner``; with auth off (owner ``""``) every id matches."""
    return object_id.startswith(f"{prefix}_{owner}") and len(object_id) > len(prefix) + 1
