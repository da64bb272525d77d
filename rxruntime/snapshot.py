"""The snapshot format: a conversation's memory as bytes, the unit every store keeps.

A :class:`ConversationState` is the STM of one conversation (on the CPU) with where it stands: its
turn count, its version (+1 per committed memory update) and the fingerprint of the model that
wrote it. It serialises to one safetensors blob (never pickled), so a snapshot written by one
process, machine or release can be read, and refused with a clear error if it does not fit, by
another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from rxruntime.errors import ConversationError
from rxruntime.models.config import SAMPLING_DEFAULTS, RxTConfig, non_default_fields

_STATE_FORMAT = "rxruntime.conversation-state/1"
# Versions and turn counts must stay exact in every store (Redis compares them as doubles) with
# room to grow, so a snapshot's counters may not exceed this.
MAX_COUNTER = 2**52


def config_fingerprint(config: RxTConfig) -> str:
    """Identifies the model a snapshot belongs to (a different model cannot read it).

    Only the fields that differ from their defaults are hashed, so a release that adds a config
    field (with a default that keeps the old behaviour) does not orphan every stored memory."""
    fields = non_default_fields(config, skip=SAMPLING_DEFAULTS)  # how a turn samples is not which model
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConversationState:
    """A snapshot of a conversation's memory: the STM (L, S, D) on the CPU and where it stands."""

    conversation_id: str
    turn: int
    stm_version: int
    stm: Tensor
    config_fingerprint: str

    def check_fits(self, config: RxTConfig) -> None:
        """Refuse a snapshot this model cannot use or a store cannot hold (ConversationError)."""
        if not isinstance(self.stm, Tensor):
            raise ConversationError("the STM snapshot holds no tensor")
        expected = (config.num_layers, config.stm_size, config.dim)
        if tuple(self.stm.shape) != expected:
            raise ConversationError(f"STM snapshot has shape {tuple(self.stm.shape)}, this model needs {expected}")
        if self.config_fingerprint != config_fingerprint(config):
            raise ConversationError(
                "the STM snapshot was taken with a different model configuration; it cannot be restored here"
            )
        if not self.stm.dtype.is_floating_point:
            raise ConversationError(f"the STM snapshot holds {self.stm.dtype} values, not floating point")
        if not bool(torch.isfinite(self.stm).all()):
            raise ConversationError("the STM snapshot holds NaN or infinite values")
        for name in ("stm_version", "turn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
                raise ConversationError(f"the snapshot's {name} {value!r} is not an integer in [0, 2**52]")
        if not isinstance(self.conversation_id, str) or not self.conversation_id:
            raise ConversationError("the snapshot's conversation_id must be a non-empty string")

    def to_bytes(self) -> bytes:
        meta = {
            "format": _STATE_FORMAT,
            "conversation_id": self.conversation_id,
            "turn": str(self.turn),
            "stm_version": str(self.stm_version),
            "config_fingerprint": self.config_fingerprint,
        }
        return bytes(st_save({"stm": self.stm.contiguous()}, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> ConversationState:
        try:
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
            tensors = st_load(data)
        except Exception as exc:
            raise ConversationError(f"not a conversation state snapshot ({exc})") from exc
        if meta.get("format") != _STATE_FORMAT or "stm" not in tensors:
            raise ConversationError("not a conversation state snapshot (wrong format tag)")
        try:
            return cls(
                conversation_id=str(meta["conversation_id"]),
                turn=int(meta["turn"]),
                stm_version=int(meta["stm_version"]),
                stm=tensors["stm"],
                config_fingerprint=str(meta["config_fingerprint"]),
            )
        except (KeyError, ValueError) as exc:
            raise ConversationError(f"not a conversation state snapshot (bad metadata: {exc})") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ConversationState:
        path = Path(path)
        if not path.is_file():
            raise ConversationError(f"{path}: no such state file")
        try:
            return cls.from_bytes(path.read_bytes())
        except ConversationError as exc:
            raise ConversationError(f"{path}: {exc}") from exc


__all__ = ["MAX_COUNTER", "ConversationState", "config_fingerprint"]
