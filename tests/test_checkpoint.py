"""Model directories: bit-exact round trip, and a clear error for every broken checkpoint."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from rxruntime.models import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    RxTModel,
    RxTokenizer,
    load_pretrained,
    save_pretrained,
)

from .conftest import tiny_model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[RxTModel, Path]:
    model = tiny_model(seed=7, vocab_size=300)
    tok = RxTokenizer.train(["hello memory world", "what is my name"] * 10, vocab_size=300)
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    return model, tmp_path / "m"


def test_round_trip_is_bit_exact(saved: tuple[RxTModel, Path]) -> None:
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, tok = load_pretrained(path)
    assert tok is not None and loaded.config == model.config
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    stm = model.init_stm(1, torch.Generator().manual_seed(0))
    ids = torch.randint(7, 90, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.decoder_logits(ids, stm), loaded.decoder_logits(ids, stm))
        assert torch.equal(model.memory_update(stm, ids), loaded.memory_update(stm, ids))
    assert not loaded.training


def test_half_precision_storage(tmp_path: Path) -> None:
    model = tiny_model(seed=8)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    loaded, _ = load_pretrained(tmp_path, load_tokenizer=False)
    assert loaded.dtype == torch.float32
    w = model.decoder.lm_head.weight
    torch.testing.assert_close(loaded.decoder.lm_head.weight, w.to(torch.bfloat16).float())


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(saved: tuple[RxTModel, Path], name: str) -> None:
    _, path = saved
    (path / name).unlink()
    with pytest.raises(MissingCheckpointFileError, match=name):
        load_pretrained(path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointFileError, match="no such model directory"):
        load_pretrained(tmp_path / "nope")


def test_truncated_weights(saved: tuple[RxTModel, Path]) -> None:
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_pretrained(path)


def test_garbage_weights(saved: tuple[RxTModel, Path]) -> None:
    _, path = saved
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"this is not json!!!!" + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_pretrained(path)
    (path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        load_pretrained(path)


def test_a_flipped_bit_in_the_tensor_data_is_caught(saved: tuple[RxTModel, Path]) -> None:
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_pretrained(path)


def test_corrupt_config(saved: tuple[RxTModel, Path]) -> None:
    _, path = saved
    (path / "config.json").write_text("{ nope")
    with pytest.raises(CorruptCheckpointError, match="config.json.*not valid JSON"):
        load_pretrained(path)
    cfg = tiny_model().config.to_dict()
    cfg["dimm"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match="unknown config field.*dimm"):
        load_pretrained(path)


def test_config_that_does_not_match_the_weights(saved: tuple[RxTModel, Path]) -> None:
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["dim"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_pretrained(path)
    cfg["dim"] = 32
    cfg["num_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="missing tensor"):
        load_pretrained(path)


def test_hub_id_without_the_hub_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(MissingCheckpointFileError, match=r"rxruntime\[hub\]"):
        load_pretrained("ReactiveAI/RxT-Alpha-Mini")


def test_hub_id_downloads_through_snapshot_download(
    saved: tuple[RxTModel, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The hub is unreachable here, so a stand-in snapshot_download returns a local directory."""
    _, path = saved
    calls: list[str] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append(repo_id)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(allow_patterns)  # + shards, index
        return str(path)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    _, tok = load_pretrained("someone/some-model")
    assert calls == ["someone/some-model"] and tok is not None

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("network unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(CheckpointError, match="network unreachable"):
        load_pretrained("someone/some-model")


def test_checkpoints_are_never_unpickled(saved: tuple[RxTModel, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = saved

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load/pickle must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    load_pretrained(path)


def test_tokenizer_larger_than_the_vocabulary(tmp_path: Path) -> None:
    model = tiny_model(seed=1)  # 97-token vocabulary
    tok = RxTokenizer.train(["hello memory world"] * 10, vocab_size=300)
    save_pretrained(model, tmp_path, tokenizer=tok)
    with pytest.raises(CheckpointMismatchError, match="tokenizer has .* tokens but config.json allows 97"):
        load_pretrained(tmp_path)


def test_weights_are_read_a_group_at_a_time(saved: tuple[RxTModel, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is opened once per group of about READ_GROUP_BYTES (so the mapped pages of the
    whole file never stay resident beside the copies): every tensor read, exactly, in file order."""
    import safetensors
    from safetensors.torch import load_file

    from rxruntime.models import weights_file

    path = saved[1] / "model.safetensors"
    monkeypatch.setattr(weights_file, "READ_GROUP_BYTES", 4096)
    groups = weights_file._read_groups(weights_file.read_header(path))
    assert len(groups) > 2 and sorted(k for g in groups for k in g) == sorted(load_file(str(path)))
    opened = 0
    real = safetensors.safe_open

    def counting(path: str, framework: str) -> object:
        nonlocal opened
        opened += 1
        return real(path, framework=framework)

    monkeypatch.setattr(weights_file, "safe_open", counting)
    tensors = weights_file.load_weights(path)
    assert opened == len(groups)
    want = load_file(str(path))
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
