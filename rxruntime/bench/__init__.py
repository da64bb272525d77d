"""Benchmarks behind ``rxrt bench``: the per-token decode rate, the multi-turn comparison of RxT
with a stateless decoder-only baseline, what the asynchronous memory update hides (``overlap``)
and the engine's throughput by number of concurrent conversations (``throughput``); see
docs/benchmarks.md.

Nothing here is imported by the runtime; ``turns`` needs the ``bench`` extra (transformers,
matplotlib), imported only when it runs, and its llama.cpp peer (``gguf_export``,
``llamacpp_runtime``, ``llamacpp_turns``) the ``llamacpp`` extra.
"""

from __future__ import annotations

from .decode import DecodeResult, measure_decode
from .overlap import OverlapConfig, OverlapRecord, run_overlap
from .throughput import ThroughputConfig, run_throughput
from .turns import TurnRecord, TurnsConfig, run_turns

__all__ = [
    "DecodeResult",
    "OverlapConfig",
    "OverlapRecord",
    "ThroughputConfig",
    "TurnRecord",
    "TurnsConfig",
    "measure_decode",
    "run_overlap",
    "run_throughput",
    "run_turns",
]
