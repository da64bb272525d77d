"""One safetensors weights file, as rxruntime writes and reads it.

Written atomically with the SHA-256 of its tensor bytes in the header metadata; read back with
that digest checked (a flipped bit is a :class:`~.errors.CorruptCheckpointError` naming the
file), a group of tensors per opening of the file, each tensor's data aligned. Safetensors only:
nothing is ever unpickled. Model directories (:mod:`.checkpoint`) and the backbone cache
(:mod:`.backbone_store`) both keep their tensors this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CorruptCheckpointError, MissingCheckpointFileError

_DIGEST_KEY = "rxruntime.sha256"


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file whose header carries the SHA-256 of its tensor bytes (checked
    on load), atomically: a reader never sees half a file."""
    # Write twice: once to learn the tensor bytes' digest, once with it in the header metadata.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp))
        digest = _data_digest(tmp)
        save_file(tensors, str(tmp), metadata={"format": "pt", _DIGEST_KEY: digest})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors header (names, dtypes, shapes), without the data."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(path, "too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(path, f"safetensors header is not valid JSON ({exc})") from exc
    return {k: v for k, v in header.items() if k != "__metadata__"}


def load_weights(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into a CheckpointError about ``path``."""
    if not path.is_file():
        raise MissingCheckpointFileError(path, "missing weights file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(path, f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                path, f"header claims {header_len} bytes but the file has only {size - 8} after it (truncated?)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(path, f"safetensors header is not valid JSON ({exc})") from exc
    metadata = header.get("__metadata__") or {}
    expected = metadata.get(_DIGEST_KEY)
    if verify and expected is not None:
        actual = _data_digest(path)
        if actual != expected:
            raise CorruptCheckpointError(
                path, f"tensor data does not match its SHA-256 (expected {expected[:12]}..., got {actual[:12]}...)"
            )
    try:
        tensors = {}
        for group in _read_groups(header):  # the file mapped a part at a time (see _read_groups)
            with safe_open(str(path), framework="pt") as f:
                for key in group:
                    tensors[key] = _aligned(f.get_tensor(key))
                if not group:
                    f.keys()  # an empty file still has its header checked by safetensors
    except Exception as exc:  # SafetensorError and friends
        raise CorruptCheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    return tensors


READ_GROUP_BYTES = 256 * 2**20
"""Tensor bytes read through one opening of a safetensors file (see :func:`_read_groups`)."""


def _read_groups(header: dict[str, Any]) -> list[list[str]]:
    """The header's tensor names in file order, in groups of about ``READ_GROUP_BYTES``.

    safetensors maps the whole file and the pages each tensor is copied from stay resident
    until the file is closed: read in one opening, a checkpoint costs twice its size in resident
    memory at the end of the read (RxT-Beta: 11.7 GiB for a 5.9 GB file). Reopening it per group
    keeps that to the copies plus one group."""
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    try:
        entries.sort(key=lambda kv: int(kv[1]["data_offsets"][0]))
        sizes = [int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for _, v in entries]
    except (TypeError, KeyError, ValueError, IndexError):  # malformed: safetensors will say how
        return [[k for k, _ in entries]]
    groups: list[list[str]] = [[]]
    held = 0
    for (key, _), size in zip(entries, sizes, strict=True):
        if held and held + size > READ_GROUP_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += size
    return groups


ALIGNMENT = 64
"""Bytes every loaded tensor's data is aligned to (an AVX-512 vector)."""


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied where its data does not start on an ``ALIGNMENT``-byte boundary.

    A tensor read from a file starts wherever the file put it, and CPU matmul kernels take other
    paths (another summation order) for unaligned data: the same weights loaded from two files
    then give results a few ulps apart. Torch's own allocations are aligned, so a copy makes the
    numbers a function of the weights alone."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def _data_digest(path: Path) -> str:
    """SHA-256 of the bytes after the safetensors header (the tensors themselves)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
