"""The Reactive Transformer in torch: config, components, the model, sampler, tokenizer, checkpoints.

Import name: ``rxruntime.models`` (the folder sits at the top of the repository and is mapped
into the package, so a user's own ``models`` module never shadows it).
"""

from .checkpoint import load_pretrained, save_pretrained
from .config import (
    DecoderConfig,
    EncoderConfig,
    MemoryAttentionConfig,
    RxTConfig,
    SpecialTokens,
    preset,
)
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    RxTError,
    TokenizerError,
)
from .generation import DecodeBatch, JoinRequest, generate
from .rxt import RxTModel
from .sampler import SamplingParams
from .tokenizer import RxTokenizer

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "CorruptCheckpointError",
    "DecodeBatch",
    "DecoderConfig",
    "EncoderConfig",
    "JoinRequest",
    "MemoryAttentionConfig",
    "MissingCheckpointFileError",
    "RxTConfig",
    "RxTError",
    "RxTModel",
    "RxTokenizer",
    "SamplingParams",
    "SpecialTokens",
    "TokenizerError",
    "generate",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
