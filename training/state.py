"""The resumable training state: one safetensors file, written atomically.

It holds the model (float32), the training-only MLM head, the current stage's AdamW moments and a
JSON ``progress`` record (stage, step, losses so far, the recipe's fingerprint) in the header
metadata. Nothing is pickled: optimizer state is split into its tensors (``optim.<i>.<name>``)
and its plain-number settings (JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rxruntime.models.errors import CheckpointError, CorruptCheckpointError, MissingCheckpointFileError

STATE_FILE = "train-state.safetensors"
_PROGRESS_KEY = "rxruntime.progress"
_GROUPS_KEY = "rxruntime.optim_groups"


def save_state(
    path: Path,
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    progress: dict[str, Any],
) -> None:
    """Write model + head + optimizer + progress to ``path`` (replace, never half-write)."""
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({f"mlm_head.{k}": v.detach().contiguous().clone() for k, v in head.state_dict().items()})
    metadata = {_PROGRESS_KEY: json.dumps(progress)}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for index, entry in sd["state"].items():
            for name, value in entry.items():
                tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().contiguous().clone()
        metadata[_GROUPS_KEY] = json.dumps(sd["param_groups"])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_progress(path: Path) -> dict[str, Any]:
    """Only the JSON progress record of a state file."""
    if not path.is_file():
        raise MissingCheckpointFileError(path, "no training state to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise CorruptCheckpointError(path, f"not a readable training state ({exc})") from exc
    if _PROGRESS_KEY not in metadata:
        raise CorruptCheckpointError(path, "no progress record in the training state")
    return dict(json.loads(metadata[_PROGRESS_KEY]))


def load_state(path: Path, model: nn.Module, head: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model and head in place; return (progress, optimizer state dict or None)."""
    progress = read_progress(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    for prefix, module in (("model.", model), ("mlm_head.", head)):
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(path, f"training state does not fit this recipe's model ({exc})") from exc
    if _GROUPS_KEY not in metadata:
        return progress, None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return progress, {"state": state, "param_groups": json.loads(metadata[_GROUPS_KEY])}
