"""Typed errors of the runtime. Each turn that fails also emits ``InteractionFailed`` first.

All derive from :class:`rxruntime.models.errors.RxTError`, so ``except RxTError`` catches every
error rxruntime raises on purpose.
"""

from __future__ import annotations

from rxruntime.models.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    RxTError,
    TokenizerError,
)


class InteractionError(RxTError):
    """A turn could not be completed; the conversation's STM is unchanged."""


class QueryTooLongError(InteractionError, ValueError):
    """The query (with its template tokens) leaves no room for an answer in ``max_seq_len``."""


class InvalidTokenError(InteractionError, TokenizerError):
    """A pre-tokenised query holds ids outside the model's vocabulary."""


class InvalidOptionError(InteractionError, ValueError):
    """An option or argument has the wrong type or is out of range; ``field`` names it.

    Raised before anything is queued: the conversation is untouched and no turn number is used.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelExecutionError(InteractionError):
    """The model raised while decoding or updating memory (the cause is chained)."""


class EngineClosedError(InteractionError):
    """The engine was closed; no new turns are accepted."""


class StreamOverflowError(InteractionError):
    """An async consumer fell ``buffer`` events behind with ``overflow="error"``."""


class QueueFullError(InteractionError):
    """Admission is over its bound (queued turns in the engine or in one conversation, or the
    memory backlog of ``memory_init`` / ``memorize``); nothing was queued, no turn number used.
    Retry later: this is back-pressure, not a fault of the request."""


class ConversationError(RxTError, ValueError):
    """A conversation id is unknown or already taken, or a state snapshot does not fit the model."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversationError",
    "CorruptCheckpointError",
    "EngineClosedError",
    "InteractionError",
    "InvalidOptionError",
    "InvalidTokenError",
    "MissingCheckpointFileError",
    "ModelExecutionError",
    "QueryTooLongError",
    "QueueFullError",
    "RxTError",
    "StreamOverflowError",
    "TokenizerError",
]
