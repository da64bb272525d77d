"""llama.cpp as a peer in the turn benchmark: the baseline Llama as GGUF, in the two ways a CPU
user runs a chat through llama.cpp.

* **prompt cache kept** (``cached``): one context per conversation keeps its KV cache between
  turns, as llama.cpp's server does with prompt caching; a turn evaluates only what the cache
  lacks: the previous answer's last token and the end-of-answer token (the answer's other tokens
  entered the cache as they were generated) and the new query.
* **history re-read** (``reread``): the KV cache cleared, the whole history plus the query
  prefilled every turn, the protocol of the transformers baseline.

Both decode greedily from the argmax of the last position's logits, read each token back on the
host, and force the answer length (EOS ignored), like the other systems of ``rxrt bench turns``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .gguf_export import GGUF_TYPES, quantize_gguf, write_gguf
from .llamacpp_runtime import LlamaCppModel, import_llama_cpp

Mode = Literal["cached", "reread"]
MODES: tuple[Mode, ...] = ("cached", "reread")
MODE_LABELS = {"cached": "prompt cache kept", "reread": "history re-read"}


@dataclass
class LlamaCppPeer:
    """One llama.cpp series of the benchmark: a GGUF type in one mode, with its own context."""

    gguf_type: str
    mode: Mode
    model: LlamaCppModel
    pending: list[int] = field(default_factory=list)
    """``cached`` mode: tokens of the history not yet in the KV cache (decoded with the next query)."""

    @property
    def key(self) -> str:
        """The series' key in the JSON, e.g. ``llamacpp_q8_0_cached``."""
        return f"llamacpp_{self.gguf_type}_{self.mode}"

    @property
    def label(self) -> str:
        return f"llama.cpp {self.gguf_type}, {MODE_LABELS[self.mode]}"

    def start_conversation(self) -> None:
        """A new conversation: an empty KV cache (untimed, like creating a server slot)."""
        self.model.clear()
        self.pending = []

    def turn(self, history: list[int], prompt: list[int], answer_tokens: int) -> tuple[float, float, list[int]]:
        """One turn: ``(ttft_s, turn_s, answer)``. ``history`` is every earlier turn's tokens
        (what the re-reading mode prefills); the cached mode ignores it and keeps its own cache."""
        if self.mode == "reread":
            self.model.clear()
            first = [*history, *prompt]
        else:
            first = [*self.pending, *prompt]
        lm = self.model
        start = time.perf_counter()
        token = lm.next_token(first)
        answer = [token]
        ttft = time.perf_counter() - start
        for _ in range(answer_tokens - 1):
            token = lm.next_token([token])
            answer.append(token)
        turn = time.perf_counter() - start
        return ttft, turn, answer

    def end_turn(self, answer: list[int], eos_id: int) -> None:
        """Remember what the cache lacks: the answer's last token (sampled, never decoded) and EOS."""
        if self.mode == "cached":
            self.pending = [answer[-1], eos_id]


def check_types(types: Sequence[str]) -> list[str]:
    """``types`` validated against :data:`GGUF_TYPES` (ValueError naming the choices)."""
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad or not types:
        raise ValueError(f"llama.cpp types must be among {', '.join(GGUF_TYPES)}, got {', '.join(types) or 'none'}")
    return list(dict.fromkeys(types))


def prepare_peers(
    llama: Any,
    types: Sequence[str],
    *,
    n_ctx: int,
    threads: int,
    special_ids: dict[str, int],
    workdir: str | Path,
) -> tuple[list[LlamaCppPeer], dict[str, Any]]:
    """Export ``llama`` to GGUF (f32, then llama.cpp's quantiser for the other ``types``) in
    ``workdir`` (kept while the models run: llama.cpp maps the files) and load one context per
    type and mode.

    ``n_batch`` is ``n_ctx``, so the longest prefill is one ``llama_decode`` call. Returns the
    peers and facts for the JSON ``config`` (versions, file and tensor sizes).
    """
    llama_cpp = import_llama_cpp()
    types = check_types(types)
    folder = Path(workdir)
    f32 = write_gguf(llama, folder / "baseline-f32.gguf", special_ids)
    files = {"f32": f32}
    for t in types:
        if t != "f32":
            files[t] = quantize_gguf(f32, folder / f"baseline-{t}.gguf", t, threads)
    peers: list[LlamaCppPeer] = []
    info: dict[str, Any] = {
        "llama_cpp_python": llama_cpp.__version__,
        "llamacpp_n_ctx": n_ctx,
        "llamacpp_n_batch": n_ctx,
        "llamacpp_threads": threads,
        "llamacpp_kv_cache": "f16, flash attention auto (llama.cpp's defaults)",
        "llamacpp_extra_buffer_types": "off (AMX, repacked layouts: llama.cpp's AMX q8_0 matmul segfaulted on an "
        "AMX CPU with llama-cpp-python 0.3.36)",
        "llamacpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "llamacpp_file_bytes": {},
        "llamacpp_tensor_bytes": {},
    }
    for t in types:
        for mode in MODES:
            model = LlamaCppModel(files[t], n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads)
            peers.append(LlamaCppPeer(t, mode, model))
        info["llamacpp_file_bytes"][t] = files[t].stat().st_size
        info["llamacpp_tensor_bytes"][t] = peers[-1].model.tensor_bytes()
    return peers, info
