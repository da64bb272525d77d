"""Writing a compact model directory: the trained tensors only, the backbone by reference.

:func:`save_compact` turns a full model directory of a model trained around a GGUF backbone
into the form :mod:`.backbone_store` reads back (``rxrt convert --compact``): each tensor equal,
bit for bit, to the dequantized backbone's is left out (:func:`compact_tensors`), the others are
kept in the chosen dtype, and ``config.json`` names the GGUF by file, size and SHA-256. Loading
the result gives the full directory's tensors (tests/test_backbone_store.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .backbone_gguf import SMOLLM2_FILE, SMOLLM2_SHA256, backbone_state, fetch_smollm2
from .backbone_store import BACKBONE_KEY, DTYPES, Q8_SCALES, BackboneRef, dequantize, file_sha256
from .checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_config, resolve_model_dir
from .config import RxTConfig
from .errors import BackboneUnavailableError, CheckpointMismatchError
from .quantize import pack_int8, rounded_matrix_names
from .rxt import RxTModel
from .weights_file import load_weights, write_weights

KEPT_DTYPES = ("bfloat16", "float32", "int8")
"""How :func:`save_compact` may store the trained tensors. ``int8``: each matrix the int8 runtime
rounds (:func:`~.quantize.rounded_matrix_names`) as its q8_0 values plus float32 scales under
``NAME`` + :data:`Q8_SCALES`, the rest (norms, gates, the STM's start) in float32: what the CPU
path computes with, in about 1.1 bytes per parameter."""


def pack_stored(config: RxTConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` as an ``int8`` compact directory stores them (:data:`KEPT_DTYPES`)."""
    with torch.device("meta"):
        names = rounded_matrix_names(RxTModel(config))
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name in names and tensor.is_floating_point():
            out[name], out[name + Q8_SCALES] = pack_int8(tensor)
        else:
            out[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return out


def compact_tensors(
    config: RxTConfig, state: dict[str, Tensor], backbone: dict[str, Tensor], where: Path
) -> tuple[dict[str, Tensor], str]:
    """``(kept, dtype)``: the tensors of ``state`` that are not the backbone's, and the dtype of
    those that are. A tensor is left out when the backbone provides one of its name and shape
    whose values, cast to its dtype, are equal to it, bit for bit; everything else is kept."""
    base = backbone_state(config, backbone)
    kept: dict[str, Tensor] = {}
    dropped: set[torch.dtype] = set()
    for name, tensor in state.items():
        ref = base.get(name)
        if ref is not None and ref.shape == tensor.shape and torch.equal(tensor, ref.to(tensor.dtype)):
            dropped.add(tensor.dtype)
        else:
            kept[name] = tensor
    if not dropped:
        raise CheckpointMismatchError(where, "no tensor equals the backbone's: not a model trained around it")
    names = {v: k for k, v in DTYPES.items()}
    if len(dropped) > 1 or next(iter(dropped)) not in names:
        raise CheckpointMismatchError(where, f"the backbone's tensors are stored in {sorted(map(str, dropped))}")
    return kept, names[next(iter(dropped))]


@dataclass(frozen=True)
class CompactReport:
    """What :func:`save_compact` wrote."""

    kept: int
    left_out: int
    kept_parameters: int
    weights_bytes: int
    backbone: BackboneRef


def save_compact(
    source: str | Path, destination: str | Path, gguf: str | Path | None = None, dtype: str | None = "bfloat16"
) -> CompactReport:
    """Write ``source`` (a full model directory of a model built around a GGUF backbone) as a
    compact directory at ``destination``: ``config.json`` with the backbone's reference,
    ``model.safetensors`` with the trained tensors only (in ``dtype``, one of :data:`KEPT_DTYPES`;
    None keeps theirs) and
    ``tokenizer.json``. ``gguf``: the backbone's GGUF (default: SmolLM2's, from the cache or
    fetched)."""
    src = resolve_model_dir(source)
    dst = Path(destination)
    if dtype is not None and dtype not in KEPT_DTYPES:
        raise ValueError(f"dtype must be one of {list(KEPT_DTYPES)} or None, got {dtype!r}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("the compact directory must differ from the source")
    raw = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    if BACKBONE_KEY in raw:
        raise CheckpointMismatchError(src / CONFIG_FILE, "already a compact directory")
    config = load_config(src)
    gguf_path = Path(gguf) if gguf is not None else fetch_smollm2()
    if not gguf_path.is_file():
        raise BackboneUnavailableError(gguf_path, "no such GGUF file")
    sha = file_sha256(gguf_path)
    state = load_weights(src / WEIGHTS_FILE)
    kept, backbone_dtype = compact_tensors(config, state, dequantize(gguf_path), src / WEIGHTS_FILE)
    kept_count, kept_parameters = len(kept), sum(t.numel() for t in kept.values())
    if dtype == "int8":
        kept = pack_stored(config, kept)
    elif dtype is not None:
        kept = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in kept.items()}
    smollm2 = gguf_path.name == SMOLLM2_FILE and sha == SMOLLM2_SHA256
    ref = BackboneRef(
        source="smollm2" if smollm2 else "file",
        file=gguf_path.name,
        sha256=sha,
        size=gguf_path.stat().st_size,
        dtype=backbone_dtype,
    )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_FILE).write_text(
        json.dumps({**config.to_dict(), BACKBONE_KEY: ref.to_dict()}, indent=2) + "\n", encoding="utf-8"
    )
    write_weights({k: v.contiguous() for k, v in kept.items()}, dst / WEIGHTS_FILE)
    if (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    return CompactReport(
        kept=kept_count,
        left_out=len(state) - kept_count,
        kept_parameters=kept_parameters,
        weights_bytes=(dst / WEIGHTS_FILE).stat().st_size,
        backbone=ref,
    )
