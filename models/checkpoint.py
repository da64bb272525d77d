"""Model directories: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

Weights are read with safetensors only; nothing is ever unpickled. Every failure is a
:class:`CheckpointError` naming the file and the problem: a missing file, a damaged file (the
safetensors header is checked, and our own checkpoints carry a SHA-256 of their tensor bytes in
the header metadata, so even a flipped bit is caught), or weights that do not fit the config.

``load_pretrained`` takes ``"default"`` (the model embedded in the package), a local directory,
or a Hugging Face Hub id (needs the ``hub`` extra and network access).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import RxTConfig
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    TokenizerError,
    UnsupportedCheckpointError,
)
from .rope import RotaryEmbedding
from .rxlm_format import (
    ENCODER_STM,
    UnsupportedRxLMOption,
    detect_version,
    is_rxlm_config,
    rxlm_config,
    rxlm_weights,
)
from .rxt import RxTModel
from .tokenizer import RxTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_DIGEST_KEY = "rxruntime.sha256"


def default_model_dir() -> Path:
    """Where the embedded default model lives inside the installed package."""
    return Path(str(resources.files("rxruntime") / "default_model"))


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """``"default"``, a local directory, or a Hub id -> a local directory."""
    if str(path_or_id) == "default":
        return default_model_dir()
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(path, "expected a model directory, found a file")
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise MissingCheckpointFileError(path, "no such model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingCheckpointFileError(
            path,
            "not a local directory; to download it as a Hugging Face Hub id install the hub extra "
            "(pip install 'rxruntime[hub]')",
        ) from None
    try:
        local = snapshot_download(repo_id=text, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
    except Exception as exc:
        raise CheckpointError(text, f"could not download from the Hugging Face Hub: {exc}") from exc
    return Path(local)


# ---------------------------------------------------------------------- save
def save_pretrained(
    model: RxTModel, directory: str | Path, tokenizer: RxTokenizer | None = None, dtype: torch.dtype | None = None
) -> None:
    """Write the model directory. ``dtype`` (e.g. bfloat16) stores floating weights smaller."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    model.config.save(directory / CONFIG_FILE)
    # Write twice: once to learn the tensor bytes' digest, once with it in the header metadata.
    fd, tmp_name = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp))
        digest = _data_digest(tmp)
        save_file(tensors, str(tmp), metadata={"format": "pt", _DIGEST_KEY: digest})
        os.replace(tmp, directory / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)


# ---------------------------------------------------------------------- load
def load_pretrained(
    path_or_id: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    load_tokenizer: bool = True,
    verify: bool = True,
) -> tuple[RxTModel, RxTokenizer | None]:
    """Load ``(model, tokenizer)`` from a model directory, in eval mode on ``device``."""
    directory = resolve_model_dir(path_or_id)
    raw = _read_config_json(directory / CONFIG_FILE)
    tensors = load_weights(directory / WEIGHTS_FILE, verify=verify)
    if is_rxlm_config(raw):
        config, tensors = _from_rxlm(raw, tensors, directory)
    else:
        config = _our_config(raw, directory / CONFIG_FILE)

    with torch.device("meta"):
        model = RxTModel(config)
    _check_fits(model, tensors, directory / WEIGHTS_FILE)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.to(device) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos = torch.empty(0, device=device)
            module.sin = torch.empty(0, device=device)
            module._reset_tables()
    model.eval()

    tokenizer = None
    if load_tokenizer:
        tok_path = directory / TOKENIZER_FILE
        if not tok_path.is_file():
            raise MissingCheckpointFileError(tok_path, "missing tokenizer file")
        named = config.tokenizer_template == "rxlm" or config.interaction_template == "chatml"
        special = config.special_tokens if named else None
        tokenizer = RxTokenizer.from_file(tok_path, special)
        try:
            tokenizer.use_template(config)
        except TokenizerError as exc:
            raise CheckpointMismatchError(tok_path, str(exc)) from exc
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointMismatchError(
                tok_path,
                f"tokenizer has {tokenizer.vocab_size} tokens but config.json allows {config.vocab_size}",
            )
    return model, tokenizer


def load_config(directory: Path) -> RxTConfig:
    """The config of a model directory, ours or RxLM's (mapped: see :mod:`.rxlm_format`)."""
    path = directory / CONFIG_FILE
    raw = _read_config_json(path)
    if is_rxlm_config(raw):
        return _rxlm_config(raw, *_version_evidence(directory), path)[0]
    return _our_config(raw, path)


def checkpoint_format(directory: Path) -> str:
    """``rxruntime`` or ``RxLM 0.2`` / ``RxLM 0.3``: who wrote the model directory."""
    raw = _read_config_json(directory / CONFIG_FILE)
    if not is_rxlm_config(raw):
        return "rxruntime"
    return f"RxLM {detect_version(raw, *_version_evidence(directory))}"


def _version_evidence(directory: Path) -> tuple[list[str] | None, torch.Tensor | None]:
    """The tensor names and the encoder's STM buffer, which tell RxLM versions apart, read
    without loading the other weights."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        return None, None
    names = list(_header(path))
    if ENCODER_STM not in names:
        return names, None
    try:
        with safe_open(str(path), framework="pt") as f:
            return names, f.get_tensor(ENCODER_STM)
    except Exception as exc:
        raise CorruptCheckpointError(path, f"not a readable safetensors file ({exc})") from exc


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingCheckpointFileError(path, "missing model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _our_config(raw: dict[str, Any], path: Path) -> RxTConfig:
    try:
        return RxTConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CorruptCheckpointError(path, str(exc)) from exc


def _rxlm_config(
    raw: dict[str, Any], names: list[str] | None, encoder_stm: torch.Tensor | None, path: Path
) -> tuple[RxTConfig, str]:
    try:
        version = detect_version(raw, names, encoder_stm)
        return rxlm_config(raw, version, names), version
    except UnsupportedRxLMOption as exc:
        raise UnsupportedCheckpointError(path, str(exc)) from exc
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise CorruptCheckpointError(path, f"not a loadable RxLM config ({exc})") from exc


def _from_rxlm(
    raw: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
) -> tuple[RxTConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for an RxLM directory; names RxLM wrote that map to nothing
    we compute are refused (a silently dropped weight would compute something else)."""
    config, _ = _rxlm_config(raw, list(tensors), tensors.get(ENCODER_STM), directory / CONFIG_FILE)
    weights, unknown = rxlm_weights(tensors, config)
    if unknown:
        raise CheckpointMismatchError(
            directory / WEIGHTS_FILE,
            f"{len(unknown)} RxLM tensor(s) this config does not use (e.g. {', '.join(unknown[:3])})",
        )
    return config, weights


def _header(path: Path) -> dict[str, Any]:
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
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles have no __iter__
                tensors[key] = _aligned(f.get_tensor(key))
    except Exception as exc:  # SafetensorError and friends
        raise CorruptCheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    return tensors


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


def _check_fits(model: RxTModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {found[k]} vs config {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if found[k] != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointMismatchError(path, "weights do not fit config.json: " + "; ".join(problems))


__all__ = [
    "CheckpointError",
    "TokenizerError",
    "checkpoint_format",
    "default_model_dir",
    "load_config",
    "load_pretrained",
    "load_weights",
    "resolve_model_dir",
    "save_pretrained",
]
