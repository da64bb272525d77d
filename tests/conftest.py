"""Shared fixtures: tiny configs and models that run in milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from rxruntime.engine import Engine
from rxruntime.models import DecoderConfig, EncoderConfig, MemoryAttentionConfig, RxTConfig, RxTModel, RxTokenizer


def tiny_config(**overrides: object) -> RxTConfig:
    """A small but complete RxT: SQA heads, MoE, every component present."""
    base: dict[str, object] = dict(
        vocab_size=97,
        dim=32,
        num_layers=2,
        stm_size=6,
        max_seq_len=40,
        decoder=DecoderConfig(
            num_heads=4,
            self_q_heads=2,
            self_kv_heads=1,
            cross_q_heads=2,
            cross_kv_heads=2,
            num_experts=4,
            experts_per_token=2,
            expert_ffn_dim=24,
        ),
        encoder=EncoderConfig(num_heads=4, self_q_heads=2, self_kv_heads=2, ffn_dim=40),
        memory_attention=MemoryAttentionConfig(num_heads=4, q_heads=2, kv_heads=2),
    )
    base.update(overrides)
    return RxTConfig(**base)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **overrides: object) -> RxTModel:
    torch.manual_seed(seed)
    return RxTModel(tiny_config(**overrides)).eval()


@pytest.fixture
def model() -> RxTModel:
    return tiny_model()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def biased_mqa_model(seed: int, expert_ffn_dim: int = 15) -> RxTModel:
    """Biases everywhere (random, so they matter), one self-attention K/V head, grouped memory
    cross-attention, three of five experts: the decode paths' harder cases."""
    model = tiny_model(
        seed=seed,
        decoder=DecoderConfig(
            num_heads=4,
            self_q_heads=4,
            self_kv_heads=1,
            cross_q_heads=2,
            cross_kv_heads=1,
            num_experts=5,
            experts_per_token=3,
            expert_ffn_dim=expert_ffn_dim,
            attention_bias=True,
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)  # zero biases would not test anything
    return model


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    """A tokenizer trained on the engine tests' corpus (a module may define its own)."""
    from .engine_util import CORPUS

    return RxTokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture
def engine(tok: RxTokenizer) -> Iterator[Engine]:
    """An engine on a fresh tiny model (tests/engine_util.py), closed afterwards."""
    from .engine_util import make_model

    eng = Engine(make_model(), tok)
    yield eng
    eng.close()
