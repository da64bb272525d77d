"""The measurements behind ``rxrt bench`` and nothing else: the per-token decode rate
(``decode``), the multi-turn comparison of RxT with a stateless decoder-only baseline (``turns``,
``turns_report``; its llama.cpp peer in ``gguf_export``, ``llamacpp_runtime``, ``llamacpp_turns``),
what the asynchronous memory update hides (``overlap``), the engine's throughput by number of
concurrent conversations (``throughput``) and Chat Completions' history replay (``replay``); see
docs/benchmarks.md.

Nothing here is imported by the runtime; ``turns`` needs the ``bench`` extra (transformers,
matplotlib), imported only when it runs, and its llama.cpp peer the ``llamacpp`` extra. Every other
measurement (the soak, the Ray and RxLM comparisons, the scripts that run inside other systems'
environments) lives in the repository's ``benchmarks/``, outside the installed package.
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
