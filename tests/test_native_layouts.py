"""The decoder layouts the C step (``models/native.py``) covers beyond the plain all-memory-layers
MoE: gated self- and cross-attention, dense feed-forward layers, stateless layers before and after
the memory layers, global expert biases, shared experts (one or several, scaled or not, local or
global biases), reversed SQA, other activations, plain (not gated) feed-forwards, LayerNorm blocks
and head norm, and the two shapes it is meant for: RxT-Beta's (issue 23) and a Llama-like dense
decoder with gated memory cross-attention (issue 24). tests/test_rxlm_parity.py checks the C step
against RxLM's own step logits on RxLM's layouts.

Each layout, as tiny random models with random biases: the float32 C step equals the torch step
(logits and caches over several decode steps of three rows at different positions; a prefill
spanning chunks), the bf16 C step equals the torch step on the rounded weights, and the int8 C
step stays within test_quantize.py's gates. RxT-Beta's bf16 router (RxLM's router_amp) is
covered (tests/test_native_router.py checks the routing itself); what stays uncovered (a float16
router) is refused by name, and those models decode in torch.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Hashable

import pytest
import torch

from rxruntime.models import DecoderConfig, RxTModel, native
from rxruntime.models.config import AttentionGate
from rxruntime.models.quantize import WeightFormat
from rxruntime.models.weight_format import set_weight_format

from .conftest import tiny_model
from .engine_util import decode_steps
from .test_native import torch_steps  # noqa: F401  (the fixture)
from .test_quantize import _forced

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)

BASE: dict[str, object] = dict(
    num_heads=4, self_q_heads=2, self_kv_heads=1, cross_q_heads=2, cross_kv_heads=2,
    num_experts=4, experts_per_token=2, expert_ffn_dim=24,
)  # fmt: skip
"""conftest.tiny_config's decoder."""


def _model(seed: int, dim: int = 32, layer_norm: bool = False, vocab_size: int = 97, **decoder: object) -> RxTModel:
    """A tiny model with ``decoder`` options over :data:`BASE`, every bias random (zero biases,
    the init of the global ones and of LayerNorm's, would test nothing) and every norm weight
    too (ones would hide a norm reading the wrong vector)."""
    config = DecoderConfig(**{**BASE, **decoder})  # type: ignore[arg-type]
    model = tiny_model(seed=seed, dim=dim, layer_norm=layer_norm, vocab_size=vocab_size, decoder=config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _beta(seed: int, router_dtype: str = "float32", vocab_size: int = 97) -> RxTModel:
    """RxT-Beta's shape family, small: 8 query / 4 key-value heads of a 16-head split in self- and
    cross-attention, many experts top-10 with a global bias, 2 shared experts (wider, global bias,
    mixed by their gate), stateless ``dense, moe`` before and ``moe, moe`` after, sigmoid-gated
    self-attention, ungated cross-attention, biased feed-forwards, no attention biases; the router
    in float32, or (``router_dtype="bfloat16"``) in bf16 as published (RxLM's router_amp)."""
    return _model(
        seed, dim=128, num_heads=16, self_q_heads=8, self_kv_heads=4, cross_q_heads=8, cross_kv_heads=4,
        num_experts=24, experts_per_token=10, expert_ffn_dim=12, expert_bias_mode="global",
        num_shared_experts=2, shared_expert_ffn_dim=24, shared_expert_bias_mode="global",
        layers_before=["dense", "moe"], layers_after=["moe", "moe"], dense_ffn_dim=48, ffn_bias=True,
        attention_gate="sigmoid", router_dtype=router_dtype, vocab_size=vocab_size,
    )  # fmt: skip


def _llama(seed: int, cross_gate: AttentionGate = "tanh") -> RxTModel:
    """A Llama-like dense decoder (issue 24): GQA 9 query / 3 key-value heads, dense SwiGLU
    everywhere, no biases, Llama's norm epsilon, memory cross-attention (gated: tanh by default)
    in the middle layers only, stateless dense layers before and after them."""
    model = tiny_model(
        seed=seed, dim=72, norm_eps=1e-5,
        decoder=DecoderConfig(
            num_heads=9, self_q_heads=9, self_kv_heads=3, cross_q_heads=9, cross_kv_heads=3, use_moe=False,
            ffn_dim=40, dense_ffn_dim=40, layers_before=["dense"], layers_after=["dense", "dense"],
            cross_attention_gate=cross_gate, num_experts=1, experts_per_token=1,
        ),
    )  # fmt: skip
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


LAYOUTS: dict[str, Callable[[int], RxTModel]] = {
    "gated-silu-sigmoid": lambda s: _model(
        s, attention_gate="silu", cross_attention_gate="sigmoid", attention_bias=True
    ),
    "gated-gelu-tanh-relu": lambda s: _model(
        s, attention_gate="gelu", cross_attention_gate="tanh", ffn_activation="relu", attention_output_bias=True
    ),
    "dense": lambda s: _model(s, use_moe=False, ffn_dim=40, ffn_bias=True),
    "stateless": lambda s: _model(s, layers_before=["dense", "moe"], layers_after=["moe"], dense_ffn_dim=36),
    "global-shared2-scaled": lambda s: _model(
        s,
        expert_bias_mode="global",
        num_shared_experts=2,
        shared_expert_ffn_dim=20,
        shared_expert_bias_mode="global",
        shared_experts_scaled=True,
    ),
    "local-shared1": lambda s: _model(
        s, expert_bias_mode="local", num_shared_experts=1, shared_expert_bias_mode="local", ffn_bias=True
    ),
    "shared3-local-scaled": lambda s: _model(
        s, num_shared_experts=3, shared_expert_bias_mode="local", shared_experts_scaled=True
    ),
    "reversed-sqa": lambda s: _model(s, self_q_heads=1, self_kv_heads=2, cross_q_heads=2, cross_kv_heads=4),
    "layer-norm-plain-ffn": lambda s: _model(
        s,
        layer_norm=True,
        final_norm="layer",
        ffn_gated=False,
        ffn_activation="gelu",
        ffn_bias=True,
        layers_before=["dense"],
        dense_ffn_dim=36,
        expert_bias_mode="local",
    ),
    "plain-shared-experts": lambda s: _model(
        s, ffn_gated=False, num_shared_experts=2, shared_expert_bias_mode="local", final_norm="none"
    ),
    "layer-final-norm": lambda s: _model(s, final_norm="layer", lm_head_bias=True),
    "beta": _beta,
    "beta-bf16-router": lambda s: _beta(s, router_dtype="bfloat16"),
    "llama": _llama,
    "llama-ungated": lambda s: _llama(s, cross_gate="none"),
}

PROMPTS = [[3, 9, 27, 81, 50], [11, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def _run(model: RxTModel, native_on: bool, steps: int = 8) -> list[torch.Tensor]:
    model.native_decode = native_on
    return decode_steps(model, PROMPTS, steps)


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_c_step_equals_torch_step_in_float32(layout: str, torch_steps: list[int]) -> None:  # noqa: F811
    model = LAYOUTS[layout](60)
    assert native.layout_reason(model) is None
    reference = _run(model, False)
    assert torch_steps[0] == 8
    got = _run(model, True)
    assert torch_steps[0] == 8, "the C step did not run"
    _close(got, reference)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_c_prefill_equals_torch_prefill_in_float32(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LAYOUTS[layout](61)
    monkeypatch.setattr(native, "FP32_PREFILL_CHUNK", 4)  # chunks that end mid-prompt and mix prompts
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20 + i for i in range(11)]]
    model.use_decode_layout()
    stm = model.init_stm(len(prompts), torch.Generator().manual_seed(3), std=1.0)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    with torch.inference_mode():
        memory_kv = [(k.contiguous(), v.contiguous()) for k, v in model.memory_kv(stm)]
        expected_cache, cache = model.new_cache(len(prompts), 32), model.new_cache(len(prompts), 32)
        model.native_decode = False
        expected = model.prefill(ids, lengths, memory_kv, expected_cache)
        model.native_decode = True
        logits = native.prefill(model, prompts, memory_kv, cache)
    assert logits is not None
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for row, p in enumerate(prompts):
        for got, want in ((cache.k, expected_cache.k), (cache.v, expected_cache.v)):
            torch.testing.assert_close(got[:, row, :, : len(p)], want[:, row, :, : len(p)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layout",
    ["gated-silu-sigmoid", "stateless", "global-shared2-scaled", "layer-norm-plain-ffn", "beta", "beta-bf16-router",
     "llama"],
)  # fmt: skip
def test_bf16_c_step_equals_torch_step_on_the_rounded_weights(layout: str) -> None:
    model = LAYOUTS[layout](62)
    fp32 = _run(copy.deepcopy(model), False, steps=6)
    set_weight_format(model, "bf16")
    reference = _run(model, False, steps=6)
    got = _run(model, True, steps=6)
    _close(got, reference)
    assert {t.dtype for t in native._decoders[model]._copies} == {torch.bfloat16}
    assert not torch.allclose(got[0], fp32[0], rtol=1e-6, atol=1e-7), "the weights were not rounded"


@pytest.mark.parametrize(
    "layout",
    ["gated-silu-sigmoid", "stateless", "global-shared2-scaled", "layer-norm-plain-ffn", "beta", "beta-bf16-router",
     "llama"],
)  # fmt: skip
def test_int8_c_step_stays_close_to_the_torch_step(layout: str) -> None:
    """test_quantize.py's gates (the largest difference below 5% of a row's logit std, the median
    below 1%, the same greedy token at 95% of rows), teacher-forced over 20 steps of 3 rows, 2
    seeds. Measured over 5 seeds of each: the largest difference 2.5-3.2%, the median 0.38-0.42%,
    the same token at 294-300 of 300 rows (random models' logits are nearly flat)."""
    worst, medians, same, rows = 0.0, [], 0, 0
    for seed in (63, 64):
        model = LAYOUTS[layout](seed)
        set_weight_format(model, "int8")
        for c, t in _forced(model, PROMPTS, 20):
            rel = (c - t).abs() / t.std(-1, keepdim=True)
            worst = max(worst, float(rel.max()))
            medians.append(float(rel.median()))
            same += int((c.argmax(-1) == t.argmax(-1)).sum())
            rows += c.shape[0]
        router = {torch.bfloat16} if layout.endswith("bf16-router") else set()  # its bf16 copy
        assert {t.dtype for t in native._decoders[model]._copies} == {torch.uint8} | router
    assert worst < 0.05
    assert sorted(medians)[len(medians) // 2] < 0.01
    assert same >= 0.95 * rows


def test_memory_layers_anywhere(torch_steps: list[int]) -> None:  # noqa: F811
    """A layer's sub-blocks are read per layer, not from the config's order: memory and stateless
    layers interleaved (memory cross-attention in layers 0 and 2 of 4) decode in C as in torch."""
    model = _model(65, layers_before=["moe"], layers_after=["dense"], dense_ffn_dim=20)  # S M M S
    blocks = list(model.decoder.layers)
    model.decoder.layers = torch.nn.ModuleList([blocks[1], blocks[0], blocks[2], blocks[3]])  # M S M S
    model.decoder.memory_layers = [0, 2]
    reference = _run(model, False)
    got = _run(model, True)
    assert torch_steps[0] == 8, "the C step did not run"
    _close(got, reference)


def test_float16_router_is_refused_and_decodes_in_torch(torch_steps: list[int]) -> None:  # noqa: F811
    """RxLM 0.3's ``router_amp`` in float16 (``router_dtype``) is not computed by the C step (its
    bf16 router is, :func:`test_bf16_router_greedy_tokens_and_logits`): refused by name, the
    torch step runs."""
    model = _model(67, router_dtype="float16")
    reason = "layout not covered by the C step: decoder.router_dtype='float16'"
    assert native.layout_reason(model) == reason
    assert native.not_used_reason(model) == (native.unavailable_reason() or reason)
    _run(model, True, steps=2)
    assert torch_steps[0] == 2


def test_bf16_router_greedy_tokens_and_logits(torch_steps: list[int]) -> None:  # noqa: F811
    """RxT-Beta's bf16 router (RxLM's router_amp) in the C step: a greedy run of 24 steps of three
    rows gives the torch step's tokens, and logits within 1e-4 (float32 sums in another order;
    the routing itself, ties included, is torch's: tests/test_native_router.py). The bound C
    layer routes on its bf16 copy of the router."""
    model = _beta(66, router_dtype="bfloat16")
    assert native.layout_reason(model) is None
    reference = _run(model, False, steps=24)
    got = _run(model, True, steps=24)
    assert torch_steps[0] == 24, "the C step did not run"
    _close(got, reference)
    for a, b in zip(got[:24], reference[:24]):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    layers = native._decoders[model]._layers
    assert layers is not None
    assert [bool(layer.router_bf16) for layer in layers] == [False, True, True, True, True, True]


def test_every_layer_is_described_to_the_c_step() -> None:
    """The bound layers say what each has: memory cross-attention only in memory layers, gates
    where configured, dense or MoE feed-forwards, shared experts and their scales."""
    model = _beta(68)
    _run(model, True, steps=1)
    layers = native._decoders[model]._layers
    assert layers is not None and len(layers) == 6  # 2 stateless, 2 memory layers, 2 stateless
    assert [bool(layer.cross_norm) for layer in layers] == [False, False, True, True, False, False]
    assert [bool(layer.router) for layer in layers] == [False, True, True, True, True, True]
    assert all(bool(layer.gate.w) and not layer.cgate.w for layer in layers)
    assert [layer.n_shared for layer in layers] == [0, 2, 2, 2, 2, 2]
    assert all(layer.routed_scale == layer.shared_scale == 1.0 for layer in layers)


def test_forced_scalar_build_gives_the_same_bits_in_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new sub-blocks (gates, dense and shared feed-forwards, stateless layers, the attention
    over compact memory keys/values) compute the same float operations in the same order in every
    build, as the rest of the int8 step does."""
    monkeypatch.setattr(native, "COMPACT_MEMORY_MIN_SLOTS", 64)
    beta = _beta(69)
    set_weight_format(beta, "int8")
    models = [beta, _big_memory(69, 64, "int8")]
    vector = [_run(model, True, steps=4) for model in models]
    monkeypatch.setenv("RXRT_NATIVE_ISA", "scalar")
    assert native.isa() == "scalar (forced)"
    for model, expected in zip(models, vector):
        native._decoders.pop(model)
        scalar = _run(model, True, steps=4)
        assert all(torch.equal(a, b) for a, b in zip(scalar, expected))
    assert native._decoders[models[1]]._compact


def _big_memory(seed: int, slots: int, weights: WeightFormat = "bf16") -> RxTModel:
    """:func:`_beta` with a larger STM, bf16 weights (where the C step equals the torch step, so a
    difference is the memory keys/values' rounding alone) and memory queries 32 times larger, so
    that the attention over the slots is peaked as a trained model's is, not nearly uniform (which
    would average the rounding away)."""
    model = _model(
        seed, dim=128, num_heads=16, self_q_heads=8, self_kv_heads=4, cross_q_heads=8, cross_kv_heads=4,
        num_experts=24, experts_per_token=10, expert_ffn_dim=12, expert_bias_mode="global",
        num_shared_experts=2, shared_expert_ffn_dim=24, shared_expert_bias_mode="global",
        layers_before=["dense", "moe"], layers_after=["moe", "moe"], dense_ffn_dim=48, ffn_bias=True,
        attention_gate="sigmoid",
    )  # fmt: skip
    model.config.stm_size = slots  # before any STM exists: the buffers follow the config
    set_weight_format(model, weights)
    with torch.no_grad():
        for i in model.decoder.memory_layers:
            cross = model.decoder.blocks[i].cross_attn
            assert cross is not None
            cross.q_proj.weight.mul_(32.0)  # a power of two: the weights stay bf16 (int8) values
    return model


def test_compact_memory_keys_values_cost_little(monkeypatch: pytest.MonkeyPatch) -> None:
    """From COMPACT_MEMORY_MIN_SLOTS slots on, bf16 and int8 models read the memory keys/values as
    bf16 copies. Against the torch step on float32 keys/values (teacher-forced, 20 steps of 3 rows,
    256 slots), measured over 5 seeds: the largest difference 0.11% of a row's logit std, the
    median 0.006%, the same greedy token at 299 of 300 rows (queries 128 times larger instead of
    32: 0.41%, 0.03%). Gates: 0.5%, 0.05%, 95%."""
    monkeypatch.setattr(native, "COMPACT_MEMORY_MIN_SLOTS", 256)
    worst, medians, same, rows = 0.0, [], 0, 0
    for seed in (70, 71):
        model = _big_memory(seed, 256)
        for c, t in _forced(model, PROMPTS, 20):
            rel = (c - t).abs() / t.std(-1, keepdim=True)
            worst = max(worst, float(rel.max()))
            medians.append(float(rel.median()))
            same += int((c.argmax(-1) == t.argmax(-1)).sum())
            rows += c.shape[0]
        compact = native._decoders[model]._compact
        assert len(compact) == 2 and {t.dtype for pair in compact for t in pair} == {torch.bfloat16}
    assert 0 < worst < 0.005
    assert sorted(medians)[len(medians) // 2] < 0.0005
    assert same >= 0.95 * rows


def test_compact_memory_follows_joins_and_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 copies are made again whenever a join or a leave writes the memory keys/values:
    conversations joining and leaving a batch answer as each does alone (a stale copy would give a
    joined row the keys/values of the row before it)."""
    from rxruntime.models import DecodeBatch, JoinRequest, SamplingParams

    monkeypatch.setattr(native, "COMPACT_MEMORY_MIN_SLOTS", 64)
    model = _big_memory(72, 64)
    greedy = SamplingParams(temperature=0.0)
    stms = model.init_stm(3, torch.Generator().manual_seed(3), std=1.0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    def alone(i: int) -> list[int]:
        batch = DecodeBatch(model, 1)
        return [int(batch.join([JoinRequest(i, prompts[i], stms[i], greedy, 0)])[0])] + [
            int(batch.step()[0]) for _ in range(6)
        ]

    expected = [alone(i) for i in range(3)]
    batch = DecodeBatch(model, capacity=4)
    got: dict[Hashable, list[int]] = {0: [int(batch.join([JoinRequest(0, prompts[0], stms[0], greedy, 0)])[0])]}
    got[0] += [int(batch.step()[0]) for _ in range(2)]
    first = batch.join([JoinRequest(i, prompts[i], stms[i], greedy, 0) for i in (1, 2)])
    got[1], got[2] = [int(first[0])], [int(first[1])]
    for step in range(6):
        tokens = batch.step()
        for row, key in enumerate(batch.keys):
            if len(got[key]) < 7:
                got[key].append(int(tokens[row]))
        if step == 3:
            batch.leave(0)  # row 2 moves into row 0
    assert native._decoders[model]._compact, "the compact copies were not used"
    assert [got[i] for i in range(3)] == expected
