"""Typed errors of the model layer.

Every error names what was wrong and where, so a user can fix the input without reading code.
"""

from __future__ import annotations

from pathlib import Path


class RxTError(Exception):
    """Base class of every error rxruntime raises on purpose."""


class ConfigError(RxTError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class CheckpointError(RxTError):
    """A model directory cannot be loaded. ``path`` names the offending file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A file the model directory must contain is absent."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file exists but its bytes are damaged or not what its format promises."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the architecture described by ``config.json``."""


class TokenizerError(RxTError, ValueError):
    """Token ids or a tokenizer file are invalid for this model."""


class UnsupportedCheckpointError(CheckpointError, ConfigError):
    """The checkpoint uses an option rxruntime does not compute (the message names the config
    field and its value); nothing is loaded rather than something else computed."""


class BackboneUnavailableError(MissingCheckpointFileError):
    """A compact model directory names a pretrained backbone (``config.json``'s ``backbone``) that
    is not in the backbone cache and could not be fetched (offline, say). The message says where
    the file was looked for and how to put it there."""
