"""The C step as a prefill (``native.prefill``): a prompt's tokens go through the decode step a
chunk at a time, each token in its conversation's cache row, attending causally to the
positions already written. In float32 it must compute what torch's prefill computes; in int8
(activations rounded per block, as in every int8 C step) it stays close and keeps the greedy
token, and it is what ``DecodeBatch.join`` runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, native
from rxruntime.models.cache import KVCache
from rxruntime.models.weight_format import set_weight_format

from .conftest import biased_mqa_model, tiny_config, tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20 + i for i in range(23)]]  # the last spans chunks


def _buffers(model: RxTModel, rows: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], KVCache]:
    model.use_decode_layout()
    stm = model.init_stm(rows, torch.Generator().manual_seed(3), std=1.0)
    with torch.inference_mode():
        memory_kv = [(torch.zeros(k.shape).copy_(k), torch.zeros(v.shape).copy_(v)) for k, v in model.memory_kv(stm)]
    cfg = model.config
    cache = KVCache.empty(cfg.num_layers, rows, cfg.decoder.self_kv_heads, 64, cfg.dim // cfg.decoder.num_heads)
    return memory_kv, cache


def _torch_prefill(model: RxTModel, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
    memory_kv, cache = _buffers(model, len(prompts))
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    model.native_decode = False
    with torch.inference_mode():
        logits = model.prefill(ids, lengths, memory_kv, cache)
    model.native_decode = True
    return logits, cache


def _stepping_offset(seed: int) -> RxTModel:
    """RxLM 0.2/0.3.80's ``interact``: tokens fed one at a time after the prompt are rotated one
    position further (``step_position_offset`` 1); the prompt itself at its own positions."""
    return tiny_model(seed=seed, decoder=dataclasses.replace(tiny_config().decoder, step_position_offset=1))


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_model(seed=30), lambda: biased_mqa_model(seed=31), lambda: _stepping_offset(32)],
    ids=["tiny", "bias-mqa", "step-offset"],
)
@pytest.mark.parametrize("chunk", [4, 16])
def test_c_prefill_equals_torch_prefill_in_float32(make: object, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model: RxTModel = make()  # type: ignore[operator]
    monkeypatch.setattr(native, "FP32_PREFILL_CHUNK", chunk)  # chunks that end mid-prompt and mix prompts
    expected, expected_cache = _torch_prefill(model, PROMPTS)
    memory_kv, cache = _buffers(model, len(PROMPTS))
    with torch.inference_mode():
        logits = native.prefill(model, PROMPTS, memory_kv, cache)
    assert logits is not None
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for row, p in enumerate(PROMPTS):  # every written position; the rest of the row stays untouched
        torch.testing.assert_close(
            cache.k[:, row, :, : len(p)], expected_cache.k[:, row, :, : len(p)], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            cache.v[:, row, :, : len(p)], expected_cache.v[:, row, :, : len(p)], rtol=1e-4, atol=1e-5
        )
        assert not cache.k[:, row, :, len(p) :].any()


def test_out_of_range_token_raises() -> None:
    model = tiny_model(seed=32)
    memory_kv, cache = _buffers(model, 1)
    with torch.inference_mode(), pytest.raises(IndexError, match="out of range"):
        native.prefill(model, [[1, 2, model.config.vocab_size]], memory_kv, cache)


def test_int8_join_runs_the_c_prefill_and_keeps_the_greedy_token(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=33)
    set_weight_format(model, "int8")
    expected, _ = _torch_prefill(model, PROMPTS)  # torch on the same rounded weights
    calls = [0]
    real = native.prefill

    def counted(*args: object) -> torch.Tensor | None:
        calls[0] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(native, "prefill", counted)
    memory_kv, _ = _buffers(model, len(PROMPTS))
    stm = model.init_stm(len(PROMPTS), torch.Generator().manual_seed(3), std=1.0)
    batch = DecodeBatch(model, len(PROMPTS))
    params = SamplingParams(temperature=0.0)
    first = batch.join([JoinRequest(i, p, stm[i], params, 0) for i, p in enumerate(PROMPTS)])
    assert calls[0] == 1
    assert first.tolist() == expected.argmax(dim=-1).tolist()
    # How close, for the record: the int8 step rounds activations per block of 32 (the decode
    # steps do the same), so its logits differ from torch's on the rounded weights by a small
    # share of their spread.
    memory_kv, cache = _buffers(model, len(PROMPTS))
    with torch.inference_mode():
        logits = real(model, PROMPTS, memory_kv, cache)
    assert logits is not None
    spread = expected.std(dim=-1, keepdim=True)
    assert float(((logits - expected).abs() / spread).max()) < 0.05


def test_a_short_float32_join_runs_in_c_and_a_long_one_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 joins of up to ``FP32_PREFILL_MAX_TOKENS`` prompt tokens run the C prefill (the
    test above: torch's function to rounding); longer ones torch's batched products, which reuse
    each weight across more rows (docs/benchmarks.md §7)."""
    model = tiny_model(seed=34)
    monkeypatch.setattr(native, "FP32_PREFILL_MAX_TOKENS", 10)
    real = native.prefill
    calls: list[int] = []

    def counted(
        model: RxTModel, prompts: list[list[int]], memory_kv: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache
    ) -> torch.Tensor | None:
        calls.append(sum(len(p) for p in prompts))
        return real(model, prompts, memory_kv, cache)

    monkeypatch.setattr(native, "prefill", counted)
    stm = model.init_stm(2, torch.Generator().manual_seed(3))
    greedy = SamplingParams(temperature=0.0)
    DecodeBatch(model, 2).join(
        [JoinRequest(0, [1, 2, 3], stm[0], greedy, 0), JoinRequest(1, [4] * 7, stm[1], greedy, 0)]
    )
    assert calls == [10]
    DecodeBatch(model, 2).join(
        [JoinRequest(0, [1, 2, 3], stm[0], greedy, 0), JoinRequest(1, [4] * 8, stm[1], greedy, 0)]
    )
    assert calls == [10]  # 11 tokens: torch
