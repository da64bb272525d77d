"""Config fields, presets, JSON round trip, and ``rxrt info``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rxruntime.cli import main
from rxruntime.models import ConfigError, DecoderConfig, MemoryAttentionConfig, RxTConfig, RxTModel, preset

from .conftest import tiny_config


@pytest.mark.parametrize("name", ["alpha-mini", "micro", "nano"])
def test_presets_round_trip_through_json(name: str, tmp_path: Path) -> None:
    config = preset(name)
    config.save(tmp_path / "config.json")
    assert RxTConfig.load(tmp_path / "config.json") == config
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["decoder"]["num_experts"] == config.decoder.num_experts  # nested fields are named


def test_alpha_mini_matches_the_card() -> None:
    c = preset("alpha-mini")
    assert (c.dim, c.num_layers, c.decoder.num_heads, c.vocab_size, c.max_seq_len, c.stm_size) == (
        256,
        12,
        16,
        20000,
        256,
        256,
    )
    assert (c.decoder.self_q_heads, c.decoder.self_kv_heads, c.decoder.cross_q_heads, c.decoder.cross_kv_heads) == (
        8,
        8,
        8,
        8,
    )
    assert (c.decoder.num_experts, c.decoder.experts_per_token, c.decoder.expert_ffn_dim) == (36, 6, 384)
    assert c.encoder.ffn_dim == 784 and not c.encoder.memory_cross_attention
    assert (c.memory_attention.variant, c.memory_attention.gate_type, c.memory_attention.gate_per_slot) == (
        "self-interlayer",
        "linear",
        True,
    )


@pytest.mark.parametrize(
    "name,card",
    [("alpha-mini", {"decoder": 141e6, "encoder": 13.8e6, "memory_attention": 5.53e6}), ("micro", {"decoder": 8.77e6})],
)
def test_parameter_counts_land_within_10_percent_of_the_cards(name: str, card: dict[str, float]) -> None:
    with torch.device("meta"):
        counts = RxTModel(preset(name)).parameter_counts()
    for component, expected in card.items():
        assert abs(counts[component] - expected) / expected < 0.10, (component, counts[component])


def test_nano_fits_the_package_budget() -> None:
    with torch.device("meta"):
        total = RxTModel(preset("nano")).parameter_counts()["total"]
    assert total * 2 < 10e6  # stored in 16-bit, under 10 MB


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(dim=30), "not divisible"),
        (dict(decoder=DecoderConfig(num_heads=4, self_q_heads=3, self_kv_heads=2)), "multiple of kv_heads"),
        (dict(decoder=DecoderConfig(num_heads=4, self_q_heads=8, self_kv_heads=4)), "must not exceed"),
        (
            dict(
                decoder=DecoderConfig(
                    num_heads=4,
                    self_q_heads=2,
                    self_kv_heads=2,
                    cross_q_heads=2,
                    cross_kv_heads=2,
                    num_experts=2,
                    experts_per_token=3,
                )
            ),
            "experts_per_token",
        ),
        (dict(memory_attention=MemoryAttentionConfig(num_heads=4, q_heads=2, kv_heads=2, variant="fancy")), "variant"),  # type: ignore[arg-type]
        (dict(vocab_size=5), "outside the vocabulary"),
        (dict(num_layers=0), "positive integer"),
    ],
)
def test_invalid_configs_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**change)


def test_unknown_fields_are_rejected() -> None:
    data = tiny_config().to_dict()
    data["decoder"]["num_expert"] = 3
    with pytest.raises(ConfigError, match="decoder.num_expert"):
        RxTConfig.from_dict(data)


def test_info_json_prints_counts_and_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "alpha-mini", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["parameters"]) == {"decoder", "encoder", "memory_attention", "total"}
    assert abs(out["parameters"]["decoder"] - 141e6) / 141e6 < 0.1
    assert RxTConfig.from_dict(out["config"]) == preset("alpha-mini")


def test_info_on_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config()
    tmp_path.joinpath("config.json").write_text(config.to_json())
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    assert RxTConfig.from_dict(json.loads(capsys.readouterr().out)["config"]) == config
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
