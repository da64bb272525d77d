"""A snapshot's config fingerprint: it tells models apart, and it survives a release that adds a
config field whose default keeps the old behaviour (stored memories must not be orphaned)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from rxruntime.conversation import config_fingerprint
from rxruntime.models import RxTConfig
from rxruntime.models.config import DecoderConfig


def test_fingerprint_hashes_only_fields_away_from_their_defaults() -> None:
    config = RxTConfig(dim=64, num_layers=2, stm_size=8, decoder=DecoderConfig(num_experts=4, experts_per_token=2))
    expected = {"dim": 64, "num_layers": 2, "stm_size": 8, "decoder": {"num_experts": 4, "experts_per_token": 2}}
    digest = hashlib.sha256(json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config_fingerprint(config) == digest
    # a field added later at its default is invisible; the default config hashes the empty dict
    assert config_fingerprint(RxTConfig()) == hashlib.sha256(b"{}").hexdigest()[:16]


def test_fingerprint_tells_models_apart() -> None:
    base = RxTConfig(dim=64, num_layers=2, stm_size=8)
    variants = [
        dataclasses.replace(base, dim=32),
        dataclasses.replace(base, rope_pairing="adjacent"),
        dataclasses.replace(base, eos_after_truncated_answer=False),
        dataclasses.replace(base, decoder=DecoderConfig(attention_bias=True)),
    ]
    prints = {config_fingerprint(c) for c in [base, *variants]}
    assert len(prints) == len(variants) + 1
    assert config_fingerprint(dataclasses.replace(base)) == config_fingerprint(base)
