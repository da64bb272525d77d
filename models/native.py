"""The decode step in C for CPUs: build ``csrc/decode_step.c`` once, bind it, check the layouts.

A batch-1 decode step on a CPU is bound by reading weights, and eager torch reads them on about
one core's bandwidth (its one-row products do not spread over threads) while dispatching ~300
small operations. The C step does the whole decoder step in one call and splits every large read
across the threads, so all cores stream weights at once (docs/benchmarks.md §5 has the numbers).
It is an optional fast path, like flash-attn on a GPU: it is used only when

* a C compiler with OpenMP is present (``$CC``, else ``cc``) and ``RXRT_NATIVE`` is not ``0``;
* the model is float32 on the CPU, in decode layout, with at most :data:`MAX_ROWS` rows a step;
* the cache and memory keys/values have the layouts the C code indexes.

Otherwise :meth:`RxTModel.decode_step` runs the torch step, which computes the same function
(tests/test_native.py compares them). The shared library is compiled with ``-march=native``
into ``$RXRT_CACHE_DIR`` (default ``~/.cache/rxruntime``), keyed by the source, the compiler
and the CPU, and linked against the OpenMP runtime torch already loaded, so the C step and torch
share one thread pool instead of two pools spinning against each other on the same cores.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .cache import KVCache
from .quantize import BLOCK, WeightFormat, quantize_int8

if TYPE_CHECKING:
    from .rxt import RxTModel

_ROPE_MODES = {"half": 0, "adjacent": 1, "adjacent-split": 2}

MAX_ROWS = 16
"""Rows per step up to which the C step runs. Beyond it torch's matrix products, which reuse each
weight across rows from cache, win (alpha-mini, 2 cores: 1.3x faster at 16 rows, 0.93x at 32)."""

PREFILL_CHUNK = 64
"""Prompt tokens per C-step call in :meth:`NativeDecoder.prefill` (each call reads the weights once)."""

PREFILL_MAX_TOKENS = 64
"""Prefills of up to this many tokens (all prompts of a join together) run in C, longer ones in
torch: the C step multiplies row by row, torch's batched products win once the weights are
reused enough (int8 alpha-mini, 2 threads: one 35-token prompt 35 ms against torch's 60; 120
tokens 108 against 111; four 35-token prompts 135 against 122)."""

_SOURCE = Path(__file__).with_name("csrc") / "decode_step.c"
_P = ctypes.c_void_p
_WEIGHT_TYPES = {"fp32": 0, "bf16": 1, "int8": 2}


class _Mat(ctypes.Structure):
    """A weight matrix as the C step reads it: data, row stride (int8: padded columns), format,
    and (int8) the rows per segment that blocks restart at."""

    _fields_ = [("w", _P), ("ld", ctypes.c_int64), ("type", ctypes.c_int64), ("seg", ctypes.c_int64)]


_MATS = ["qkv", "o", "cq", "co", "w_in", "w_out"]
_VECTORS = ["self_norm", "qkv_bias", "o_bias", "cross_norm", "cq_bias", "co_bias", "ffn_norm", "router"]
_VECTORS += ["b_in", "b_out"]


class _Layer(ctypes.Structure):
    _fields_ = [
        *[(name, _Mat) for name in _MATS],
        *[(name, _P) for name in [*_VECTORS, "k_cache", "v_cache", "mem_k", "mem_v"]],
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
            ]
        ],
        ("eps", ctypes.c_float),
        ("lm_head", _Mat),
        *[(name, _P) for name in ["embedding", "final_norm", "cos", "sin", "head_bias"]],
        ("layers", ctypes.POINTER(_Layer)),
    ]


class NativeUnavailable(RuntimeError):
    """The C step cannot be built or loaded here (the message says why)."""


log = logging.getLogger(__name__)
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL] = {}
_failures: dict[str, str] = {}


def cache_dir() -> Path:
    root = os.environ.get("RXRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rxruntime")
    return Path(root) / "native"


def variant() -> str:
    """Which build the C step runs (``RXRT_NATIVE_ISA``): ``"native"`` (vector code for this CPU,
    the default), ``"avx2"`` (the AVX2 code even on an AVX-512 CPU) or ``"scalar"`` (plain loops,
    no vector instructions at all), so every fallback can be checked on one machine."""
    which = os.environ.get("RXRT_NATIVE_ISA", "native")
    return which if which in ("avx2", "scalar") else "native"


def _openmp_runtime() -> Path | None:
    """The OpenMP runtime bundled with torch, if any (linked so both share one thread pool)."""
    lib = Path(torch.__file__).parent / "lib"
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        if (lib / name).exists():
            return lib / name
    return None


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
    runtime = _openmp_runtime()
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-Wall"]
    if which == "scalar":
        flags += ["-DRXRT_SCALAR", "-fno-tree-vectorize"]
    elif which == "avx2":  # an AVX2 + FMA CPU without AVX-512 (Haswell's set), for the tests
        flags[1] = "-march=haswell"
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


def _mat(matrix: Tensor, weights: WeightFormat, keep: list[Tensor], seg: int | None = None) -> _Mat:
    """``matrix`` (rows, cols), input-major with unit column stride, as a :class:`_Mat` of the
    format: float32 in place (its row stride as ``ld``), a contiguous bf16 copy of the whole rows,
    or the packed int8 copy of exactly these columns (:func:`pack_int8`, blocks restarting every
    ``seg`` rows, default all); ``keep`` holds the copies alive while the struct points at them."""
    rows, cols, ld = matrix.shape[0], matrix.shape[1], matrix.stride(0)
    if weights == "fp32":
        return _Mat(matrix.data_ptr(), ld, _WEIGHT_TYPES["fp32"], rows)
    if weights == "bf16":
        copy = matrix.as_strided((rows, ld), (ld, 1)).to(torch.bfloat16).contiguous()
        keep.append(copy)
        return _Mat(copy.data_ptr(), ld, _WEIGHT_TYPES["bf16"], rows)
    packed = pack_int8(matrix, seg or rows)
    keep.append(packed)
    return _Mat(packed.data_ptr(), -(-cols // _TILE) * _TILE, _WEIGHT_TYPES["int8"], seg or rows)


def _input_major(weight: Tensor, rows: int, cols: int) -> int | None:
    """Row stride of ``weight.t()`` as a (rows, cols) input-major matrix, or None."""
    t = weight.t()
    if tuple(t.shape) != (rows, cols) or t.stride(1) != 1 or t.stride(0) < cols:
        return None
    return t.stride(0)


def layout_reason(model: RxTModel) -> str | None:
    """Why the C step does not cover this model's decoder layout (None when it does).

    The C code computes RMSNorm blocks, any RoPE pairing and position offset, every layer a
    memory layer with a SwiGLU MoE (per-expert biases allowed, no global bias or shared experts),
    an optional RMSNorm before an optionally biased LM head: our layout and RxLM 0.2's RxT-Alpha
    layout. Anything else runs the torch step.
    """
    c = model.config
    d = c.decoder
    checks = [
        (not c.layer_norm, "layer_norm=True"),
        (d.attention_gate == d.cross_attention_gate == "none", "gated attention"),
        (d.ffn_gated and d.ffn_activation == "silu", "a feed-forward other than SwiGLU"),
        (d.final_norm in ("rms", "none"), f"decoder.final_norm={d.final_norm!r}"),
        (d.use_moe, "decoder.use_moe=False"),
        (not d.layers_before and not d.layers_after, "stateless decoder layers"),
        (d.expert_bias_mode in ("none", "local"), f"decoder.expert_bias_mode={d.expert_bias_mode!r}"),
        (d.num_shared_experts == 0, f"decoder.num_shared_experts={d.num_shared_experts}"),
        (d.router_dtype == "float32", f"decoder.router_dtype={d.router_dtype!r}"),
        (
            d.self_q_heads >= d.self_kv_heads and d.cross_q_heads >= d.cross_kv_heads,
            "reversed SQA (fewer query than key/value heads)",
        ),
    ]
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
        if fmt != "fp32":  # the compact copies must follow in-place edits (float32 is read in place)
            key += tuple(0 if t is None else t._version for t in tensors)
        return key


class NativeDecoder:
    """The C step bound to one model's weights; see the module docstring.

    :meth:`step` returns None (and the caller runs the torch step) whenever something does not
    have the layout the C code indexes; it never guesses.
    """

    def __init__(self, model: RxTModel) -> None:
        self._model = weakref.ref(model)  # held in a side table keyed by the model: no cycle
        self._weights: list[Tensor | None] = []
        self._watch = _Watch()
        self._weight_key: tuple[object, ...] | None = None
        """``self._watch.key`` when the weights were bound: the copies are current while it holds."""
        self._copies: list[Tensor] = []
        self._buffers_key: tuple[object, ...] = ()
        self._struct: _Model | None = None
        self._layers: ctypes.Array[_Layer] | None = None
        self._keep: list[Tensor] = []
        self._lock = threading.Lock()
        self.layout_reason = layout_reason(model)
        """Why this model's layout runs the torch step instead (None: the C step covers it)."""

    @property
    def model(self) -> RxTModel:
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this NativeDecoder is gone")
        return model

    def _collect(self) -> list[Tensor | None]:
        """Every tensor the C step reads, in a fixed order; also records in ``self._watch`` where
        each one lives, so that later steps can check cheaply that none moved.

        Reads the modules' ``_parameters`` and ``_modules`` dicts directly: ``nn.Module``'s
        attribute lookup would cost more than the rest of the step's Python together.
        """
        w = self._watch = _Watch()
        m: Any = self.model  # the private dicts are untyped
        dec = w.child(m, "decoder")
        head = w.child(dec, "lm_head")
        rope = w.child(dec, "rope")
        norm = w.child(dec, "norm")
        out: list[Tensor | None] = [
            w.tensor(w.child(m, "embedding")._parameters, "weight"),
            None if norm is None else w.tensor(norm._parameters, "weight"),
            w.tensor(head._parameters, "weight"),
            w.tensor(rope._buffers, "cos"),
            w.tensor(rope._buffers, "sin"),
            w.tensor(head._parameters, "bias"),
        ]
        layers = w.child(dec, "layers")
        w.sizes.append((layers._modules, len(layers._modules)))
        for name in list(layers._modules):
            layer = w.child(layers, name)
            attn, cross, ffn = w.child(layer, "self_attn"), w.child(layer, "cross_attn"), w.child(layer, "ffn")
            o, co = w.child(attn, "o_proj")._parameters, w.child(cross, "o_proj")._parameters
            out += [
                w.tensor(w.child(layer, "self_norm")._parameters, "weight"),
                *w.fused(attn),
                w.tensor(o, "weight"),
                w.tensor(o, "bias"),
                w.tensor(w.child(layer, "cross_norm")._parameters, "weight"),
                *w.fused(cross),
                w.tensor(co, "weight"),
                w.tensor(co, "bias"),
                w.tensor(w.child(layer, "ffn_norm")._parameters, "weight"),
                w.tensor(w.child(ffn, "router")._parameters, "weight"),
                w.tensor(ffn._parameters, "w_in"),
                w.tensor(ffn._parameters, "w_out"),
                w.tensor(ffn._parameters, "b_in"),
                w.tensor(ffn._parameters, "b_out"),
            ]
        return out

    def _bind_weights(self, weights: list[Tensor | None], fmt: WeightFormat) -> bool:
        """Fill the C structs from the weights (copied to ``fmt`` unless it is fp32); False when a
        layout is not the expected one."""
        m = self.model
        cfg, d = m.config, m.config.decoder
        dim, hd = cfg.dim, cfg.dim // d.num_heads
        present = [w for w in weights if w is not None]
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in present):
            return False
        emb, final_norm, head, cos, sin, head_bias = weights[:6]
        assert emb is not None and head is not None and cos is not None and sin is not None
        ld_head = _input_major(head, dim, cfg.vocab_size)
        if ld_head is None or not (emb.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()) or hd > 512:
            return False
        norms: list[Any] = [layer.self_norm for layer in m.decoder.blocks]
        norms += [layer.ffn_norm for layer in m.decoder.blocks] + [layer.cross_norm for layer in m.decoder.blocks]
        if m.decoder.norm is not None:
            norms.append(m.decoder.norm)
        if not all(isinstance(n, torch.nn.RMSNorm) for n in norms):
            return False
        # eps None is torch's default for the dtype, which F.rms_norm uses: the same number here.
        eps = {torch.finfo(torch.float32).eps if n.eps is None else n.eps for n in norms}
        if len(eps) != 1:
            return False
        if head_bias is not None and not head_bias.is_contiguous():
            return False
        qkv_cols = (d.self_q_heads + 2 * d.self_kv_heads) * hd
        h = d.expert_ffn_dim
        planned: list[tuple[list[Tensor], list[int | None]]] = []
        for i in range(cfg.num_layers):
            sn, qkv, qkv_b, o, o_b, cn, cq, cq_b, co, co_b, fn, router, w_in, w_out, b_in, b_out = weights[
                6 + 16 * i : 22 + 16 * i
            ]
            if qkv is None or cq is None:
                return False  # not in decode layout (or the fused weights were replaced)
            assert sn is not None and o is not None and cn is not None and co is not None and fn is not None
            assert router is not None and w_in is not None and w_out is not None
            lq = _input_major(qkv.t(), dim, qkv_cols)
            lc = _input_major(cq.t(), dim, (d.cross_q_heads + 2 * d.cross_kv_heads) * hd)
            lo = _input_major(o, d.self_q_heads * hd, dim)
            lco = _input_major(co, d.cross_q_heads * hd, dim)
            if lq is None or lc is None or lo != dim or lco != dim:
                return False
            if w_in.stride() != (2 * h * dim, 1, 2 * h) or w_out.stride() != (h * dim, 1, dim):
                return False
            if not (router.is_contiguous() and sn.is_contiguous() and cn.is_contiguous() and fn.is_contiguous()):
                return False
            if any(b is not None and not b.is_contiguous() for b in (b_in, b_out)):
                return False
            experts = d.num_experts
            mats = [
                qkv,
                cq[:, : d.cross_q_heads * hd],  # the query columns: the step reads only those
                o.t(),
                co.t(),
                w_in.transpose(1, 2).reshape(experts * dim, 2 * h),  # views: both are contiguous
                w_out.transpose(1, 2).reshape(experts * h, dim),
            ]
            planned.append((mats, [_ptr(t) for t in (sn, qkv_b, o_b, cn, cq_b, co_b, fn, router, b_in, b_out)]))
        keep: list[Tensor] = []
        layers = (_Layer * cfg.num_layers)()
        for i, (mats, vectors) in enumerate(planned):
            qkv_m, cq_m, o_m, co_m = (_mat(t, fmt, keep) for t in mats[:4])
            in_m, out_m = _mat(mats[4], fmt, keep, seg=dim), _mat(mats[5], fmt, keep, seg=h)
            layers[i] = _Layer(qkv_m, o_m, cq_m, co_m, in_m, out_m, *vectors)
        self._struct = _Model(
            n_layers=cfg.num_layers, dim=dim, head_dim=hd, hq=d.self_q_heads, hkv=d.self_kv_heads,
            cq=d.cross_q_heads, ckv=d.cross_kv_heads, n_experts=d.num_experts, top_k=d.experts_per_token,
            hidden=d.expert_ffn_dim, vocab=cfg.vocab_size, n_positions=cos.shape[0],
            rope_mode=_ROPE_MODES[cfg.rope_pairing], rope_offset=d.step_position_offset, eps=float(eps.pop()),
            lm_head=_mat(head.t(), fmt, keep), embedding=_ptr(emb), final_norm=_ptr(final_norm), cos=_ptr(cos),
            sin=_ptr(sin), head_bias=_ptr(head_bias), layers=layers,
        )  # fmt: skip
        self._layers = layers
        self._copies = keep
        self._buffers_key = ()
        return True

    def _bind_buffers(self, n: int, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache) -> bool:
        """Point the layers at this step's cache and memory keys/values (when they moved); False
        when they do not hold ``n`` rows or are not laid out as the C step reads them."""
        assert self._struct is not None and self._layers is not None
        if not self._bind_layout(memory_kv, cache):
            return False
        return n <= self._struct.n_rows

    def _bind_layout(self, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache) -> bool:
        assert self._struct is not None and self._layers is not None
        d = self.model.config.decoder
        k, v = cache.k, cache.v
        key: tuple[object, ...] = (
            k.data_ptr(), v.data_ptr(), k.shape, k.stride(), v.stride(),
            tuple((mk.data_ptr(), mv.data_ptr(), mk.shape, mk.stride(), mv.stride()) for mk, mv in memory_kv),
        )  # fmt: skip
        if key == self._buffers_key:
            return True
        cfg = self.model.config
        layers, rows, kv_heads, max_len, hd = k.shape
        contiguous = (kv_heads * max_len * hd, max_len * hd, hd, 1)
        if (
            layers != cfg.num_layers
            or kv_heads != d.self_kv_heads
            or k.dtype != torch.float32
            or v.dtype != torch.float32
            or k.stride()[2:] != contiguous[1:]
            or v.stride() != k.stride()
            or len(memory_kv) != cfg.num_layers
        ):
            return False
        mem_row = memory_kv[0][0].stride(0)
        mem_shape = (d.cross_kv_heads, cfg.stm_size, hd)
        for mk, mv in memory_kv:
            for t in (mk, mv):
                if (
                    t.dtype != torch.float32
                    or tuple(t.shape[1:]) != mem_shape
                    or t.stride() != (mem_row, cfg.stm_size * hd, hd, 1)
                ):
                    return False
        for i in range(cfg.num_layers):
            layer = self._layers[i]
            layer.k_cache = _ptr(k[i])
            layer.v_cache = _ptr(v[i])
            layer.mem_k = _ptr(memory_kv[i][0])
            layer.mem_v = _ptr(memory_kv[i][1])
        self._struct.max_len = max_len
        self._struct.stm = cfg.stm_size
        self._struct.cache_row = k.stride(1)
        self._struct.mem_row = mem_row
        self._struct.n_rows = min(rows, *(t.shape[0] for pair in memory_kv for t in pair))
        self._buffers_key = key
        self._keep = [k, v, *[t for pair in memory_kv for t in pair]]
        return True

    def step(
        self, tokens: Tensor, positions: Tensor, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
    ) -> Tensor | None:
        """Logits (B, V) like :meth:`RxTModel.decode_step`, or None when the C step does not apply."""
        n = tokens.shape[0]
        if n > MAX_ROWS or tokens.dtype != torch.long or positions.dtype != torch.long:
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

        The prompts' tokens go through the step :data:`PREFILL_CHUNK` at a time, so each chunk
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
        for start in range(0, len(flat), PREFILL_CHUNK):
            stop = min(start + PREFILL_CHUNK, len(flat))
            outs = torch.tensor([e - start for e in ends if start <= e < stop], dtype=torch.long)
            sl = slice(start, stop)
            if not self._call(
                stop - start, tokens[sl], positions[sl], rows[sl], outs, logits[done:], memory_kv, cache,
                needed_rows=len(prompts),
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
    ) -> bool:
        """One call into the C step (weights and buffers bound first); False when it does not apply."""
        fmt = self.model.weight_format
        # One call at a time per model: the struct points at one batch's buffers during a call,
        # and two decode batches of the same model may step from two threads.
        with self._lock:
            watched = self._watch.key(fmt)
            if watched is None or watched != self._weight_key:  # something moved: bind again
                weights = self._collect()
                self._struct = None
                self._weights, self._weight_key = weights, self._watch.key(fmt)
                if not self._bind_weights(weights, fmt):
                    return False  # and False again, without re-checking, until the weights move
            if self._struct is None or not self._bind_buffers(needed_rows, memory_kv, cache):
                return False
            code = library().rxt_decode_rows(
                ctypes.byref(self._struct), n, tokens.data_ptr(), positions.data_ptr(),
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


_decoders: weakref.WeakKeyDictionary[RxTModel, NativeDecoder] = weakref.WeakKeyDictionary()


def decode_step(
    model: RxTModel, tokens: Tensor, positions: Tensor, memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
) -> Tensor | None:
    """The C step for ``model`` (see :class:`NativeDecoder`), or None when it does not apply."""
    if tokens.shape[0] > MAX_ROWS or tokens.device.type != "cpu":
        return None
    decoder = _decoder_for(model)
    return None if decoder is None else decoder.step(tokens, positions, memory_kv, cache)


def prefill(
    model: RxTModel, prompts: Sequence[Sequence[int]], memory_kv: Sequence[tuple[Tensor, Tensor]], cache: KVCache
) -> Tensor | None:
    """The C step's prefill for ``model`` (see :meth:`NativeDecoder.prefill`), or None when it
    does not apply."""
    decoder = _decoder_for(model)
    return None if decoder is None else decoder.prefill(prompts, memory_kv, cache)


def _decoder_for(model: RxTModel) -> NativeDecoder | None:
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


def not_used_reason(model: RxTModel) -> str | None:
    """Why decode steps of ``model`` would not run the C step (None: they would)."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or not model.native_decode:
        return "not a float32 CPU model, or turned off"
    return unavailable_reason() or layout_reason(model)
