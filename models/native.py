"""The decode step in C for CPUs: build ``csrc/decode_step.c`` once, bind it, check the layouts.

A batch-1 decode step on a CPU is bound by reading weights, and eager torch reads them on about
one core's bandwidth (its one-row products do not spread over threads) while dispatching ~300
small operations. The C step does the whole decoder step in one call and splits every large read
across the threads, so all cores stream weights at once (docs/benchmarks.md §5 has the numbers).
It is an optional fast path, like flash-attn on a GPU: it is used only when

* a C compiler with OpenMP is present (``$CC``, else ``cc``) and ``RXRT_NATIVE`` is not ``0``;
* the model is float32 on the CPU, in decode layout, with at most :func:`max_rows` rows a step;
* the cache and memory keys/values have the layouts the C code indexes.

Otherwise :meth:`RxTModel.decode_step` runs the torch step, which computes the same function
(tests/test_native.py compares them). The shared library is compiled with ``-march=native``
into ``$RXRT_CACHE_DIR`` (default ``~/.cache/rxruntime``), keyed by the source, the compiler
and the CPU, and linked against the OpenMP runtime torch already loaded, so the C step and torch
share one thread pool instead of two pools spinning against each other on the same cores. A call
is one OpenMP region whose thread 0 hands the step's parts to the others itself (decode_step.c's
``Team``): libgomp stops spinning and sleeps between regions whenever the process holds more
OpenMP threads than CPUs, as every engine does, and a region per product then cost RxT-Beta's
step half its speed in the engine (docs/benchmarks.md §9).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from . import openmp
from .cache import KVCache
from .config import RxTConfig
from .decoder import RxTDecoder
from .ffn import ACTIVATIONS, SwiGLU
from .moe import MoE
from .quantize import BLOCK, WeightFormat, q4_enabled, quantize_int8, round_to_format


class StepModel(Protocol):
    """What the C step reads of a model: an :class:`~.rxt.RxTModel`, named here by the parts
    this module uses rather than imported, because ``rxt.py`` calls this module (its decode step
    and prefill take the C path when it applies) and the model floor sits above this one."""

    config: RxTConfig
    decoder: RxTDecoder
    weight_format: WeightFormat
    native_decode: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def use_decode_layout(self) -> None: ...


_ROPE_MODES = {"half": 0, "adjacent": 1, "adjacent-split": 2}

MAX_ROWS = 16
"""Rows per step up to which the C step runs row by row (bf16; int8 and float32 with one row per
pass; with the multi-row kernels: :data:`MULTI_ROW_MAX_ROWS`). Beyond it torch's matrix products,
which reuse each weight across rows from cache, win (alpha-mini, 2 cores: 1.3x faster at 16
rows, 0.93x at 32)."""

PREFILL_CHUNK = 64
"""Prompt tokens per C-step call in :meth:`NativeDecoder.prefill` (each call reads the weights
once); float32 models take :data:`FP32_PREFILL_CHUNK`."""

FP32_PREFILL_CHUNK = 256
""":data:`PREFILL_CHUNK` for a float32 model: an expert's float32 product takes all the chunk's
rows that chose it (up to 64) at once, and a 64-token chunk sent it about 10 (alpha-mini, top 6
of 36). RxLM's alpha-mini weights, 2 threads, wall time, AMD EPYC Zen 3 (``benchmarks/int8_rows.py
--checkpoint DIR --weights fp32 --threads 2 --join K --chunks 64``): 8 prompts of 32 tokens 153 ms
against 207 in chunks of 64 (torch 201), 12 prompts 254 against 324 (torch 295)."""

PREFILL_MAX_TOKENS = 64
"""Int8 prefills of up to this many tokens (all prompts of a join together) run in C row by row
(:data:`INT8_PREFILL_MAX_TOKENS` with the multi-row kernel), longer ones in torch: row by row,
torch's batched products win once the weights are reused enough (int8 alpha-mini, 2 threads:
one 35-token prompt 35 ms against torch's 60; 120 tokens 108 against 111; four 35-token prompts
135 against 122)."""

MULTI_ROW_MAX_ROWS = 64
"""The row limit of an int8 or float32 model whose C step runs the multi-row kernels
(:data:`ROWS_PER_PASS` > 1), in place of :data:`MAX_ROWS`: each weight block is applied to 8
rows from registers (float32: 8 rows over 32 columns with AVX-512, 4 over 16 with AVX2, the
weight tile held in L1 and the next one prefetched), and
the C step decodes 64 rows 2.8x faster than torch in int8 and 1.5x in float32 (alpha-mini, one
thread, CPU time: docs/benchmarks.md §7 and §8)."""

INT8_PREFILL_MAX_TOKENS = 512
"""The same for :data:`PREFILL_MAX_TOKENS`: prefills up to this many tokens run in C (a 256-token
prompt as fast as torch's float32 products, a 35-token one 2.8x faster)."""

FP32_PREFILL_MAX_TOKENS = 384
"""The same for a float32 model: joins of up to this many prompt tokens run in C, in chunks of
:data:`FP32_PREFILL_CHUNK`; beyond it torch's products, whose efficiency grows with the rows each
expert gets, catch up. The measurement of :data:`FP32_PREFILL_CHUNK`, C against torch: 8 x 32
tokens 153 against 201 ms, 12 x 32 254 against 295, 16 x 32 313 against 314, 24 x 32 475 against
397; one prompt of 210 tokens 133 against 179 (random alpha-mini weights). With chunks of 64 the
limit was 128 (docs/benchmarks.md §7)."""

ROWS_PER_PASS = 8
"""Activation rows the int8 and float32 kernels apply each weight block to in one pass (decode_step.c's
multi-row kernel; ROWS_MAX = 8 at most): a prefill chunk, a decode batch of several
conversations and the rows that chose one expert read each weight once per this many rows, not
once per row. ``RXRT_NATIVE_ROWS`` overrides it for the process, :func:`set_rows_per_pass` for
one model; 1 is the step as it was before (row by row, one (row, expert) pair at a time, and
the row limits :data:`MAX_ROWS` and :data:`PREFILL_MAX_TOKENS`), kept for side-by-side
benchmarks (``rxrt bench turns --weights int8,int8-rowwise``)."""

ROWS_MAX = 8
"""decode_step.c's ROWS_MAX: the most rows per pass it takes."""

COMPACT_MEMORY_MIN_SLOTS = 1024
"""From this many STM slots on, a model with bf16 or int8 weights reads the memory keys/values in
bf16 copies (refreshed when a join or leave writes them): a step reads all of them for every
token, which at RxT-Beta's size (21 layers x 4,096 slots x 4 key/value heads of 32, twice) is
88 MB in float32, almost half the bytes of its int8 active weights (190M). Smaller memories stay
float32 (they cost little to read, and the bf16 step then equals the torch step);
tests/test_native_layouts.py measures the error the rounding adds."""

_SOURCE = Path(__file__).with_name("csrc") / "decode_step.c"
_P = ctypes.c_void_p
_WEIGHT_TYPES = {"fp32": 0, "bf16": 1, "int8": 2, "fp32-t": 3, "q4": 4}
_ACTIVATIONS = {"silu": 1, "gelu": 2, "relu": 3, "sigmoid": 4, "tanh": 5, "identity": 6}
"""decode_step.c's enum Act, by the names of models/ffn.py's ACTIVATIONS (0: no gate)."""


class _Mat(ctypes.Structure):
    """A weight matrix as the C step reads it: data, row stride (int8: padded columns), format,
    and (int8) the rows per segment that blocks restart at."""

    _fields_ = [("w", _P), ("ld", ctypes.c_int64), ("type", ctypes.c_int64), ("seg", ctypes.c_int64)]


class _Ffn(ctypes.Structure):
    """A dense feed-forward (a dense layer's, or one shared expert's), gated or not."""

    _fields_ = [
        ("w_in", _Mat), ("w_out", _Mat), ("b_in", _P), ("b_out", _P), ("hidden", ctypes.c_int64),
        ("gated", ctypes.c_int64),
    ]  # fmt: skip


_MATS = ["qkv", "o", "gate", "cq", "co", "cgate", "w_in", "w_out"]
_VECTORS = ["self_norm", "qkv_bias", "o_bias", "gate_bias", "cross_norm", "cq_bias", "co_bias", "cgate_bias"]
_VECTORS += ["ffn_norm", "router", "self_norm_bias", "cross_norm_bias", "ffn_norm_bias", "b_in", "b_out"]
_VECTORS += ["global_bias"]


class _Layer(ctypes.Structure):
    """One decoder layer as decode_step.c's RxtLayer describes it: which sub-blocks it has
    (memory cross-attention, gates, an MoE or a dense feed-forward, shared experts) and their
    weights."""

    _fields_ = [
        *[(name, _Mat) for name in _MATS],
        *[(name, _P) for name in _VECTORS],
        ("shared", ctypes.POINTER(_Ffn)),
        ("shared_gate", _P),
        ("shared_bias", _P),
        ("dense", _Ffn),
        *[(name, ctypes.c_int64) for name in ["n_shared", "gate_act", "cgate_act", "act", "gated"]],
        ("routed_scale", ctypes.c_float),
        ("shared_scale", ctypes.c_float),
        *[(name, _P) for name in ["k_cache", "v_cache", "mem_k", "mem_v"]],
        ("router_bf16", _P),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *[
            (name, ctypes.c_int64)
            for name in [
                "n_layers",
                "dim",
                "head_dim",
                "hq",
                "hkv",
                "cq",
                "ckv",
                "n_experts",
                "top_k",
                "hidden",
                "vocab",
                "max_len",
                "stm",
                "n_positions",
                "cache_row",
                "mem_row",
                "n_rows",
                "rope_mode",
                "rope_offset",
                "mem_bf16",
                "layer_norm",
                "final_layer_norm",
            ]
        ],
        ("eps", ctypes.c_float),
        ("final_eps", ctypes.c_float),
        ("lm_head", _Mat),
        *[(name, _P) for name in ["embedding", "final_norm", "cos", "sin", "final_norm_bias", "head_bias"]],
        ("layers", ctypes.POINTER(_Layer)),
        ("row_block", ctypes.c_int64),
        ("attend_old", ctypes.c_int64),
    ]


class NativeUnavailable(RuntimeError):
    """The C step cannot be built or loaded here (the message says why)."""


log = logging.getLogger(__name__)
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL] = {}
_failures: dict[str, str] = {}


_rows_per_pass: weakref.WeakKeyDictionary[StepModel, int] = weakref.WeakKeyDictionary()


def set_rows_per_pass(model: StepModel, rows: int | None) -> None:
    """Run ``model``'s int8 C step with ``rows`` activation rows per pass (1: row by row, the
    step before the multi-row kernel; None: back to :func:`rows_per_pass`'s default)."""
    if rows is None:
        _rows_per_pass.pop(model, None)
        return
    if not 1 <= rows <= ROWS_MAX:
        raise ValueError(f"rows per pass must be 1..{ROWS_MAX}, got {rows}")
    _rows_per_pass[model] = rows


def rows_per_pass(model: StepModel) -> int:
    """The rows per pass of ``model``'s C step: its :func:`set_rows_per_pass`, else
    ``RXRT_NATIVE_ROWS``, else :data:`ROWS_PER_PASS`."""
    rows = _rows_per_pass.get(model)
    if rows is not None:
        return rows
    env = os.environ.get("RXRT_NATIVE_ROWS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"RXRT_NATIVE_ROWS must be an integer 1..{ROWS_MAX}, got {env!r}") from None
        if not 1 <= value <= ROWS_MAX:
            raise ValueError(f"RXRT_NATIVE_ROWS must be 1..{ROWS_MAX}, got {value}")
        return value
    return ROWS_PER_PASS


def old_attention() -> bool:
    """Whether the C step runs its attention as it was before its vector code (issue 27):
    ``RXRT_NATIVE_ATTEND=old``; ``vector`` (the default) is decode_step.c's ``attend``. The old
    code (scalar dot products and libm's ``expf`` one score at a time) is kept only so that
    benchmarks can run both side by side (``benchmarks/int8_rows.py --attend``)."""
    env = os.environ.get("RXRT_NATIVE_ATTEND", "vector")
    if env not in ("vector", "old"):
        raise ValueError(f"RXRT_NATIVE_ATTEND must be 'vector' or 'old', got {env!r}")
    return env == "old"


def _multi_row(model: StepModel) -> bool:
    """Whether ``model``'s C step applies each weight to several rows per pass (int8, float32)."""
    return model.weight_format in ("int8", "fp32") and rows_per_pass(model) > 1


def max_rows(model: StepModel) -> int:
    """Rows per decode step up to which the C step runs ``model``: :data:`MAX_ROWS`, or
    :data:`MULTI_ROW_MAX_ROWS` for int8 and float32 weights with the multi-row kernels."""
    return MULTI_ROW_MAX_ROWS if _multi_row(model) else MAX_ROWS


def prefill_max_tokens(model: StepModel) -> int:
    """Prefill tokens (all prompts of a join) up to which ``model``'s int8 or float32 prefill runs
    in C: :data:`PREFILL_MAX_TOKENS`, or with the multi-row kernels :data:`INT8_PREFILL_MAX_TOKENS`
    (int8) and :data:`FP32_PREFILL_MAX_TOKENS` (float32: beyond it torch's batched products win)."""
    if not _multi_row(model):
        return PREFILL_MAX_TOKENS
    return INT8_PREFILL_MAX_TOKENS if model.weight_format == "int8" else FP32_PREFILL_MAX_TOKENS


def prefill_chunk(model: StepModel) -> int:
    """Prompt tokens per C-step call of :meth:`NativeDecoder.prefill` for this model's weights."""
    return FP32_PREFILL_CHUNK if model.weight_format == "fp32" else PREFILL_CHUNK


def cache_dir() -> Path:
    root = os.environ.get("RXRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rxruntime")
    return Path(root) / "native"


def variant() -> str:
    """Which build the C step runs (``RXRT_NATIVE_ISA``): ``"native"`` (vector code for this CPU,
    the default), ``"avx2"`` (the AVX2 code even on an AVX-512 CPU) or ``"scalar"`` (plain loops,
    no vector instructions at all), so every fallback can be checked on one machine."""
    which = os.environ.get("RXRT_NATIVE_ISA", "native")
    return which if which in ("avx2", "scalar") else "native"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(force: bool = False, which: str | None = None) -> Path:
    """Compile the C step (once; later calls find it in :func:`cache_dir`). Raises
    :class:`NativeUnavailable` with the compiler's message when it cannot.

    ``-march=native`` lets the compiler use what this CPU has (AVX2, AVX-512), and the C file
    picks its vector code from the macros that sets; ``which`` is a :func:`variant`.
    """
    which = which or variant()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler found (set CC, or install gcc)")
    runtime = openmp.runtime_path()
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-Wall"]
    if which == "scalar":
        flags += ["-DRXRT_SCALAR", "-fno-tree-vectorize"]
    elif which == "avx2":  # an AVX2 + FMA CPU without AVX-512 (Haswell's set), for the tests
        flags[1] = "-march=haswell"
    flags += os.environ.get("RXRT_NATIVE_CFLAGS", "").split()  # build variants for benchmarks, e.g. -DF32_PF=0
    link = [] if runtime is None else [str(runtime), f"-Wl,-rpath,{runtime.parent}"]
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(flags + link).encode(), _cpu_name().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"decode_step-{key}.so"
    if target.exists() and not force:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            command = [compiler, *flags, str(_SOURCE), "-o", str(partial), *link, "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise NativeUnavailable(f"{compiler} failed to run: {err}") from None
            if done.returncode != 0:
                raise NativeUnavailable(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
            os.replace(partial, target)  # atomic: a concurrent build never sees half a library
    except OSError as err:  # an unwritable cache directory, a full disk
        raise NativeUnavailable(f"cannot build into {target.parent}: {err}") from None
    return target


def library() -> ctypes.CDLL:
    """The loaded C step of :func:`variant` (built on first use); :class:`NativeUnavailable`
    when it cannot be."""
    which = variant()
    with _lock:
        if which in _libraries:
            return _libraries[which]
        if which in _failures:
            raise NativeUnavailable(_failures[which])
        try:
            try:
                lib = ctypes.CDLL(str(build(which=which)))
            except OSError:  # a damaged cached library: build it again, once
                lib = ctypes.CDLL(str(build(force=True, which=which)))
            fn = lib.rxt_decode_rows
            isa = lib.rxt_isa
        except (NativeUnavailable, OSError, AttributeError) as err:
            _failures[which] = str(err)
            log.warning("the C decode step is unavailable, decoding runs the torch step: %s", err)
            raise NativeUnavailable(str(err)) from None
        # (model, n, tokens, positions, rows, n_out, out_rows, logits, threads)
        fn.argtypes = [
            ctypes.POINTER(_Model),
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
        isa.restype = ctypes.c_char_p
        _libraries[which] = lib
        return lib


def f32_tile(bits: int = 0) -> int:
    """The width of the float32 multi-row tile the loaded C step runs: 512 (AVX-512 builds),
    256 (AVX2) or 0 (scalar: row by row). ``bits`` 256 or 512 switches an AVX-512 build's tile
    for the whole process (both give the same bits), so a benchmark can set the two side by side."""
    if bits not in (0, 256, 512):
        raise ValueError(f"the float32 tile is 256 or 512 bits wide, not {bits}")
    return int(library().rxt_f32_tile(ctypes.c_int(bits)))


def isa() -> str:
    """The vector code the loaded C step runs: "avx512", "avx2", "scalar" or "scalar (forced)"."""
    return str(library().rxt_isa().decode())


def enabled() -> bool:
    """Whether the C step may be used: ``RXRT_NATIVE`` is not ``0`` and it builds and loads."""
    if os.environ.get("RXRT_NATIVE", "1") == "0":
        return False
    try:
        library()
    except NativeUnavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`enabled` is False (None when it is True)."""
    if os.environ.get("RXRT_NATIVE", "1") == "0":
        return "disabled by RXRT_NATIVE=0"
    try:
        library()
    except NativeUnavailable as err:
        return str(err)
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_TILE = 16
"""Columns per int8 tile: one 64-byte VNNI operand holds 16 columns x 4 inputs."""


def pack_int8(matrix: Tensor, seg: int) -> Tensor:
    """The C step's int8 copy of an input-major (rows, cols) matrix whose rows are segments of
    ``seg`` (an expert's rows each), quantised per segment (:func:`quantize_int8`).

    Layout (decode_step.c's int8 Mat): per segment, per tile of 16 columns, per block of 32 rows,
    512 bytes of ``q + 128`` as uint8, 8 groups of 4 rows with column j's 4 values at ``4 j``,
    then the tile's 16 float32 scales of that block. Padding rows and columns hold q = 0 and scale 0.
    """
    rows, cols = matrix.shape
    segments, blocks, tiles = rows // seg, -(-seg // BLOCK), -(-cols // _TILE)
    q, scales = quantize_int8(matrix.reshape(segments, seg, cols))  # (S, seg, cols), (S, blocks, cols)
    padded = torch.zeros(segments, blocks * BLOCK, tiles * _TILE, dtype=torch.int16)
    padded[:, :seg, :cols] = q
    unsigned = (padded + 128).to(torch.uint8).view(segments, blocks, 8, 4, tiles, _TILE)
    values = unsigned.permute(0, 4, 1, 2, 5, 3).reshape(segments, tiles, blocks, BLOCK * _TILE)
    wide = torch.zeros(segments, blocks, tiles * _TILE, dtype=torch.float32)
    wide[:, :, :cols] = scales
    scale_bytes = wide.view(segments, blocks, tiles, _TILE).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([values, scale_bytes], dim=3).contiguous()


def pack_q4(matrix: Tensor) -> Tensor | None:
    """The C step's q4 copy of an input-major (rows, cols) float32 matrix whose values are exactly
    Q4_1 (a float16 scale and minimum per 32 inputs of a column, levels 0-15), or None when they
    are not: checked and packed in one pass by the C step's ``rxt_pack_q4`` (a 100M-weight
    backbone in a fraction of a second; tests/test_q4.py holds it to a torch reference)."""
    if matrix.dim() != 2 or matrix.dtype != torch.float32 or matrix.shape[0] % BLOCK or matrix.numel() == 0:
        return None
    rows, cols = matrix.shape
    out = torch.empty(-(-cols // _TILE), rows // BLOCK, _Q4_BLOCK, dtype=torch.uint8)
    ok = library().rxt_pack_q4(
        ctypes.c_void_p(matrix.data_ptr()), ctypes.c_int64(rows), ctypes.c_int64(cols),
        ctypes.c_int64(matrix.stride(0)), ctypes.c_int64(matrix.stride(1)), ctypes.c_void_p(out.data_ptr()),
    )  # fmt: skip
    return out if ok else None


_Q4_BLOCK = BLOCK * _TILE // 2 + 2 * 2 * _TILE
"""Bytes of one q4 block of a tile: 256 of levels, 16 float16 scales, 16 float16 minimums."""


def _mat(matrix: Tensor, weights: WeightFormat, keep: list[Tensor], seg: int | None = None) -> _Mat:
    """``matrix`` (rows, cols), input-major (see :func:`_readable`), as a :class:`_Mat` of the
    format: float32 in place (its row stride as ``ld``, or, for the transpose of an untouched
    ``nn.Linear`` weight, its column stride, read as dot products), a contiguous bf16 copy of the
    whole rows, or the packed int8 copy of exactly these columns (:func:`pack_int8`, blocks
    restarting every ``seg`` rows, default all); ``keep`` holds the copies alive while the struct
    points at them."""
    rows, cols = matrix.shape[0], matrix.shape[1]
    if matrix.stride(1) != 1:  # an nn.Linear weight's transpose: unit row stride
        if weights == "fp32":
            return _Mat(matrix.data_ptr(), matrix.stride(1), _WEIGHT_TYPES["fp32-t"], rows)
        if weights == "bf16":
            copy = matrix.to(torch.bfloat16).contiguous()
            keep.append(copy)
            return _Mat(copy.data_ptr(), cols, _WEIGHT_TYPES["bf16"], rows)
    ld = matrix.stride(0)
    if weights == "fp32":
        return _Mat(matrix.data_ptr(), ld, _WEIGHT_TYPES["fp32"], rows)
    if weights == "bf16":
        copy = matrix.as_strided((rows, ld), (ld, 1)).to(torch.bfloat16).contiguous()
        keep.append(copy)
        return _Mat(copy.data_ptr(), ld, _WEIGHT_TYPES["bf16"], rows)
    q4 = pack_q4(matrix) if (seg is None or seg == rows) and q4_enabled() else None
    if q4 is not None:  # exactly Q4_1 (a GGUF backbone's): 4 bits, nothing rounded
        keep.append(q4)
        return _Mat(q4.data_ptr(), -(-cols // _TILE) * _TILE, _WEIGHT_TYPES["q4"], rows)
    packed = pack_int8(matrix, seg or rows)
    keep.append(packed)
    return _Mat(packed.data_ptr(), -(-cols // _TILE) * _TILE, _WEIGHT_TYPES["int8"], seg or rows)


def _readable(matrix: Tensor | None, rows: int, cols: int) -> bool:
    """Whether ``matrix`` is (rows, cols) and the C step can read it in place or copy it: input-
    major with unit column stride, or the transpose of an ``nn.Linear`` weight (unit row stride,
    columns at least ``rows`` apart)."""
    if matrix is None or tuple(matrix.shape) != (rows, cols):
        return False
    s0, s1 = matrix.stride()
    return (s1 == 1 and s0 >= cols) or (s0 == 1 and s1 >= rows)


def _input_major(weight: Tensor, rows: int, cols: int) -> int | None:
    """Row stride of ``weight.t()`` as a (rows, cols) input-major matrix, or None."""
    t = weight.t()
    if tuple(t.shape) != (rows, cols) or t.stride(1) != 1 or t.stride(0) < cols:
        return None
    return t.stride(0)


def layout_reason(model: StepModel) -> str | None:
    """Why the C step does not cover this model's decoder layout (None when it does).

    The C code describes each layer by the sub-blocks it has: self-attention, memory
    cross-attention (memory layers only: stateless layers before and after have none), either
    gated by any activation of models/ffn.py, with SQA/GQA/MQA or reversed-SQA head counts; a
    feed-forward, gated (SwiGLU and the like) or not, dense or an MoE with per-expert or global
    biases and shared experts (one, or several mixed by their softmax gate; scaled or not, local
    or global biases); RMSNorm or LayerNorm blocks, any RoPE pairing and position offset, an
    optional RMSNorm or LayerNorm before an optionally biased LM head; a float32 router, or a
    bf16 one computed as RxLM's ``router_amp`` computes it (decode_step.c's route_bf16). That is
    our layouts, RxLM 0.2's and 0.3's RxT-Alpha and RxT-Beta decoders (RxT-Beta as published
    included), and Llama-like dense decoders. What remains (a float16 router) runs the torch step.
    """
    d = model.config.decoder
    router_dtype = getattr(d, "router_dtype", "float32")  # RxLM 0.3's router_amp, where the config has it
    checks = [(router_dtype in ("float32", "bfloat16"), f"decoder.router_dtype={router_dtype!r}")]
    failed = [what for ok, what in checks if not ok]
    return None if not failed else "layout not covered by the C step: " + ", ".join(failed)


class _Watch:
    """Where the tensors the C step reads live, so that a step can check in a few tens of
    microseconds that none was replaced, moved or (for compact formats) edited in place, instead
    of collecting them all again (models/attention.py's fused Q/K/V checks included).

    ``links``: (a module's ``_modules`` dict, name, the child found there); ``slots``: (a
    ``_parameters``/``_buffers`` dict, name); ``sizes``: containers whose length must not change.
    """

    def __init__(self) -> None:
        self.links: list[tuple[dict[str, Any], str, Any]] = []
        self.slots: list[tuple[dict[str, Any], str]] = []
        self.sizes: list[tuple[dict[str, Any], int]] = []
        self.versioned = False
        """Watch versions even in fp32 (a bf16 router's copy must follow in-place edits)."""

    def child(self, parent: Any, name: str) -> Any:
        modules = parent._modules
        found = modules.get(name)
        self.links.append((modules, name, found))
        return found

    def tensor(self, owner: dict[str, Any], name: str) -> Tensor | None:
        self.slots.append((owner, name))
        found: Tensor | None = owner.get(name)
        return found

    def fused(self, attn: Any) -> tuple[Tensor | None, Tensor | None]:
        """The attention's fused Q/K/V weight and bias (None, None when it has none), watched
        through the q/k/v parameters, which are views of it while it is valid."""
        for proj in ("q_proj", "k_proj", "v_proj"):
            params = self.child(attn, proj)._parameters
            self.tensor(params, "weight")
            self.tensor(params, "bias")
        fused = attn.fused_qkv()
        return (None, None) if fused is None else fused

    def key(self, fmt: str) -> tuple[object, ...] | None:
        """Addresses (and, for compact formats, versions) of the watched tensors; None when a
        module or container changed."""
        for modules, name, found in self.links:
            if modules.get(name) is not found:
                return None
        for container, size in self.sizes:
            if len(container) != size:
                return None
        tensors = [owner.get(name) for owner, name in self.slots]
        key: tuple[object, ...] = (fmt, *(0 if t is None else t.data_ptr() for t in tensors))
        if fmt != "fp32" or self.versioned:  # copies must follow in-place edits (float32 is read in place)
            key += tuple(0 if t is None else t._version for t in tensors)
        return key


_Weights = tuple[list[Any], list[dict[str, Any]]]
"""What :meth:`NativeDecoder._collect` finds: the model's tensors and one dict per layer."""


def _activation(fn: Any) -> str | None:
    """The name of an activation function in models/ffn.py's ACTIVATIONS (None: not one of them)."""
    return next((name for name, f in ACTIVATIONS.items() if f is fn), None)


def _attention_weights(w: _Watch, attn: Any) -> dict[str, Any]:
    qkv, qkv_bias = w.fused(attn)
    o = w.child(attn, "o_proj")._parameters
    gate = w.child(attn, "gate_proj")
    return {
        "qkv": qkv,
        "qkv_bias": qkv_bias,
        "o": w.tensor(o, "weight"),
        "o_bias": w.tensor(o, "bias"),
        "gate": None if gate is None else w.tensor(gate._parameters, "weight"),
        "gate_bias": None if gate is None else w.tensor(gate._parameters, "bias"),
        "gate_act": None if gate is None else _activation(attn.gate_act),
        "heads": (attn.q_heads, attn.kv_heads, attn.out_heads),
    }


def _ffn_weights(w: _Watch, ffn: Any) -> dict[str, Any]:
    """A dense gated feed-forward (models/ffn.py's SwiGLU): a dense layer, or a shared expert."""
    w_in, w_out = w.child(ffn, "w_in")._parameters, w.child(ffn, "w_out")._parameters
    return {
        "w_in": w.tensor(w_in, "weight"),
        "b_in": w.tensor(w_in, "bias"),
        "w_out": w.tensor(w_out, "weight"),
        "b_out": w.tensor(w_out, "bias"),
        "hidden": ffn.hidden_dim,
        "gated": ffn.gated,
        "act": _activation(ffn.act),
    }


def _moe_weights(w: _Watch, ffn: Any) -> dict[str, Any]:
    params = ffn._parameters
    shared = w.child(ffn, "shared_experts")
    w.sizes.append((shared._modules, len(shared._modules)))
    gate = w.child(ffn, "shared_gate")
    if ffn.router_dtype == "bfloat16":
        w.versioned = True
    return {
        "module": ffn,
        # the copies that hold its tables once they were dropped (a rebind binds these again)
        "released": ffn.released if isinstance(ffn.released, _ExpertCopies) else None,
        "router": w.tensor(w.child(ffn, "router")._parameters, "weight"),
        "router_dtype": ffn.router_dtype,
        **{name: w.tensor(params, name) for name in ("w_in", "w_out", "b_in", "b_out", "global_bias", "shared_bias")},
        "shared": [_ffn_weights(w, w.child(shared, name)) for name in list(shared._modules)],
        "shared_gate": None if gate is None else w.tensor(gate._parameters, "weight"),
        "scaled": ffn.shared_scaled,
        "top_k": ffn.top_k,
        "experts": ffn.num_experts,
        "hidden": ffn.hidden_dim,
        "gated": ffn.gated,
        "act": ffn.activation,
    }


def _layer_weights(w: _Watch, layer: Any) -> dict[str, Any]:
    """One decoder layer's tensors and sub-blocks (see decode_step.c's RxtLayer), watched."""
    norms: list[Any] = []
    out: dict[str, Any] = {}

    def norm(name: str) -> None:
        module = w.child(layer, name)
        norms.append(module)
        out[name] = None if module is None else w.tensor(module._parameters, "weight")
        out[f"{name}_bias"] = None if module is None else w.tensor(module._parameters, "bias")

    norm("self_norm")
    out["self"] = _attention_weights(w, w.child(layer, "self_attn"))
    cross = w.child(layer, "cross_attn")
    if cross is not None:
        norm("cross_norm")
    out["cross"] = None if cross is None else _attention_weights(w, cross)
    norm("ffn_norm")
    ffn = w.child(layer, "ffn")
    out["moe"] = _moe_weights(w, ffn) if isinstance(ffn, MoE) else None
    out["dense"] = _ffn_weights(w, ffn) if isinstance(ffn, SwiGLU) else None
    out["norms"] = norms
    return out


def _tensors(item: Any) -> list[Tensor]:
    """Every tensor in a (nested) dict or list of :func:`_layer_weights`."""
    if isinstance(item, Tensor):
        return [item]
    if isinstance(item, dict):
        return [t for value in item.values() for t in _tensors(value)]
    if isinstance(item, list):
        return [t for value in item for t in _tensors(value)]
    return []


def _eps(norm: Any) -> float:
    """A norm's epsilon; None is torch's default for the dtype, which F.rms_norm uses."""
    return float(torch.finfo(torch.float32).eps if norm.eps is None else norm.eps)


def _vectors_ok(*vectors: Tensor | None) -> bool:
    return all(v is None or v.is_contiguous() for v in vectors)


def _attention_ok(a: dict[str, Any], dim: int, hd: int, heads: tuple[int, int]) -> bool:
    q, kv = heads
    out = max(q, kv)
    qkv, o, gate = a["qkv"], a["o"], a["gate"]
    if a["heads"] != (q, kv, out) or qkv is None or o is None:
        return False  # not in decode layout (or the fused weights were replaced)
    if _input_major(qkv.t(), dim, (q + 2 * kv) * hd) is None or not _readable(o.t(), out * hd, dim):
        return False
    if gate is not None and (a["gate_act"] is None or not _readable(gate.t(), dim, out * hd)):
        return False
    return _vectors_ok(a["qkv_bias"], a["o_bias"], a["gate_bias"])


def _ffn_ok(f: dict[str, Any], dim: int) -> bool:
    h = f["hidden"]
    return (
        f["act"] is not None
        and _readable(None if f["w_in"] is None else f["w_in"].t(), dim, (2 if f["gated"] else 1) * h)
        and _readable(None if f["w_out"] is None else f["w_out"].t(), h, dim)
        and _vectors_ok(f["b_in"], f["b_out"])
    )


def _layer_ok(lw: dict[str, Any], dim: int, hd: int, heads: dict[str, tuple[int, int]], fmt: WeightFormat) -> bool:
    """Whether a layer's tensors have the shapes and layouts the C step reads."""
    norms = [lw[f"{name}{part}"] for name in ("self_norm", "ffn_norm") for part in ("", "_bias")]
    if lw["self_norm"] is None or lw["ffn_norm"] is None or not _vectors_ok(*norms):
        return False
    if not _attention_ok(lw["self"], dim, hd, heads["self"]):
        return False
    if lw["cross"] is not None:
        if lw["cross_norm"] is None or not _vectors_ok(lw["cross_norm"], lw["cross_norm_bias"]):
            return False
        if not _attention_ok(lw["cross"], dim, hd, heads["cross"]):
            return False
    if lw["dense"] is not None:
        return _ffn_ok(lw["dense"], dim)
    moe = lw["moe"]
    if moe is None:
        return False
    h, experts, router, w_in, w_out = moe["hidden"], moe["experts"], moe["router"], moe["w_in"], moe["w_out"]
    if moe["act"] not in _ACTIVATIONS or router is None or w_in is None or w_out is None:
        return False
    released: _ExpertCopies | None = moe["released"]
    if moe["router_dtype"] not in ("float32", "bfloat16"):
        return False
    if tuple(router.shape) != (experts, dim) or not router.is_contiguous():
        return False
    gh = (2 if moe["gated"] else 1) * h  # w_in's columns: [gate | up], or the one input projection
    if released is not None:  # the tables live only in the copies: bound again from them, same format only
        if released.fmt != fmt:
            return False
    elif w_in.stride() != (gh * dim, 1, gh) or w_out.stride() != (h * dim, 1, dim):
        return False
    gate, shared = moe["shared_gate"], moe["shared"]
    if gate is not None and (tuple(gate.shape) != (len(shared), dim) or not gate.is_contiguous()):
        return False
    if len(shared) > 1 and gate is None:
        return False
    vectors = (moe["b_in"], moe["b_out"], moe["global_bias"], moe["shared_bias"])
    return _vectors_ok(*vectors) and all(_ffn_ok(f, dim) for f in shared)


@dataclass(frozen=True)
class _ExpertCopies:
    """The C step's copies of one MoE's routed-expert tables: their Mats, the tensors behind them
    (``copies``: int8 packed or bf16; empty for fp32, read in place) and ``shape``
    ``(experts, dim, gh, hidden)`` (``gh``: w_in's columns, 2 x hidden when gated)."""

    fmt: WeightFormat
    mat_in: _Mat
    mat_out: _Mat
    copies: list[Tensor]
    shape: tuple[int, int, int, int]

    def expert(self, e: int) -> tuple[Tensor, Tensor]:
        """Expert ``e``'s float32 ``(w_in[e], w_out[e])`` in torch's (out, in) layout, unpacked
        from the copies: the values the float32 tables held (quantize.py rounded them to these)."""
        experts, dim, gh, h = self.shape
        if not 0 <= e < experts:
            raise IndexError(f"expert {e} of {experts}")
        copy_in, copy_out = self.copies
        if self.fmt == "int8":
            return unpack_int8(copy_in[e], dim, gh).t(), unpack_int8(copy_out[e], h, dim).t()
        return copy_in[e * dim : (e + 1) * dim].float().t(), copy_out[e * h : (e + 1) * h].float().t()


def _expert_copies(w_in: Tensor, w_out: Tensor, fmt: WeightFormat) -> _ExpertCopies:
    """The C step's copies of one MoE's tables, given input-major: ``w_in`` (E, dim, gh) and
    ``w_out`` (E, hidden, dim), float32 and already rounded to ``fmt``; each expert's rows are
    blocked on their own."""
    experts, dim, gh = w_in.shape
    h = w_out.shape[1]
    keep: list[Tensor] = []
    mat_in = _mat(w_in.reshape(experts * dim, gh), fmt, keep, seg=dim)
    mat_out = _mat(w_out.reshape(experts * h, dim), fmt, keep, seg=h)
    return _ExpertCopies(fmt, mat_in, mat_out, keep, (experts, dim, gh, h))


def _release(module: MoE, copies: _ExpertCopies) -> int:
    """Drop ``module``'s tables, which ``copies`` hold from now on; bytes freed."""
    freed = (module.w_in.numel() + module.w_out.numel()) * module.w_in.element_size()
    module.released = copies
    module.w_in = torch.nn.Parameter(torch.empty(0, *module.w_in.shape[1:]), requires_grad=False)
    module.w_out = torch.nn.Parameter(torch.empty(0, *module.w_out.shape[1:]), requires_grad=False)
    return freed


@torch.no_grad()
def compact_experts(model: StepModel, fmt: WeightFormat | None) -> int:
    """Settle the routed-expert tables of ``model``'s decoder, read in the checkpoint's own dtype
    (``load_pretrained(defer_experts=True)``), one MoE at a time; bytes of float32 tables never
    held (those released).

    With ``fmt`` ``"int8"`` or ``"bf16"``, each MoE's tables become float32, are rounded to the
    format (:func:`~.quantize.round_to_format`, as :func:`~.weight_format.set_weight_format` rounds
    them) and copied as the C step reads them, then dropped, before the next MoE is touched:
    RxT-Beta then loads in about half the peak memory of loading everything as float32 and
    releasing afterwards (:func:`prepare`), with bit-equal copies. With ``fmt`` None the tables
    just become float32 (the model keeps them). Other float32 tensors are the caller's.
    """
    freed = 0
    for layer in model.decoder.blocks:
        moe = layer.ffn
        if not isinstance(moe, MoE) or moe.released is not None:
            continue
        # the decode layout (input-major storage) in float32: as MoE.use_decode_layout stores it
        w_in = moe.w_in.detach().transpose(1, 2).to(torch.float32).contiguous()
        w_out = moe.w_out.detach().transpose(1, 2).to(torch.float32).contiguous()
        if fmt is None or fmt == "fp32":
            moe.w_in = torch.nn.Parameter(w_in.transpose(1, 2), requires_grad=moe.w_in.requires_grad)
            moe.w_out = torch.nn.Parameter(w_out.transpose(1, 2), requires_grad=moe.w_out.requires_grad)
            continue
        w_in.copy_(round_to_format(w_in, fmt))
        w_out.copy_(round_to_format(w_out, fmt))
        copies = _expert_copies(w_in, w_out, fmt)
        del w_in, w_out
        _release(moe, copies)
        freed += moe.num_experts * moe.expert_numel() * 4
    return freed


def unpack_int8(packed: Tensor, rows: int, cols: int) -> Tensor:
    """The float32 (rows, cols) input-major matrix of one segment :func:`pack_int8` packed
    (``packed``: its (tiles, blocks, 576) bytes), as ``q * scale``."""
    tiles, blocks = packed.shape[0], packed.shape[1]
    values = packed[..., : BLOCK * _TILE].reshape(tiles, blocks, 8, _TILE, 4).permute(1, 2, 4, 0, 3)
    q = values.reshape(blocks * BLOCK, tiles * _TILE).to(torch.float32) - 128
    scales = packed[..., BLOCK * _TILE :].contiguous().view(torch.float32)  # (tiles, blocks, 16)
    scales = scales.permute(1, 0, 2).reshape(blocks, 1, tiles * _TILE)
    matrix = (q.view(blocks, BLOCK, tiles * _TILE) * scales).view(blocks * BLOCK, tiles * _TILE)
    return matrix[:rows, :cols].contiguous()


def _bind_ffn(f: dict[str, Any], fmt: WeightFormat, keep: list[Tensor]) -> _Ffn:
    w_in, w_out = _mat(f["w_in"].t(), fmt, keep), _mat(f["w_out"].t(), fmt, keep)
    return _Ffn(w_in, w_out, _ptr(f["b_in"]), _ptr(f["b_out"]), f["hidden"], int(f["gated"]))


def _bind_attention(a: dict[str, Any], query_only: bool, hd: int, fmt: WeightFormat, keep: list[Tensor]) -> list[Any]:
    """(Q/K/V or only its query columns, o, gate) Mats, (Q/K/V bias, o bias, gate bias) and the
    gate's activation."""
    gate = _Mat() if a["gate"] is None else _mat(a["gate"].t(), fmt, keep)
    return [
        _mat(a["qkv"][:, : a["heads"][0] * hd] if query_only else a["qkv"], fmt, keep),
        _mat(a["o"].t(), fmt, keep),
        gate,
        _ptr(a["qkv_bias"]),
        _ptr(a["o_bias"]),
        _ptr(a["gate_bias"]),
        0 if a["gate"] is None else _ACTIVATIONS[a["gate_act"]],
    ]


def _bind_layer(
    lw: dict[str, Any], fmt: WeightFormat, keep: list[Tensor], tables: list[Any], dim: int, hd: int
) -> _Layer:
    """The :class:`_Layer` of one checked (:func:`_layer_ok`) layer; ``keep`` and ``tables`` hold
    the copies and the shared-expert arrays alive."""
    layer = _Layer()
    qkv, o, gate, qkv_bias, o_bias, gate_bias, gate_act = _bind_attention(lw["self"], False, hd, fmt, keep)
    layer.qkv, layer.o, layer.gate, layer.qkv_bias, layer.o_bias = qkv, o, gate, qkv_bias, o_bias
    layer.gate_bias, layer.gate_act = gate_bias, gate_act
    layer.self_norm, layer.ffn_norm = _ptr(lw["self_norm"]), _ptr(lw["ffn_norm"])
    layer.self_norm_bias, layer.ffn_norm_bias = _ptr(lw["self_norm_bias"]), _ptr(lw["ffn_norm_bias"])
    cross = lw["cross"]
    if cross is not None:  # the query columns of the fused cross Q/K/V: the step reads only those
        cq, co, cgate, cq_bias, co_bias, cgate_bias, cgate_act = _bind_attention(cross, True, hd, fmt, keep)
        layer.cq, layer.co, layer.cgate, layer.cq_bias, layer.co_bias = cq, co, cgate, cq_bias, co_bias
        layer.cgate_bias, layer.cgate_act = cgate_bias, cgate_act
        layer.cross_norm, layer.cross_norm_bias = _ptr(lw["cross_norm"]), _ptr(lw["cross_norm_bias"])
    layer.routed_scale = layer.shared_scale = 1.0
    if lw["dense"] is not None:
        layer.dense = _bind_ffn(lw["dense"], fmt, keep)
        layer.act = _ACTIVATIONS[lw["dense"]["act"]]
        return layer
    moe = lw["moe"]
    copies: _ExpertCopies | None = moe["released"]
    if copies is None:  # the input-major tables (decode layout), as views
        copies = moe["bound"] = _expert_copies(moe["w_in"].transpose(1, 2), moe["w_out"].transpose(1, 2), fmt)
        keep += copies.copies
    layer.w_in, layer.w_out = copies.mat_in, copies.mat_out
    layer.gated = int(moe["gated"])
    layer.router, layer.b_in, layer.b_out = _ptr(moe["router"]), _ptr(moe["b_in"]), _ptr(moe["b_out"])
    if moe["router_dtype"] == "bfloat16":  # RxLM's router_amp: the C step routes on a bf16 copy
        router_bf16 = moe["router"].to(torch.bfloat16).contiguous()
        keep.append(router_bf16)
        layer.router_bf16 = router_bf16.data_ptr()
    layer.global_bias, layer.shared_bias = _ptr(moe["global_bias"]), _ptr(moe["shared_bias"])
    layer.act = _ACTIVATIONS[moe["act"]]
    shared = moe["shared"]
    if shared:
        table = (_Ffn * len(shared))(*[_bind_ffn(f, fmt, keep) for f in shared])
        tables.append(table)
        layer.shared = ctypes.cast(table, ctypes.POINTER(_Ffn))
        layer.n_shared = len(shared)
        layer.shared_gate = _ptr(moe["shared_gate"]) if len(shared) > 1 else None
        if moe["scaled"]:  # models/moe.py: routed * k / (k + s), shared * s / (k + s)
            k, s = moe["top_k"], len(shared)
            layer.routed_scale, layer.shared_scale = k / (k + s), s / (k + s)
    return layer


class NativeDecoder:
    """The C step bound to one model's weights; see the module docstring.

    :meth:`step` returns None (and the caller runs the torch step) whenever something does not
    have the layout the C code indexes; it never guesses.
    """

    def __init__(self, model: StepModel) -> None:
        self._model = weakref.ref(model)  # held in a side table keyed by the model: no cycle
        self._weights: _Weights = ([], [])
        self._watch = _Watch()
        self._weight_key: tuple[object, ...] | None = None
        """``self._watch.key`` when the weights were bound: the copies are current while it holds."""
        self._copies: list[Tensor] = []
        self._shared_tables: list[Any] = []
        self._compact: list[tuple[Tensor, Tensor]] = []
        """bf16 copies of the memory keys/values the C step reads (see :meth:`_compacted`)."""
        self._buffers_key: tuple[object, ...] = ()
        self._struct: _Model | None = None
        self._layers: ctypes.Array[_Layer] | None = None
        self._keep: list[Tensor] = []
        self._lock = threading.Lock()
        self.layout_reason = layout_reason(model)
        """Why this model's layout runs the torch step instead (None: the C step covers it)."""

    @property
    def model(self) -> StepModel:
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this NativeDecoder is gone")
        return model

    def _collect(self) -> _Weights:
        """Every tensor the C step reads: the model's (embedding, final norm, LM head and bias,
        RoPE tables) and one :func:`_layer_weights` per layer; also records in ``self._watch``
        where each one lives, so that later steps can check cheaply that none moved.

        Reads the modules' ``_parameters`` and ``_modules`` dicts directly: ``nn.Module``'s
        attribute lookup would cost more than the rest of the step's Python together.
        """
        w = self._watch = _Watch()
        m: Any = self.model  # the private dicts are untyped
        dec = w.child(m, "decoder")
        head = w.child(dec, "lm_head")
        rope = w.child(dec, "rope")
        norm = w.child(dec, "norm")
        top: list[Any] = [
            w.tensor(w.child(m, "embedding")._parameters, "weight"),
            None if norm is None else w.tensor(norm._parameters, "weight"),
            w.tensor(head._parameters, "weight"),
            w.tensor(rope._buffers, "cos"),
            w.tensor(rope._buffers, "sin"),
            w.tensor(head._parameters, "bias"),
            norm,
            None if norm is None else w.tensor(norm._parameters, "bias"),
        ]
        layers = w.child(dec, "layers")
        w.sizes.append((layers._modules, len(layers._modules)))
        return top, [_layer_weights(w, w.child(layers, name)) for name in list(layers._modules)]

    def _bind_weights(self, weights: _Weights, fmt: WeightFormat) -> bool:
        """Fill the C structs from the weights (copied to ``fmt`` unless it is fp32); False when a
        layout is not the expected one."""
        m = self.model
        cfg, d = m.config, m.config.decoder
        dim, hd = cfg.dim, cfg.dim // d.num_heads
        top, layer_weights = weights
        emb, final_norm, head, cos, sin, head_bias, final, final_bias = top
        tensors = [t for t in [*top[:6], final_bias] if t is not None]
        tensors += [t for lw in layer_weights for t in _tensors(lw)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            return False
        if emb is None or head is None or cos is None or sin is None:
            return False
        ld_head = _input_major(head, dim, cfg.vocab_size)
        if ld_head is None or not (emb.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()) or hd > 512:
            return False
        norms = [n for lw in layer_weights for n in lw["norms"]]
        kinds = {type(n) for n in [*norms, *([] if final is None else [final])]}
        if not kinds <= {torch.nn.RMSNorm, torch.nn.LayerNorm} or len({type(n) for n in norms}) != 1:
            return False  # RMSNorm or LayerNorm, one kind for all blocks (the final norm may differ)
        if final is not None and (final_norm is None or not _vectors_ok(final_norm, final_bias)):
            return False
        eps = {_eps(n) for n in norms}
        if len(eps) != 1 or len(layer_weights) != len(m.decoder.layers):
            return False
        if head_bias is not None and not head_bias.is_contiguous():
            return False
        heads = {"self": (d.self_q_heads, d.self_kv_heads), "cross": (d.cross_q_heads, d.cross_kv_heads)}
        if not all(_layer_ok(lw, dim, hd, heads, fmt) for lw in layer_weights):
            return False
        moe = (d.num_experts, d.experts_per_token, d.expert_ffn_dim)  # the C step reads these per model
        if any(lw["moe"] is not None and (lw["moe"]["experts"], lw["moe"]["top_k"], lw["moe"]["hidden"]) != moe
               for lw in layer_weights):  # fmt: skip
            return False
        keep: list[Tensor] = []
        layers = (_Layer * len(layer_weights))()
        shared_tables: list[Any] = []
        for i, lw in enumerate(layer_weights):
            layers[i] = _bind_layer(lw, fmt, keep, shared_tables, dim, hd)
        self._struct = _Model(
            n_layers=len(layer_weights), dim=dim, head_dim=hd, hq=d.self_q_heads, hkv=d.self_kv_heads,
            cq=d.cross_q_heads, ckv=d.cross_kv_heads, n_experts=d.num_experts, top_k=d.experts_per_token,
            hidden=d.expert_ffn_dim, vocab=cfg.vocab_size, n_positions=cos.shape[0],
            rope_mode=_ROPE_MODES[cfg.rope_pairing], rope_offset=d.step_position_offset, eps=eps.pop(),
            layer_norm=int(isinstance(norms[0], torch.nn.LayerNorm)), final_eps=0.0 if final is None else _eps(final),
            final_layer_norm=int(isinstance(final, torch.nn.LayerNorm)),
            lm_head=_mat(head.t(), fmt, keep), embedding=_ptr(emb), final_norm=_ptr(final_norm), cos=_ptr(cos),
            sin=_ptr(sin), final_norm_bias=_ptr(final_bias), head_bias=_ptr(head_bias), layers=layers,
        )  # fmt: skip
        self._layers = layers
        self._copies = keep
        self._shared_tables = shared_tables
        self._buffers_key = ()
        return True

    def _bound(self, fmt: WeightFormat) -> bool:
        """Whether the C structs hold the current weights, binding them again when something
        moved (call under ``self._lock``); False, without re-checking until the weights move,
        when a layout is not the expected one."""
        watched = self._watch.key(fmt)
        if watched is None or watched != self._weight_key:  # something moved: bind again
            weights = self._collect()
            self._struct = None
            self._weights, self._weight_key = weights, self._watch.key(fmt)
            if not self._bind_weights(weights, fmt):
                return False
        return self._struct is not None

    def bind(self) -> bool:
        """Make the C step's copies now (a first turn would otherwise wait for them: tens of
        seconds at RxT-Beta's size); whether the C step runs this model."""
        with self._lock:
            return self._bound(self.model.weight_format)

    @torch.no_grad()
    def release_experts(self) -> int:
        """Drop the float32 routed-expert tables the compact copies hold (see
        :func:`prepare`); bytes freed."""
        fmt = self.model.weight_format
        freed = 0
        with self._lock:
            if fmt == "fp32" or not self._bound(fmt):
                return 0
            for lw in self._weights[1]:
                moe = lw["moe"]
                if moe is None or moe["released"] is not None:
                    continue
                freed += _release(moe["module"], moe["bound"])
                moe["w_in"] = moe["w_out"] = None  # the collected dict held the old tables
                moe["released"] = moe["bound"]
            # the structs already read the copies: only the watched parameters changed
            self._weight_key = self._watch.key(fmt)
        return freed

    def _bind_buffers(self, n: int, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache) -> bool:
        """Point the layers at this step's cache and memory keys/values (when they moved); False
        when they do not hold ``n`` rows or are not laid out as the C step reads them."""
        assert self._struct is not None and self._layers is not None
        if not self._bind_layout(memory_kv, cache):
            return False
        return n <= self._struct.n_rows

    def _compact_memory(self, memory_kv: Sequence[tuple[Tensor, Tensor]]) -> bool:
        """Whether this step reads bf16 copies of the memory keys/values (see
        :data:`COMPACT_MEMORY_MIN_SLOTS`): only where their versions tell when they were written."""
        m = self.model
        return (
            m.weight_format != "fp32"
            and m.config.stm_size >= COMPACT_MEMORY_MIN_SLOTS
            and bool(memory_kv)
            and not any(t.is_inference() for pair in memory_kv for t in pair)
        )

    def _bind_layout(self, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache) -> bool:
        assert self._struct is not None and self._layers is not None
        d = self.model.config.decoder
        k, v = cache.k, cache.v
        compact = self._compact_memory(memory_kv)
        key: tuple[object, ...] = (
            k.data_ptr(), v.data_ptr(), k.shape, k.stride(), v.stride(),
            tuple((mk.data_ptr(), mv.data_ptr(), mk.shape, mk.stride(), mv.stride()) for mk, mv in memory_kv),
            compact and tuple((mk._version, mv._version) for mk, mv in memory_kv),  # written since the copy?
        )  # fmt: skip
        if key == self._buffers_key:
            return True
        cfg = self.model.config
        memory_layers = self.model.decoder.memory_layers  # the cache has every layer, memory_kv these
        layers, rows, kv_heads, max_len, hd = k.shape
        contiguous = (kv_heads * max_len * hd, max_len * hd, hd, 1)
        if (
            layers != self._struct.n_layers
            or kv_heads != d.self_kv_heads
            or k.dtype != torch.float32
            or v.dtype != torch.float32
            or k.stride()[2:] != contiguous[1:]
            or v.stride() != k.stride()
            or len(memory_kv) != len(memory_layers)
            or not memory_kv
        ):
            return False
        mem_row = memory_kv[0][0].stride(0)
        mem_shape = (d.cross_kv_heads, cfg.stm_size, hd)
        for mk, mv in memory_kv:
            for t in (mk, mv):
                strides = (mem_row, cfg.stm_size * hd, hd, 1)  # a dimension of size 1 may have any stride
                if (
                    t.dtype != torch.float32
                    or tuple(t.shape[1:]) != mem_shape
                    or any(n > 1 and s != want for n, s, want in zip(t.shape, t.stride(), strides))
                ):
                    return False
        for i in range(layers):
            layer = self._layers[i]
            layer.k_cache = _ptr(k[i])
            layer.v_cache = _ptr(v[i])
            if bool(layer.cross_norm) != (i in memory_layers):
                return False
        memory = self._compacted(memory_kv) if compact else list(memory_kv)
        for (mk, mv), i in zip(memory, memory_layers):
            self._layers[i].mem_k = _ptr(mk)
            self._layers[i].mem_v = _ptr(mv)
        self._struct.max_len = max_len
        self._struct.stm = cfg.stm_size
        self._struct.cache_row = k.stride(1)
        self._struct.mem_row = memory[0][0].stride(0)
        self._struct.mem_bf16 = int(memory[0][0].dtype == torch.bfloat16)
        self._struct.n_rows = min(rows, *(t.shape[0] for pair in memory_kv for t in pair))
        self._buffers_key = key
        self._keep = [k, v, *[t for pair in memory for t in pair]]
        return True

    def _compacted(self, memory_kv: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """bf16 copies of the memory keys/values, each head transposed to (head_dim, slots) so that
        the C step runs along the slots (decode_step.c's attend_t); kept between steps and copied
        again whenever the originals were written (a join, a leave)."""
        rows, heads, slots, hd = memory_kv[0][0].shape
        shape = (rows, heads, hd, slots)
        if len(self._compact) != len(memory_kv) or tuple(self._compact[0][0].shape) != shape:
            self._compact = [
                (torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)) for _ in memory_kv
            ]
        for (ck, cv), (mk, mv) in zip(self._compact, memory_kv):
            ck.copy_(mk.transpose(2, 3))
            cv.copy_(mv.transpose(2, 3))
        return self._compact

    def step(
        self, tokens: Tensor, positions: Tensor, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
    ) -> Tensor | None:
        """Logits (B, V) like :meth:`RxTModel.decode_step`, or None when the C step does not apply."""
        n = tokens.shape[0]
        if n > max_rows(self.model) or tokens.dtype != torch.long or positions.dtype != torch.long:
            return None
        tokens, positions = tokens.contiguous(), positions.contiguous()
        logits = torch.empty(n, self.model.config.vocab_size)
        ok = self._call(n, tokens, positions, None, None, logits, memory_kv, cache, needed_rows=n)
        return logits if ok else None

    def prefill(
        self, prompts: Sequence[Sequence[int]], memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
    ) -> Tensor | None:
        """Logits (B, V) of each prompt's last token, like :meth:`RxTModel.prefill`: prompt ``i``
        fills cache row ``i`` from position 0 against memory row ``i``. None when the C step does
        not apply.

        The prompts' tokens go through the step :func:`prefill_chunk` at a time, so each chunk
        reads the weights once for all its tokens; a chunk's tokens attend to the positions the
        cache already holds and to each other causally (the step writes a layer's keys/values
        for every token before it attends).
        """
        flat = [t for p in prompts for t in p]
        tokens = torch.tensor(flat, dtype=torch.long)
        positions = torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long)
        rows = torch.tensor([r for r, p in enumerate(prompts) for _ in p], dtype=torch.long)
        ends, end = [], -1
        for p in prompts:
            end += len(p)
            ends.append(end)
        logits = torch.empty(len(prompts), self.model.config.vocab_size)
        done = 0
        chunk = prefill_chunk(self.model)
        for start in range(0, len(flat), chunk):
            stop = min(start + chunk, len(flat))
            outs = torch.tensor([e - start for e in ends if start <= e < stop], dtype=torch.long)
            sl = slice(start, stop)
            if not self._call(
                stop - start, tokens[sl], positions[sl], rows[sl], outs, logits[done:], memory_kv, cache,
                needed_rows=len(prompts), prompt=True,
            ):  # fmt: skip
                return None
            done += len(outs)
        return logits

    def _call(
        self,
        n: int,
        tokens: Tensor,
        positions: Tensor,
        rows: Tensor | None,
        out_rows: Tensor | None,
        logits: Tensor,
        memory_kv: Sequence[tuple[Tensor, Tensor]],
        cache: KVCache,
        needed_rows: int,
        prompt: bool = False,
    ) -> bool:
        """One call into the C step (weights and buffers bound first); False when it does not apply.
        ``prompt``: the tokens are a prompt's, which RoPE rotates at their own positions (the
        torch prefill's, RxLM's); only tokens fed one at a time after it take the model's
        ``step_position_offset`` (RxLM's ``interact``: 1)."""
        fmt = self.model.weight_format
        # One call at a time per model: the struct points at one batch's buffers during a call,
        # and two decode batches of the same model may step from two threads.
        with self._lock:
            if not self._bound(fmt) or not self._bind_buffers(needed_rows, memory_kv, cache):
                return False
            struct = self._struct
            assert struct is not None
            struct.row_block = rows_per_pass(self.model)
            struct.rope_offset = 0 if prompt else self.model.config.decoder.step_position_offset
            struct.attend_old = int(old_attention())
            code = library().rxt_decode_rows(
                ctypes.byref(struct), n, tokens.data_ptr(), positions.data_ptr(),
                None if rows is None else rows.data_ptr(),
                n if out_rows is None else len(out_rows),
                None if out_rows is None or len(out_rows) == 0 else out_rows.data_ptr(),
                logits.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        if code == -1:
            raise IndexError("a token id, position or row is out of range for this model's decode step")
        if code != 0:
            raise RuntimeError(f"the C decode step failed (code {code})")
        return True


_decoders: weakref.WeakKeyDictionary[StepModel, NativeDecoder] = weakref.WeakKeyDictionary()


def decode_step(
    model: StepModel, tokens: Tensor, positions: Tensor, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
) -> Tensor | None:
    """The C step for ``model`` (see :class:`NativeDecoder`), or None when it does not apply."""
    if tokens.shape[0] > max(MAX_ROWS, MULTI_ROW_MAX_ROWS) or tokens.device.type != "cpu":
        return None  # (the decoder checks the model's own limit)
    decoder = _decoder_for(model)
    return None if decoder is None else decoder.step(tokens, positions, memory_kv, cache)


def prefill(
    model: StepModel, prompts: Sequence[Sequence[int]], memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
) -> Tensor | None:
    """The C step's prefill for ``model`` (see :meth:`NativeDecoder.prefill`), or None when it
    does not apply."""
    decoder = _decoder_for(model)
    return None if decoder is None else decoder.prefill(prompts, memory_kv, cache)


def prepare(model: StepModel, release_experts: bool = True) -> int:
    """Bind the C step to ``model`` now, and (``release_experts``) drop the float32 tables of
    its routed experts where the step holds int8 or bf16 copies of them; bytes freed.

    Those tables are most of a large MoE model (RxT-Beta: 10.9 GB of float32 beside 3.1 GB of
    int8), and the copies hold exactly their values (quantize.py rounded the tables to them), so
    the float32 ones are a second copy. Afterwards the torch paths (long prefills, batches beyond
    the C step's rows) unpack each routed expert from the copies as they run it: the same
    numbers, slower. Saving or training the model is refused (reload it). A model the C step
    does not run, or float32 weights, keep everything (0 bytes).
    """
    decoder = _decoder_for(model)
    if decoder is None:
        return 0
    model.use_decode_layout()  # as the first decode batch would (idempotent): the layout the step reads
    if not decoder.bind() or not release_experts:
        return 0
    return decoder.release_experts()


def _decoder_for(model: StepModel) -> NativeDecoder | None:
    """``model``'s bound C step (made on first use), or None when the C step is off, cannot be
    built, or does not cover the model's layout.

    The bound decoder lives in a side table, not on the model, so deep copies and pickles of the
    model never meet the C structs.
    """
    if not enabled():
        return None
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = NativeDecoder(model)
    return None if decoder.layout_reason is not None else decoder


def not_used_reason(model: StepModel) -> str | None:
    """Why decode steps of ``model`` would not run the C step (None: they would)."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or not model.native_decode:
        return "not a float32 CPU model, or turned off"
    return unavailable_reason() or layout_reason(model)
