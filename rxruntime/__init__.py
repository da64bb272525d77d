"""rxruntime: serve Reactive Transformer (RxT) models as event streams.

Usage::

    import rxruntime
    engine = rxruntime.load("default")  # the embedded model, a model directory, or a hub id
    conv = engine.conversation()
    conv.interact("Hi, I'm Ada.").subscribe(on_next=print)
    print(conv.ask("What's my name?"))

See docs/api.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rxruntime import _moved, events
from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.errors import (
    ConversationError,
    EngineClosedError,
    InteractionError,
    InvalidOptionError,
    InvalidTokenError,
    ModelExecutionError,
    QueryTooLongError,
    QueueFullError,
    RxTError,
    StreamOverflowError,
)
from rxruntime.events import (
    AnswerCompleted,
    Event,
    InteractionFailed,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
    TokenLogprob,
)
from rxruntime.models.quantize import WeightFormat
from rxruntime.models.sampler import SamplingParams
from rxruntime.snapshot import ConversationState
from rxruntime.stores import STMStore

_moved.install_core()  # rxruntime.mailbox, rxruntime.engine.options, ...: moved, still importable

__version__ = "0.1.0"

DEFAULT_CPU_WEIGHTS: WeightFormat = "int8"
"""The weight format :func:`load` gives a float32 CPU model when ``weights`` is not given, where
:func:`rxruntime.models.weight_format.default_format` allows it (fp32 otherwise)."""


def load(
    model: str | Path = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_batch: int = 64,
    default_sampling: SamplingParams | None = None,
    store: STMStore | None = None,
    weights: str | None = None,
    tokenizer: str | Path | None = None,
    rxlm_version: str | None = None,
    max_memory_batch: int = 32,
    max_resident_bytes: int | None = None,
    store_writers: int = 4,
    keep_float32: bool = False,
) -> Engine:
    """Load a model and start an :class:`Engine` for it.

    ``model``: a model shipped in the package by name (``"default"``, what ``rxrt chat`` opens, or
    ``"small"``, the fast 2.8M model: ``rxruntime.models.checkpoint.SHIPPED_MODELS``), a model
    directory (``config.json`` + ``model.safetensors`` + ``tokenizer.json``; a compact one names
    its pretrained backbone, fetched and merged on load) or a Hugging Face Hub id.
    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32 on the CPU.
    ``default_sampling`` applies to turns that pass no sampling options (default: greedy).
    ``store`` persists every committed STM and resumes stored conversations (``rxruntime.stores``).
    ``tokenizer``: the ``tokenizer.json`` to use when the model directory has none (the file, a
    directory, or a Hub id: RxT-Beta's is published apart from its weights). ``rxlm_version``
    (RxLM checkpoints): the RxLM release whose numbers to reproduce, e.g. ``"0.3.80"``; default
    the newest rxruntime knows of the checkpoint's line (docs/models.md).
    ``weights`` (CPU, float32): how the matrices are stored for decoding, ``"fp32"``, ``"bf16"``
    or ``"int8"`` (one scale per 32 columns): fewer bytes per token read, so faster decoding, at
    a small measured cost in accuracy (docs/benchmarks.md §8). Default: :data:`DEFAULT_CPU_WEIGHTS`
    where the C decode step runs the model and it is not an RxLM checkpoint (those keep the
    reference's numbers), float32 otherwise (:func:`~rxruntime.models.weight_format.default_format`).
    With ``int8`` or ``bf16`` the C step's copies are made here, and the float32 tables of routed
    experts are dropped (RxT-Beta: 10.9 GB; the copies hold the same values, and the torch paths
    unpack experts from them): ``keep_float32=True`` keeps them, for a model to train or save.
    ``max_memory_batch``, ``max_resident_bytes`` and ``store_writers`` go to the :class:`Engine`
    (docs/api.md, "Bounds"); ``rxrt serve`` sets them with the flags of the same names.
    """
    from rxruntime.models.checkpoint import load_pretrained

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    from rxruntime.models.quantize import check_format
    from rxruntime.models.weight_format import default_format, set_weight_format

    fmt = check_format(weights) if weights is not None else None
    if fmt not in (None, "fp32") and (dev.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"weights={fmt!r} is for float32 models on the CPU (got {dev.type}, {dtype})")
    cpu_float32 = dev.type == "cpu" and dtype == torch.float32
    rxt, tok = load_pretrained(
        model, device=dev, dtype=dtype, tokenizer=tokenizer, rxlm_version=rxlm_version, defer_experts=cpu_float32
    )
    assert tok is not None
    if cpu_float32:
        from rxruntime.models import native

        fmt = fmt or default_format(rxt, DEFAULT_CPU_WEIGHTS)
        # the experts' copies made one MoE at a time as the tables are settled: the float32 tables
        # of all layers never exist at once (RxT-Beta: a peak of about half)
        release = fmt != "fp32" and not keep_float32 and native.not_used_reason(rxt) is None
        native.compact_experts(rxt, fmt if release else None)
        set_weight_format(rxt, fmt)
        if rxt.native_decode:
            native.prepare(rxt, release_experts=not keep_float32)
    return Engine(
        rxt,
        tok,
        max_batch=max_batch,
        default_sampling=default_sampling,
        store=store,
        max_memory_batch=max_memory_batch,
        max_resident_bytes=max_resident_bytes,
        store_writers=store_writers,
    )


__all__ = [
    "AnswerCompleted",
    "Conversation",
    "ConversationError",
    "ConversationState",
    "Engine",
    "EngineClosedError",
    "Event",
    "InteractionError",
    "InteractionFailed",
    "InvalidOptionError",
    "InvalidTokenError",
    "MemoryUpdateStarted",
    "MemoryUpdated",
    "ModelExecutionError",
    "QueryReceived",
    "QueryTooLongError",
    "QueueFullError",
    "RxTError",
    "SamplingParams",
    "StreamOverflowError",
    "Token",
    "TokenLogprob",
    "events",
    "load",
]
