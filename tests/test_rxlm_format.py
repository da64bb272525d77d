"""RxLM checkpoints that rxruntime must not run: refused at load time with a typed error that names
the config field and its value, or the tensors that do not fit; and how the version is told."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rxruntime.models.checkpoint import checkpoint_format, load_pretrained
from rxruntime.models.errors import CheckpointMismatchError, UnsupportedCheckpointError

from .test_rxlm_parity import CASES


def _case(version: str, name: str = "alpha_supervised") -> Path:
    (path,) = [c for c in CASES if c.parent.name == version and c.name == name]
    return path


def _copy(case: Path, tmp_path: Path) -> Path:
    dst = tmp_path / case.name
    shutil.copytree(case, dst)
    return dst


def _edit_config(path: Path, section: str, **changes: object) -> None:
    data = json.loads((path / "config.json").read_text())
    data[section].update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("version", "section", "changes", "named"),
    [
        ("0.3.80", "decoder_config", {"self_att_type": "hybrid", "attn_layer_types": ["gla", "sqa"]},
         "decoder_config.self_att_type='hybrid'"),
        ("0.3.80", "decoder_config", {"use_nope": True}, "decoder_config.use_nope=True"),
        ("0.2.31", "decoder_config", {"self_att_type": "gma"}, "decoder_config.self_att_type='gma'"),
        ("0.2.31", "encoder_config", {"use_moe": True}, "encoder_config.use_moe=True"),
        ("0.2.31", "memory_attention_config", {"norm_type": "weird"}, "memory_attention_config.norm_type='weird'"),
        ("0.3.80", "decoder_config", {"router_amp": True, "router_dtype": "int8"},
         "decoder_config.router_dtype='int8'"),
        ("0.3.80", "decoder_config", {"router_amp": True, "router_dtype": "bfloat16", "num_shared_experts": 2,
                                      "moe_use_weighted_shared_experts": True},
         "decoder_config.moe_use_weighted_shared_experts=True"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused_naming_the_field(
    version: str, section: str, changes: dict[str, object], named: str, tmp_path: Path
) -> None:
    path = _copy(_case(version), tmp_path)
    _edit_config(path, section, **changes)
    with pytest.raises(UnsupportedCheckpointError) as err:
        load_pretrained(path)
    assert named in str(err.value)


def test_missing_unexpected_and_misshaped_tensors_are_refused(tmp_path: Path) -> None:
    case = _case("0.2.31")
    tensors = load_file(case / "model.safetensors")
    layer = "decoder.model.layers.0.attention.q_proj.weight"

    def write(changed: dict[str, torch.Tensor]) -> Path:
        path = _copy(case, tmp_path / str(len(list(tmp_path.iterdir()))))
        save_file(changed, str(path / "model.safetensors"))
        return path

    missing = {k: v for k, v in tensors.items() if k != layer}
    with pytest.raises(CheckpointMismatchError, match=r"missing tensor.*self_attn\.q_proj"):
        load_pretrained(write(missing))
    extra = {**tensors, "decoder.model.layers.0.attention.surprise.weight": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="surprise"):
        load_pretrained(write(extra))
    misshaped = {**tensors, layer: torch.zeros(3, 3)}
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_pretrained(write(misshaped))


def test_version_detection_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cases with identical config.json and tensor names in both versions are told apart by the
    encoder's own STM buffer; RXRT_RXLM_VERSION overrides (and then the numbers follow it)."""
    for version in ("0.2.31", "0.3.80"):
        assert checkpoint_format(_case(version, "legacy_encoder_cross_attention")) == f"RxLM {version[:3]}"
    case = _case("0.2.31", "legacy_encoder_cross_attention")
    monkeypatch.setenv("RXRT_RXLM_VERSION", "0.3")
    assert checkpoint_format(case) == "RxLM 0.3"
    monkeypatch.setenv("RXRT_RXLM_VERSION", "1.0")
    with pytest.raises(Exception, match="RXRT_RXLM_VERSION"):
        checkpoint_format(case)
