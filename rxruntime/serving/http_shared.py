"""What the HTTP front knows about a conversation besides its memory, kept in Redis for many replicas.

A single-process front keeps a conversation's ``created_at``, ``metadata`` and the turn of its latest
response (what ``previous_response_id`` may continue) in its own table. Behind a load balancer any
replica may get the next request of any conversation, so under Ray these live in one Redis hash per
conversation (``rxrt:conv:<id>``) next to its STM, and every replica reads them from there. Without
this, a conversation created on one replica would be unknown (404) to the others until its first
memory update is stored, and its metadata would differ from replica to replica.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SharedMeta:
    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    last_response_turn: int | None = None
    seed: int | None = None  # the starting STM's seed, for a replica that opens it before any update


class SharedConversations:
    """``conversation_id -> SharedMeta`` in Redis (every call is one round trip and may block)."""

    def __init__(self, client: Any, prefix: str = "rxrt:conv:") -> None:
        self._redis = client
        self._prefix = prefix

    def create(self, conversation_id: str, meta: SharedMeta) -> None:
        mapping: dict[str, Any] = {"created_at": meta.created_at, "metadata": json.dumps(meta.metadata)}
        if meta.seed is not None:
            mapping["seed"] = meta.seed
        self._redis.hset(self._prefix + conversation_id, mapping=mapping)

    def load(self, conversation_id: str) -> SharedMeta | None:
        raw = self._redis.hgetall(self._prefix + conversation_id)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        last, seed = fields.get("last_response_turn"), fields.get("seed")
        return SharedMeta(
            created_at=int(fields.get("created_at", 0)),
            metadata=dict(json.loads(fields.get("metadata", "{}"))),
            last_response_turn=int(last) if last is not None else None,
            seed=int(seed) if seed is not None else None,
        )

    def set_metadata(self, conversation_id: str, metadata: dict[str, str]) -> None:
        self._redis.hset(self._prefix + conversation_id, "metadata", json.dumps(metadata))

    def set_last_response(self, conversation_id: str, turn: int) -> None:
        self._redis.hset(self._prefix + conversation_id, "last_response_turn", turn)

    def delete(self, conversation_id: str) -> None:
        self._redis.delete(self._prefix + conversation_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
