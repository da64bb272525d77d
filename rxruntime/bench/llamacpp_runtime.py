"""A thin driver of llama.cpp (through ``llama-cpp-python``'s C bindings) for token-id benchmarks.

``llama_cpp.Llama`` (the high-level class) keeps logits only with ``logits_all`` and samples in
C with its own chain; the turn benchmark needs neither. It feeds token ids, takes the argmax of
the last position's logits on the host (as transformers' baseline does) and decides itself when
the KV cache is kept or cleared. So this wraps the C API directly: one model, one context, one
sequence.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rxruntime.models.errors import ConfigError

INSTALL_HINT = "pip install 'rxruntime[llamacpp]'"


class LlamaCppUnavailableError(ConfigError):
    """``llama-cpp-python`` is not installed (it compiles llama.cpp, so it is an opt-in extra)."""


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, its own log chatter silenced; :class:`LlamaCppUnavailableError` naming
    the extra to install when it is missing."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppUnavailableError(
            f"the llama.cpp baseline needs llama-cpp-python (it compiles llama.cpp): {INSTALL_HINT} ({exc})"
        ) from None
    global _log_callback
    if _log_callback is None:
        # llama.cpp logs every load to stderr (and warns about the placeholder vocabulary); keep errors.
        _log_callback = llama_cpp.llama_log_callback(_errors_only)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


def check_llama_cpp() -> None:
    """:class:`LlamaCppUnavailableError` naming the extra when ``llama-cpp-python`` is missing,
    without loading llama.cpp into this process (the benchmark runs it in child processes)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppUnavailableError(
            f"the llama.cpp baseline needs llama-cpp-python (it compiles llama.cpp): {INSTALL_HINT}"
        )


_log_callback: Any = None
"""The ctypes callback given to ``llama_log_set``, kept alive here for as long as llama.cpp may call it."""
_last_level = 0


def _errors_only(level: int, text: bytes, user_data: object) -> None:
    """llama.cpp's log to stderr, errors only (ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5
    continues the previous line)."""
    global _last_level
    if level != 5:
        _last_level = level
    if _last_level == 4:
        sys.stderr.write(text.decode("utf-8", "replace"))


class LlamaCppModel:
    """One GGUF model and one context of ``n_ctx`` positions holding one sequence (id 0).

    ``n_batch`` (also the micro-batch) should cover the longest prefill, so a prefill is one
    ``llama_decode`` call as in llama.cpp's server. ``kv_type`` ``"f16"`` and ``flash_attn`` None
    (llama.cpp's "auto", which turns it on for the CPU) are llama.cpp's defaults, what a user gets;
    both round activations to f16 (about 1e-3 of the logits), so an exact comparison with another
    float32 implementation takes ``kv_type="f32", flash_attn=False`` (then about 1e-6).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
    ) -> None:
        self._lib = lib = import_llama_cpp()
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # No "extra" CPU buffer types (AMX, repacked layouts): on this AMX-capable VM llama.cpp's
        # AMX q8_0 matmul segfaults in llama_decode (llama-cpp-python 0.3.36, any shape tried).
        model_params.use_extra_bufts = False
        self._model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load {path}")
        kv = {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32}[kv_type]
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.type_k = params.type_v = kv
        params.no_perf = True
        if flash_attn is not None:
            params.flash_attn_type = int(flash_attn)  # default: llama.cpp's "auto" (on for the CPU)
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise ConfigError(f"llama.cpp could not create a {n_ctx}-token context for {path}")
        self.n_ctx = lib.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self.n_tokens = 0
        """Positions in the KV cache (the tokens decoded since the last :meth:`clear`)."""

    def clear(self) -> None:
        """Drop the KV cache: the next :meth:`decode` starts at position 0."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self.n_tokens = 0

    def decode(self, tokens: list[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Append ``tokens`` to the sequence (one ``llama_decode`` per ``n_batch``); the logits of
        the last one, a view into llama.cpp's buffer valid until the next call."""
        if not tokens:
            raise ValueError("decode needs at least one token")
        if self.n_tokens + len(tokens) > self.n_ctx:
            raise ConfigError(f"{self.n_tokens + len(tokens)} tokens exceed the {self.n_ctx}-token context")
        lib = self._lib
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            array = (lib.llama_token * len(chunk))(*chunk)
            # llama_batch_get_one: positions continue from the sequence's cache, logits for the last
            code = lib.llama_decode(self._ctx, lib.llama_batch_get_one(array, len(chunk)))
            if code != 0:
                raise RuntimeError(f"llama_decode failed with code {code}")
            self.n_tokens += len(chunk)
        logits = lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def next_token(self, tokens: list[int]) -> int:
        """Greedy: the argmax of the logits after ``tokens``."""
        return int(np.argmax(self.decode(tokens)))

    def sequence_state_bytes(self) -> int:
        """Bytes of ``llama_state_seq_get_size`` for sequence 0: the KV cache cells the sequence
        holds (K and V of every layer, in the cache's type) plus a small header, i.e. what saving
        this conversation's state would take; not the context's reserved ``n_ctx`` cells."""
        return int(self._lib.llama_state_seq_get_size(self._ctx, 0))

    def tensor_bytes(self) -> int:
        """Bytes of the model's tensors as loaded (``llama_model_size``)."""
        return int(self._lib.llama_model_size(self._model))

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
