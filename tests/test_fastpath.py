"""The single-token fast path computes the same function as the plain modules.

Decode layout (input-major weights, fused Q/K/V), the fused decode step, the gathered MoE
dispatch and the sampler's shortcuts are speed-ups only: every test here compares them with the
unoptimised computation.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, generate
from rxruntime.models.moe import MoE
from rxruntime.models.sampler import sample, uniform_noise

from .conftest import biased_mqa_model, tiny_model
from .test_moe import _naive


def _decode_matches_full_forward(model: RxTModel, rows: int = 3, seed: int = 0) -> None:
    stm = model.init_stm(rows, torch.Generator().manual_seed(seed), std=1.0)
    ids = torch.randint(7, 97, (rows, 20), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        full = model.decoder_logits(ids, stm)
        cache = model.new_cache(rows)
        memory_kv = model.memory_kv(stm)
        logits = model.prefill(ids[:, :6], torch.full((rows,), 6), memory_kv, cache)
        torch.testing.assert_close(logits, full[:, 5], rtol=1e-4, atol=1e-5)
        for t in range(6, 20):
            logits = model.decode_step(ids[:, t], torch.full((rows,), t), memory_kv, cache)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-5)


def test_decode_layout_changes_strides_not_values() -> None:
    model = tiny_model(seed=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(7, 97, (2, 12))
    stm = model.init_stm(2, torch.Generator().manual_seed(0), std=1.0)
    with torch.no_grad():
        ref = model.decoder_logits(ids, stm)
    model.use_decode_layout()
    model.use_decode_layout()  # idempotent
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    layer = model.decoder.blocks[0]
    assert layer.self_attn.fused_qkv() is not None
    assert isinstance(layer.ffn, MoE) and layer.ffn.in_decode_layout()
    assert model.decoder.lm_head.weight.t().is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model.decoder_logits(ids, stm), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [False, True])
def test_fast_decode_step_matches_full_forward(layout: bool) -> None:
    model = tiny_model(seed=11)
    if layout:
        model.use_decode_layout()
    _decode_matches_full_forward(model)


@pytest.mark.parametrize("c_step", [False, True], ids=["torch-step", "c-step"])
def test_fast_decode_step_with_attention_bias_and_mqa(c_step: bool) -> None:
    model = biased_mqa_model(seed=12, expert_ffn_dim=16)
    model.native_decode = c_step
    model.use_decode_layout()
    assert model.decoder.blocks[0].self_attn.fused_qkv() is not None
    _decode_matches_full_forward(model, seed=3)


def test_replaced_parameters_fall_back_and_can_be_laid_out_again() -> None:
    model = tiny_model(seed=13)
    model.use_decode_layout()
    fresh = tiny_model(seed=14)
    model.load_state_dict(fresh.state_dict(), assign=True)  # the fused views are gone
    assert model.decoder.blocks[0].self_attn.fused_qkv() is None
    _decode_matches_full_forward(model)  # and the step still reads the live weights
    model.use_decode_layout()
    assert model.decoder.blocks[0].self_attn.fused_qkv() is not None
    _decode_matches_full_forward(model)
    double = copy.deepcopy(model).double()
    assert double.decoder.blocks[0].self_attn.fused_qkv() is None


@torch.inference_mode()
def _prefill_then_decode(model: RxTModel, stm: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """Prefill the first 5 ids of each row, decode the rest one step at a time: the logits of
    every step, then the cache's keys and values."""
    rows = ids.shape[0]
    cache = model.new_cache(rows)
    memory_kv = model.memory_kv(stm)
    model.prefill(ids[:, :5], torch.full((rows,), 5), memory_kv, cache)
    logits = [model.decode_step(ids[:, t], torch.full((rows,), t), memory_kv, cache) for t in range(5, ids.shape[1])]
    return [*logits, cache.k.clone(), cache.v.clone()]


@pytest.mark.parametrize("c_step", [False, True], ids=["torch-step", "c-step"])
def test_fast_step_equals_module_step(c_step: bool) -> None:
    """The fused eval path (the torch step, or the C step of models/native.py where it builds)
    against the decoder's modules (``fast_decode = False``)."""
    model = tiny_model(seed=15)
    model.native_decode = c_step
    model.use_decode_layout()
    stm = model.init_stm(2, torch.Generator().manual_seed(1), std=1.0)
    ids = torch.randint(7, 97, (2, 9))
    fast = _prefill_then_decode(model, stm, ids)
    model.fast_decode = False
    for got, want in zip(fast, _prefill_then_decode(model, stm, ids), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 8, 9, 50])
def test_gathered_moe_equals_naive_per_token_loop(tokens: int) -> None:
    """Both gathered variants (unsorted below ``sort_min_tokens``, sorted from it on), with and
    without the fused residual, against the per-token reference and the grouped dispatch."""
    torch.manual_seed(tokens)
    moe = MoE(16, 24, num_experts=6, top_k=3).eval()
    moe.use_decode_layout()
    assert tokens <= moe.gather_max_tokens and moe.in_decode_layout()
    x = torch.randn(tokens, 16)
    residual = torch.randn(tokens, 16)
    with torch.no_grad():
        ref = _naive(moe, x)
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.decode_residual(residual, x), residual + ref, rtol=1e-5, atol=1e-6)
        weights, experts, _ = moe.route(x)
        torch.testing.assert_close(moe._dispatch(x, weights, experts), ref, rtol=1e-5, atol=1e-6)


def test_training_gradients_do_not_depend_on_the_layout() -> None:
    grads = []
    for layout in (False, True):
        model = tiny_model(seed=16).train()
        if layout:
            model.use_decode_layout()
        stm = model.init_stm(2, torch.Generator().manual_seed(2), std=1.0)
        ids = torch.randint(7, 97, (2, 10), generator=torch.Generator().manual_seed(2))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        loss = model.decoder_logits(ids, stm).logsumexp(-1).mean()
        found = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads.append({n: g for (n, _), g in zip(named, found) if g is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_decode_batch_lays_out_the_model_and_generates_the_same_tokens() -> None:
    plain = tiny_model(seed=17)
    laid = tiny_model(seed=17)
    stm = plain.init_stm(2, torch.Generator().manual_seed(3), std=1.0)
    prompts = [[7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    greedy = SamplingParams(temperature=0.0)
    DecodeBatch(plain, 2, decode_layout=False)
    assert not plain.decoder.lm_head.weight.t().is_contiguous()
    plain.fast_decode = False
    reference = [generate(plain, stm[i : i + 1], [p], greedy, max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert plain.decoder.lm_head.weight.t().is_contiguous()  # generate() lays its model out too
    assert generate(laid, stm, prompts, greedy, max_new_tokens=8) == reference


def test_decode_batch_still_refuses_to_run_past_its_cache() -> None:
    model = tiny_model(seed=18)
    batch = DecodeBatch(model, 1, max_len=8)
    batch.join([JoinRequest("a", [7, 8, 9, 10, 11, 12, 13], model.init_stm(1)[0], SamplingParams(temperature=0.0), 0)])
    batch.step()
    with pytest.raises(RuntimeError, match="past the end"):
        batch.step()


def test_greedy_shortcut_and_cached_id_hashes_change_nothing() -> None:
    torch.manual_seed(4)
    logits = torch.randn(4, 300)
    zeros = torch.zeros(4)
    args = (torch.zeros(4, dtype=torch.long), torch.ones(4), torch.arange(4), torch.arange(4) + 9)
    assert torch.equal(sample(logits, zeros, *args, filtered=False, greedy=True), logits.argmax(-1))
    assert torch.equal(sample(logits, zeros, *args, filtered=False), logits.argmax(-1))
    seed, step = torch.tensor([1, 2**40 + 3]), torch.tensor([0, 17])
    ids = torch.arange(300)
    torch.testing.assert_close(uniform_noise(seed, step, ids, 300), uniform_noise(seed, step, ids), rtol=0, atol=0)
    order = torch.stack([torch.randperm(300), torch.randperm(300)])
    torch.testing.assert_close(uniform_noise(seed, step, order, 300), uniform_noise(seed, step, order), rtol=0, atol=0)


@pytest.mark.parametrize("peaked", [False, True])
def test_filtered_sampling_by_rejection_equals_the_sorted_path(peaked: bool) -> None:
    """The CPU shortcut picks exactly the token the sort-based top-k/top-p path picks."""
    from rxruntime.models.sampler import _sample_filtered, _sample_filtered_by_rejection

    gen = torch.Generator().manual_seed(5)
    rows, vocab = 400, 300
    logits = torch.randn(rows, vocab, generator=gen) * (4.0 if peaked else 1.0)
    logits[::7, :20] = 1.5  # ties, including with the winner
    scaled = logits.double() / torch.rand(rows, generator=gen).add(0.3).double()[:, None]
    top_k = torch.randint(0, 40, (rows,), generator=gen)
    top_p = torch.rand(rows, generator=gen).clamp_min(0.05)
    top_p[::5] = 1.0
    seed = torch.randint(0, 2**40, (rows,), generator=gen)
    step = torch.arange(rows)
    fast = _sample_filtered_by_rejection(scaled, top_k, top_p, seed, step)
    assert torch.equal(fast, _sample_filtered(scaled, top_k, top_p, seed, step))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="needs a C++ compiler")
def test_compiled_decode_step_equals_the_eager_step() -> None:
    """``compile_decode`` (inductor with its CPU defaults: C++ wrapper, autotuned matmuls)."""
    model = tiny_model(seed=16)
    model.use_decode_layout()
    stm = model.init_stm(2, torch.Generator().manual_seed(2), std=1.0)
    ids = torch.randint(7, 97, (2, 9))
    eager = _prefill_then_decode(model, stm, ids)
    model.compile_decode()
    for got, want in zip(_prefill_then_decode(model, stm, ids), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
