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

Each peer runs in a child process of its own (``multiprocessing``, spawn), and so does llama.cpp's
quantiser: llama.cpp is native code, and a build that crashes (one native build segfaulted on its
first prompt on an AMX CPU) or hangs must not take the benchmark down. The parent sends commands
over a pipe and waits with a timeout; a child that dies or does not answer becomes a
:class:`PeerFailedError` saying how (``crashed (signal 11, SIGSEGV)``, ``timed out after 300 s``),
which ``turns.py`` reports in place of the series while the RxT series run on. Turns are timed
inside the child, so the pipe is not part of any figure.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, Protocol

from .gguf_export import GGUF_TYPES, quantize_gguf, write_gguf

Mode = Literal["cached", "reread"]
MODES: tuple[Mode, ...] = ("cached", "reread")
MODE_LABELS = {"cached": "prompt cache kept", "reread": "history re-read"}
TIMEOUT_S = 300.0
"""Default limit on one command to a peer (one turn, say): far above a turn's time."""
START_TIMEOUT_S = 300.0
"""The least time a child gets to start and load its model (a fresh Python importing torch, on a
busy machine), whatever the per-command limit."""


class PeerModel(Protocol):
    """What a peer drives: :class:`~.llamacpp_runtime.LlamaCppModel`, or a test's stand-in."""

    n_tokens: int

    def clear(self) -> None: ...
    def next_token(self, tokens: list[int]) -> int: ...
    def sequence_state_bytes(self) -> int: ...
    def tensor_bytes(self) -> int: ...
    def close(self) -> None: ...


class PeerFailedError(RuntimeError):
    """A peer's child process crashed, exited, timed out or raised: ``reason`` says which
    (``crashed (signal 11, SIGSEGV)``), ``phase`` when (``at turn 1 of repeat 1``)."""

    def __init__(self, reason: str, phase: str) -> None:
        super().__init__(f"{reason} {phase}")
        self.reason = reason
        self.phase = phase


@dataclass
class PeerSession:
    """One conversation's bookkeeping around a model, run inside the child process."""

    mode: Mode
    model: PeerModel
    eos_id: int
    pending: list[int] = field(default_factory=list)
    """``cached`` mode: tokens of the history not yet in the KV cache (decoded with the next query)."""

    def start_conversation(self) -> None:
        """A new conversation: an empty KV cache (untimed, like creating a server slot)."""
        self.model.clear()
        self.pending = []

    def turn(self, history: list[int], prompt: list[int], answer_tokens: int) -> tuple[float, float, list[int]]:
        """One turn: ``(ttft_s, turn_s, answer)``. ``history`` is every earlier turn's tokens
        (what the re-reading mode prefills); the cached mode ignores it and keeps its own cache,
        then remembers what the cache lacks: the answer's last token (sampled, never decoded) and EOS."""
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
        if self.mode == "cached":
            self.pending = [answer[-1], self.eos_id]
        return ttft, turn, answer

    def state(self) -> dict[str, int]:
        """The KV cache this conversation holds (``llama_state_seq_get_size``) and its tokens."""
        return {"state_bytes": self.model.sequence_state_bytes(), "cached_tokens": self.model.n_tokens}


def _serve(conn: Connection, factory: Callable[..., PeerModel], kwargs: dict[str, Any], mode: Mode, eos: int) -> None:
    """The child's loop: build the model, answer ``(command, args)`` until ``close``. A Python
    error goes back as ``("error", text)``; a crash in native code closes the pipe."""
    try:
        model = factory(**kwargs)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    session = PeerSession(mode, model, eos)
    conn.send(("ok", {"tensor_bytes": model.tensor_bytes()}))
    commands: dict[str, Callable[..., Any]] = {
        "start": session.start_conversation,
        "turn": session.turn,
        "state": session.state,
    }
    while True:
        try:
            command, args = conn.recv()
        except EOFError:  # the parent is gone or gave up on this peer
            command = "close"
        if command == "close":
            model.close()
            with contextlib.suppress(OSError):
                conn.send(("ok", None))
            return
        try:
            conn.send(("ok", commands[command](*args)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _call_once(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A one-shot child: ``fn(*args)``, its result (or error) sent back."""
    try:
        conn.send(("ok", fn(*args)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Child:
    """A spawned process and its end of the pipe; :meth:`request` waits with a timeout and turns a
    dead or silent child into :class:`PeerFailedError`."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()  # so the parent sees EOF when the child dies

    def request(self, message: tuple[str, tuple[Any, ...]] | None, timeout_s: float, phase: str) -> Any:
        """Send ``message`` (None: only wait for the child's next answer) and return the answer."""
        try:
            if message is not None:
                self.conn.send(message)
            if not self.conn.poll(timeout_s):
                self.kill()
                raise PeerFailedError(f"timed out after {timeout_s:g} s", phase)
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise PeerFailedError(self._death(), phase) from None
        if status == "error":
            self.kill()
            raise PeerFailedError(f"failed ({value})", phase)
        return value

    def _death(self) -> str:
        """How the child ended, once its pipe closed."""
        self.process.join(10)
        code = self.process.exitcode
        if code is None:
            self.kill()
            return "stopped answering"
        if code < 0:
            try:
                name = f", {signal.Signals(-code).name}"
            except ValueError:
                name = ""
            return f"crashed (signal {-code}{name})"
        return f"exited with code {code}"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


def run_in_child(fn: Callable[..., Any], *args: Any, timeout_s: float = START_TIMEOUT_S, phase: str = "") -> Any:
    """``fn(*args)`` in a spawned child process (``fn`` importable by name); PeerFailedError if
    it crashes, exits, raises or outlasts ``timeout_s``."""
    child = _Child(_call_once, (fn, args))
    try:
        return child.request(None, timeout_s, phase)
    finally:
        child.kill()


class LlamaCppPeer:
    """One llama.cpp series of the benchmark, a GGUF type in one mode, in its own child process.

    ``factory(**kwargs)`` builds the model in the child (:class:`~.llamacpp_runtime.LlamaCppModel`
    for the real peer). Every method raises :class:`PeerFailedError` once the child crashed, exited
    or timed out; :attr:`failure` then keeps the first such error.
    """

    def __init__(
        self,
        gguf_type: str,
        mode: Mode,
        factory: Callable[..., PeerModel],
        kwargs: dict[str, Any],
        *,
        eos_id: int,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.gguf_type = gguf_type
        self.mode: Mode = mode
        self.timeout_s = timeout_s
        self.failure: PeerFailedError | None = None
        self.tensor_bytes: int | None = None
        self._child = _Child(_serve, (factory, kwargs, mode, eos_id))

    @property
    def key(self) -> str:
        """The series' key in the JSON, e.g. ``llamacpp_q8_0_cached``."""
        return f"llamacpp_{self.gguf_type}_{self.mode}"

    @property
    def label(self) -> str:
        return f"llama.cpp {self.gguf_type}, {MODE_LABELS[self.mode]}"

    def wait_loaded(self) -> None:
        """Wait for the child to load its model (the first answer it sends)."""
        limit = max(self.timeout_s, START_TIMEOUT_S)
        self.tensor_bytes = self._request(None, "while loading the model", limit)["tensor_bytes"]

    def start_conversation(self, phase: str = "") -> None:
        """A new conversation: an empty KV cache (untimed, like creating a server slot)."""
        self._request(("start", ()), phase)

    def turn(
        self, history: list[int], prompt: list[int], answer_tokens: int, phase: str = ""
    ) -> tuple[float, float, list[int]]:
        """One turn, ``(ttft_s, turn_s, answer)`` as timed in the child (see :meth:`PeerSession.turn`)."""
        ttft, turn, answer = self._request(("turn", (history, prompt, answer_tokens)), phase)
        return float(ttft), float(turn), list(answer)

    def state(self) -> dict[str, int]:
        """The conversation's KV cache in bytes and tokens (:meth:`PeerSession.state`)."""
        return dict(self._request(("state", ()), "reading the KV cache size"))

    def describe_failure(self) -> str:
        """``llama.cpp q8_0, prompt cache kept: crashed (signal 11, SIGSEGV) at turn 1 of repeat 1``."""
        assert self.failure is not None
        return f"{self.label}: {self.failure}"

    def close(self) -> None:
        """Free the model and end the child (idempotent; a failed child is already gone)."""
        if self.failure is None and self._child.process.is_alive():
            with contextlib.suppress(PeerFailedError):
                self._child.request(("close", ()), 30, "while closing")
        self._child.kill()

    def _request(self, message: tuple[str, tuple[Any, ...]] | None, phase: str, limit: float | None = None) -> Any:
        if self.failure is not None:
            raise self.failure
        try:
            return self._child.request(message, limit or self.timeout_s, phase)
        except PeerFailedError as exc:
            self.failure = exc
            raise


def check_types(types: Sequence[str]) -> list[str]:
    """``types`` validated against :data:`GGUF_TYPES` (ValueError naming the choices)."""
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad or not types:
        raise ValueError(f"llama.cpp types must be among {', '.join(GGUF_TYPES)}, got {', '.join(types) or 'none'}")
    return list(dict.fromkeys(types))


def llama_cpp_facts() -> dict[str, str]:
    """llama-cpp-python's version and llama.cpp's system info (run in a child: it loads the library)."""
    from .llamacpp_runtime import import_llama_cpp

    llama_cpp = import_llama_cpp()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llamacpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


def prepare_peers(
    llama: Any,
    types: Sequence[str],
    *,
    n_ctx: int,
    threads: int,
    special_ids: dict[str, int],
    workdir: str | Path,
    timeout_s: float = TIMEOUT_S,
) -> tuple[list[LlamaCppPeer], dict[str, Any], dict[str, str]]:
    """Export ``llama`` to GGUF (f32, then llama.cpp's quantiser for the other ``types``, each in
    a child process) in ``workdir`` (kept while the models run: llama.cpp maps the files) and
    start one child per type and mode, each loading its model.

    ``n_batch`` is ``n_ctx``, so the longest prefill is one ``llama_decode`` call. Returns the
    peers that loaded, facts for the JSON ``config`` (versions, file and tensor sizes), and for
    every series that could not start (a crashed quantiser or load) what happened, by key.
    """
    from .llamacpp_runtime import LlamaCppModel

    types = check_types(types)
    folder = Path(workdir)
    failed: dict[str, str] = {}
    info: dict[str, Any] = {
        "llamacpp_n_ctx": n_ctx,
        "llamacpp_n_batch": n_ctx,
        "llamacpp_threads": threads,
        "llamacpp_kv_cache": "f16, flash attention auto (llama.cpp's defaults)",
        "llamacpp_extra_buffer_types": "off (AMX, repacked layouts: llama.cpp's AMX q8_0 matmul segfaulted on an "
        "AMX CPU with llama-cpp-python 0.3.36)",
        "llamacpp_process": "one child process per series (spawn); a crash or a timeout is reported, not fatal",
        "llamacpp_timeout_s": timeout_s,
        "llamacpp_file_bytes": {},
        "llamacpp_tensor_bytes": {},
    }
    labels = {f"llamacpp_{t}_{m}": f"llama.cpp {t}, {MODE_LABELS[m]}" for t in types for m in MODES}

    def fail(gguf_type: str, exc: PeerFailedError) -> None:
        for mode in MODES:
            key = f"llamacpp_{gguf_type}_{mode}"
            failed[key] = f"{labels[key]}: {exc}"

    try:
        limit = max(timeout_s, START_TIMEOUT_S)
        info.update(run_in_child(llama_cpp_facts, timeout_s=limit, phase="while loading llama.cpp"))
    except PeerFailedError as exc:
        for t in types:
            fail(t, exc)
        return [], info, failed
    f32 = write_gguf(llama, folder / "baseline-f32.gguf", special_ids)
    files = {"f32": f32}
    for t in types:
        if t != "f32":
            try:
                files[t] = run_in_child(
                    quantize_gguf, f32, folder / f"baseline-{t}.gguf", t, threads,
                    timeout_s=limit, phase=f"while quantising to {t}",
                )  # fmt: skip
            except PeerFailedError as exc:
                fail(t, exc)
    peers: list[LlamaCppPeer] = []
    kwargs = {"n_ctx": n_ctx, "n_batch": n_ctx, "n_threads": threads}
    eos = special_ids.get("eos", 0)
    for t in [t for t in types if t in files]:
        for mode in MODES:
            path = {"path": files[t], **kwargs}
            peers.append(LlamaCppPeer(t, mode, LlamaCppModel, path, eos_id=eos, timeout_s=timeout_s))
        info["llamacpp_file_bytes"][t] = files[t].stat().st_size
    loaded = []
    for peer in peers:  # the children load in parallel; wait for each in turn
        try:
            peer.wait_loaded()
            info["llamacpp_tensor_bytes"][peer.gguf_type] = peer.tensor_bytes
            loaded.append(peer)
        except PeerFailedError:
            failed[peer.key] = peer.describe_failure()
            peer.close()
    return loaded, info, failed
