"""Model directories: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

Weights are read with safetensors only; nothing is ever unpickled. Every failure is a
:class:`CheckpointError` naming the file and the problem: a missing file, a damaged file (the
safetensors header is checked, and our own checkpoints carry a SHA-256 of their tensor bytes in
the header metadata, so even a flipped bit is caught), or weights that do not fit the config.

``load_pretrained`` takes a shipped model's name (``"default"``, the model ``rxrt chat`` opens, or
``"small"``: :data:`SHIPPED_MODELS`), a local directory,
or a Hugging Face Hub id (needs the ``hub`` extra and network access); its ``tokenizer`` option
reads ``tokenizer.json`` from elsewhere (a directory, the file, or a Hub id), for checkpoints
published without one, and ``rxlm_version`` picks which RxLM release's numbers an RxLM
checkpoint reproduces. :func:`load_defaults` sets both for code that loads by name only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .backbone_store import BACKBONE_KEY, BackboneRef, backbone_values, merge_backbone
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
from .moe import MoE
from .rope import RotaryEmbedding
from .rxlm_format import (
    ENCODER_STM,
    UnsupportedRxLMOption,
    is_rxlm_config,
    resolve_release,
    rxlm_component_kind,
    rxlm_config,
    rxlm_weights,
)
from .rxt import RxTModel
from .tokenizer import RxTokenizer
from .weights_file import load_weights, read_header, write_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HUB_FILES = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    "model-*.safetensors",
    "model.safetensors.index.json",
    TOKENIZER_FILE,
]
"""What a Hub download of a model fetches: the config, the weights (one file, or the shards and
their index that ``save_pretrained`` writes above its shard size) and the tokenizer when the
repository has one (RxT-Beta's is published in a repository of its own: ``tokenizer=``)."""
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class LoadDefaults:
    """Load options for code that names a model only (benchmarks, replicas): see :func:`load_defaults`."""

    tokenizer: str | Path | None = None
    rxlm_version: str | None = None


_DEFAULTS: contextvars.ContextVar[LoadDefaults | None] = contextvars.ContextVar("rxrt_load_defaults", default=None)


def _defaults() -> LoadDefaults:
    return _DEFAULTS.get() or LoadDefaults()


@contextlib.contextmanager
def load_defaults(tokenizer: str | Path | None = None, rxlm_version: str | None = None) -> Iterator[None]:
    """Within the block, :func:`load_pretrained` (and so ``rxruntime.load``) called without
    ``tokenizer``/``rxlm_version`` uses these: how a CLI command passes its ``--tokenizer`` and
    ``--rxlm-version`` to code that takes a model name alone. Context-local (a thread started
    inside the block does not inherit it)."""
    token = _DEFAULTS.set(LoadDefaults(tokenizer, rxlm_version))
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


SHIPPED_MODELS: dict[str, str] = {"small": "small_model", "smol": "smol_model"}
"""Models shipped inside the package, by name: the folder of the ``rxruntime`` package holding
each. ``smol`` is SmolLM2-135M-Instruct with an RxT memory (docs/default-model.md), a compact
directory whose backbone is fetched and cached on first load; ``small`` the 2.8M-parameter model
of docs/small-model.md (fast: tests and quick examples name it)."""
DEFAULT_MODEL = "smol"
"""The shipped model ``"default"`` stands for: what ``rxrt chat`` and ``rxruntime.load()`` open."""


def shipped_model_dir(name: str) -> Path:
    """Where the shipped model ``name`` (``"default"`` or a key of :data:`SHIPPED_MODELS`) lives
    inside the installed package."""
    key = DEFAULT_MODEL if name == "default" else name
    if key not in SHIPPED_MODELS:
        raise MissingCheckpointFileError(
            Path(name), f"no shipped model of this name; shipped: default, {', '.join(sorted(SHIPPED_MODELS))}"
        )
    return Path(str(resources.files("rxruntime") / SHIPPED_MODELS[key]))


def default_model_dir() -> Path:
    """Where the embedded default model lives inside the installed package."""
    return shipped_model_dir("default")


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """A shipped model's name (``"default"``, ``"small"``...), a local directory, or a Hub id ->
    a local directory. A name wins over a directory of the same name in the working directory
    (``./small`` reaches the directory)."""
    if isinstance(path_or_id, str) and (path_or_id == "default" or path_or_id in SHIPPED_MODELS):
        return shipped_model_dir(path_or_id)
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(path, "expected a model directory, found a file")
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise MissingCheckpointFileError(path, "no such model directory")
    return _download(text, HUB_FILES)


def _download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingCheckpointFileError(
            Path(repo_id),
            "not a local directory; to download it as a Hugging Face Hub id install the hub extra "
            "(pip install 'rxruntime[hub]')",
        ) from None
    try:
        local = snapshot_download(repo_id=repo_id, allow_patterns=patterns)
    except Exception as exc:
        raise CheckpointError(repo_id, f"could not download from the Hugging Face Hub: {exc}") from exc
    return Path(local)


def resolve_tokenizer_file(path_or_id: str | Path) -> Path:
    """A ``tokenizer.json`` given as the file, a directory holding it, or a Hub id whose
    repository holds it (downloaded, the file alone) -> the local file."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise MissingCheckpointFileError(file, "missing tokenizer file")
        return file
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise MissingCheckpointFileError(path, "no such tokenizer file or directory")
    file = _download(text, [TOKENIZER_FILE]) / TOKENIZER_FILE
    if not file.is_file():
        raise MissingCheckpointFileError(Path(text) / TOKENIZER_FILE, "the Hub repository has no tokenizer.json")
    return file


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
    write_weights(tensors, directory / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)


# ---------------------------------------------------------------------- load
def load_pretrained(
    path_or_id: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    load_tokenizer: bool = True,
    verify: bool = True,
    *,
    tokenizer: str | Path | None = None,
    rxlm_version: str | None = None,
    defer_experts: bool = False,
) -> tuple[RxTModel, RxTokenizer | None]:
    """Load ``(model, tokenizer)`` from a model directory, in eval mode on ``device``.

    ``tokenizer``: where ``tokenizer.json`` is when not in the model directory (the file, a
    directory, or a Hub id). ``rxlm_version`` (RxLM checkpoints only): the RxLM release whose
    numbers to reproduce, e.g. ``"0.3.80"``; default the newest of the checkpoint's line
    (:func:`~.rxlm_format.parse_release`); one rxruntime does not know is refused naming it.
    ``defer_experts``: leave the decoder's routed-expert tables in the checkpoint's dtype and
    device (RxT-Beta's are 5.4 GB of bf16, 10.9 GB as float32), for the caller to settle with
    :func:`~.native.compact_experts` before the model runs (``rxruntime.load`` does).
    """
    defaults = _defaults()
    tokenizer = tokenizer if tokenizer is not None else defaults.tokenizer
    rxlm_version = rxlm_version if rxlm_version is not None else defaults.rxlm_version
    directory = resolve_model_dir(path_or_id)
    raw = _read_config_json(directory / CONFIG_FILE)
    if rxlm_version is not None and not is_rxlm_config(raw):
        raise UnsupportedCheckpointError(
            directory / CONFIG_FILE, f"rxlm_version={rxlm_version!r} is for RxLM checkpoints; this one is rxruntime's"
        )
    tensors = _load_model_weights(directory, verify)
    if is_rxlm_config(raw):
        config, tensors = _from_rxlm(raw, tensors, directory, rxlm_version)
    else:
        config = _our_config(raw, directory / CONFIG_FILE)
        if BACKBONE_KEY in raw:  # a compact directory: the trained tensors, the rest from the backbone
            ref = BackboneRef.from_dict(raw[BACKBONE_KEY], directory / CONFIG_FILE)
            tensors = merge_backbone(config, ref, tensors, directory / WEIGHTS_FILE)
            values = backbone_values(config, ref)

    with torch.device("meta"):
        model = RxTModel(config)
    _check_fits(model, tensors, directory / WEIGHTS_FILE)
    deferred = _expert_tables(model) if defer_experts else set()
    for k in list(tensors):  # one tensor at a time: never the whole model in two dtypes at once
        v = tensors.pop(k)
        convert = dtype is not None and v.is_floating_point() and k not in deferred
        tensors[k] = (v.to(dtype) if convert else v).to(device)
        del v
    model.load_state_dict(tensors, strict=True, assign=True)
    if not is_rxlm_config(raw) and BACKBONE_KEY in raw:
        model.backbone_values = values
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos = torch.empty(0, device=device)
            module.sin = torch.empty(0, device=device)
            module._reset_tables()
    model.eval()

    tok = None
    if load_tokenizer:
        if tokenizer is not None:
            tok_path = resolve_tokenizer_file(tokenizer)
        else:
            tok_path = directory / TOKENIZER_FILE
            if not tok_path.is_file():
                raise MissingCheckpointFileError(
                    tok_path, "missing tokenizer file (give one published elsewhere with tokenizer= / --tokenizer)"
                )
        named = config.tokenizer_template != "rxt" or config.interaction_template == "chatml"
        special = config.special_tokens if named else None
        tok = RxTokenizer.from_file(tok_path, special, as_written=config.tokenizer_template == "rxlm-as-written")
        try:
            tok.use_template(config)
        except TokenizerError as exc:
            raise CheckpointMismatchError(tok_path, str(exc)) from exc
        if tok.vocab_size > config.vocab_size:
            raise CheckpointMismatchError(
                tok_path,
                f"tokenizer has {tok.vocab_size} tokens but config.json allows {config.vocab_size}",
            )
    return model, tok


def _expert_tables(model: RxTModel) -> set[str]:
    """State-dict names of the decoder's routed-expert tables (``w_in``, ``w_out`` of each MoE)."""
    return {
        f"decoder.{name}.{table}"
        for name, module in model.decoder.named_modules()
        if isinstance(module, MoE)
        for table in ("w_in", "w_out")
    }


def load_config(directory: Path, rxlm_version: str | None = None) -> RxTConfig:
    """The config of a model directory, ours or RxLM's (mapped: see :mod:`.rxlm_format`)."""
    path = directory / CONFIG_FILE
    raw = _read_config_json(path)
    rxlm_version = rxlm_version if rxlm_version is not None else _defaults().rxlm_version
    if is_rxlm_config(raw):
        return _rxlm_config(raw, *_version_evidence(directory), path, rxlm_version)[0]
    if rxlm_version is not None:
        raise UnsupportedCheckpointError(path, f"rxlm_version={rxlm_version!r} is for RxLM checkpoints")
    return _our_config(raw, path)


def checkpoint_format(directory: Path, rxlm_version: str | None = None) -> str:
    """``rxruntime`` or ``RxLM 0.2`` / ``RxLM 0.3``: who wrote the model directory."""
    path = directory / CONFIG_FILE
    raw = _read_config_json(path)
    if not is_rxlm_config(raw):
        return "rxruntime"
    try:
        line, _ = resolve_release(raw, *_version_evidence(directory), rxlm_version)
    except UnsupportedRxLMOption as exc:
        raise UnsupportedCheckpointError(path, str(exc)) from exc
    return f"RxLM {line}"


def _weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards its index names (Hub checkpoints above a shard size)."""
    single = directory / WEIGHTS_FILE
    index = directory / INDEX_FILE
    if single.is_file() or not index.is_file():
        return [single]
    data = _read_config_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(index, "no weight_map")
    shards = sorted({str(v) for v in weight_map.values()})
    if any(Path(s).name != s for s in shards):
        raise CorruptCheckpointError(index, "shard names must be files beside the index")
    return [directory / s for s in shards]


def _load_model_weights(directory: Path, verify: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        part = load_weights(file, verify=verify)
        overlap = tensors.keys() & part.keys()
        if overlap:
            raise CorruptCheckpointError(file, f"tensor(s) also in another shard: {sorted(overlap)[:3]}")
        tensors.update(part)
    return tensors


def _version_evidence(directory: Path) -> tuple[list[str] | None, torch.Tensor | None]:
    """The tensor names and the encoder's STM buffer, which tell RxLM versions apart, read
    without loading the other weights."""
    files = [f for f in _weight_files(directory) if f.is_file()]
    if not files:
        return None, None
    names: list[str] = []
    holder = None
    for file in files:
        head = list(read_header(file))
        names += head
        if ENCODER_STM in head:
            holder = file
    if holder is None:
        return names, None
    try:
        with safe_open(str(holder), framework="pt") as f:
            return names, f.get_tensor(ENCODER_STM)
    except Exception as exc:
        raise CorruptCheckpointError(holder, f"not a readable safetensors file ({exc})") from exc


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
    raw = {k: v for k, v in raw.items() if k != BACKBONE_KEY}  # where the weights come from, not the model
    kind = rxlm_component_kind(raw)
    if kind is not None:
        raise UnsupportedCheckpointError(
            path,
            f"an RxLM {kind} alone (a training part, not a chat model): rxruntime runs whole RxTAlpha/RxTBeta "
            "checkpoints, whose config.json has decoder_config, encoder_config and memory_attention_config",
        )
    try:
        return RxTConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CorruptCheckpointError(path, str(exc)) from exc


def _rxlm_config(
    raw: dict[str, Any],
    names: list[str] | None,
    encoder_stm: torch.Tensor | None,
    path: Path,
    rxlm_version: str | None = None,
) -> tuple[RxTConfig, str]:
    try:
        version, release = resolve_release(raw, names, encoder_stm, rxlm_version)
        return rxlm_config(raw, version, names, release), version
    except UnsupportedRxLMOption as exc:
        raise UnsupportedCheckpointError(path, str(exc)) from exc
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise CorruptCheckpointError(path, f"not a loadable RxLM config ({exc})") from exc


def _from_rxlm(
    raw: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path, rxlm_version: str | None = None
) -> tuple[RxTConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for an RxLM directory; names RxLM wrote that map to nothing
    we compute are refused (a silently dropped weight would compute something else)."""
    config, _ = _rxlm_config(raw, list(tensors), tensors.get(ENCODER_STM), directory / CONFIG_FILE, rxlm_version)
    weights, unknown = rxlm_weights(tensors, config, consume=True)
    if unknown:
        raise CheckpointMismatchError(
            directory / WEIGHTS_FILE,
            f"{len(unknown)} RxLM tensor(s) this config does not use (e.g. {', '.join(unknown[:3])})",
        )
    return config, weights


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
    "shipped_model_dir",
    "write_weights",
]
