"""The conversations the zmq front serves, each reachable only by its owner (``serving/ownership.py``).

Every operation takes the caller's :class:`Identity` and the id the caller uses; someone else's
conversation raises exactly what an unknown one does. Operations may read the store or wait for
a memory update: call them off the socket thread, one at a time per conversation (the zmq server's
lanes do both).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from rxruntime.conversation import Conversation, ConversationState
from rxruntime.engine import Engine
from rxruntime.errors import ConversationError
from rxruntime.serving.ownership import Identity, Tenants


class OwnedConversations:
    """Open conversation handles by engine id, plus who owns each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tenants = Tenants()
        self._open: dict[str, Conversation] = {}
        self._lock = threading.Lock()

    def unknown(self, cid: str) -> ConversationError:
        return ConversationError(f"unknown conversation {cid!r}; open it first")

    def _exists(self, eid: str) -> bool:
        with self._lock:
            if eid in self._open:
                return True
        return self.engine.store is not None and self.engine.store.get(eid) is not None

    def access(self, identity: Identity, cid: str) -> tuple[str, Conversation]:
        """The caller's conversation, resumed from the store if need be; someone else's (or none)
        raises the same ConversationError."""
        eid = Tenants.engine_id(identity, cid)
        if not self.tenants.owns(identity, eid) and not (self._exists(eid) and self.tenants.claim(identity, eid)):
            raise self.unknown(cid)
        with self._lock:
            conv = self._open.get(eid)
        if conv is None:
            if self.engine.store is None or self.engine.store.get(eid) is None:
                self.tenants.release(eid)
                raise self.unknown(cid)
            conv = self._register(eid, self.engine.conversation(eid))
        return eid, conv

    def _register(self, eid: str, conv: Conversation) -> Conversation:
        with self._lock:
            self._open[eid] = conv
        return conv

    def _forget(self, eid: str) -> None:
        with self._lock:
            self._open.pop(eid, None)
        self.tenants.release(eid)

    def open(self, identity: Identity, cid: str, memory_init: str | None) -> dict[str, Any]:
        eid = Tenants.engine_id(identity, cid)
        if not self.tenants.claim(identity, eid):
            raise ConversationError(f"conversation {cid!r} is held by another connection")
        with self._lock:
            conv = self._open.get(eid)
        if conv is None:
            try:
                conv = self._register(eid, self.engine.conversation(eid, memory_init=memory_init))
            except Exception:
                self.tenants.release(eid)
                raise
        return {"conversation_id": cid, "stm_version": conv.stm_version}

    def export(self, identity: Identity, cid: str) -> dict[str, Any]:
        _, conv = self.access(identity, cid)
        state = dataclasses.replace(conv.export_state(), conversation_id=cid)
        return {"state": state.to_bytes()}

    def restore(self, identity: Identity, state: ConversationState) -> dict[str, Any]:
        """Load a snapshot into the caller's conversation of its id (made if need be; persisted)."""
        cid = state.conversation_id
        eid = Tenants.engine_id(identity, cid)
        state = dataclasses.replace(state, conversation_id=eid)
        with self._lock:
            conv = self._open.get(eid)
        if self.tenants.owns(identity, eid) or (conv is None and self.tenants.claim(identity, eid)):
            if conv is None:
                stored = self.engine.store is not None and self.engine.store.get(eid) is not None
                try:
                    conv = self._register(
                        eid, self.engine.conversation(eid) if stored else self.engine.conversation(eid, state=state)
                    )
                except Exception:
                    self.tenants.release(eid)
                    raise
                if not stored:
                    return {"conversation_id": cid, "stm_version": conv.stm_version}
            conv.load_state(state)
            return {"conversation_id": cid, "stm_version": conv.stm_version}
        raise self.unknown(cid)  # open and owned by someone else: as if it did not exist

    def close(self, identity: Identity, cid: str) -> dict[str, Any]:
        eid, conv = self.access(identity, cid)
        conv.close()
        self._forget(eid)
        return {"conversation_id": cid}

    def delete(self, identity: Identity, cid: str) -> dict[str, Any]:
        eid, conv = self.access(identity, cid)
        conv.delete()  # waits for a memory update already running, then deletes it from the store
        self._forget(eid)
        return {"conversation_id": cid, "deleted": True}
