"""Releasing the float32 routed-expert tables once the C step holds compact copies of them
(``models.native.prepare``): RxT-Beta's experts are 10.9 GB of float32 beside 3.1 GB of int8.

On RxT-Beta's shape family, small: the copies unpack to exactly the rounded tables; the C step
gives the same logits and caches before and after; the torch paths (prefill, decoder forward),
which now unpack each routed expert, give the same numbers as the held tables; a rebind after
the weights move binds the copies again instead of falling back to torch; saving is refused by
name; ``rxruntime.load`` releases by default and keeps them with ``keep_float32=True``.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

import rxruntime
from rxruntime.models import RxTModel, native
from rxruntime.models.checkpoint import load_pretrained, save_pretrained
from rxruntime.models.moe import MoE
from rxruntime.models.quantize import WeightFormat
from rxruntime.models.tokenizer import RxTokenizer
from rxruntime.models.weight_format import set_weight_format

from .engine_util import CORPUS, decode_steps
from .test_native import torch_steps  # noqa: F401  (the fixture)
from .test_native_layouts import _beta

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)

PROMPTS = [[5, 9, 2, 7], [3, 4], [8, 1, 6, 2, 2, 9]]


def _moes(model: RxTModel) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _pair(fmt: WeightFormat) -> tuple[RxTModel, RxTModel]:
    """Two equal rounded models: the second with its expert tables released."""
    held = _beta(3).eval()
    set_weight_format(held, fmt)
    released = copy.deepcopy(held)
    tables = sum(m.w_in.numel() + m.w_out.numel() for m in _moes(released)) * 4
    assert native.prepare(released) == tables > 0
    return held, released


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_copies_unpack_to_the_rounded_tables(fmt: WeightFormat) -> None:
    held, released = _pair(fmt)
    for kept, gone in zip(_moes(held), _moes(released), strict=True):
        assert gone.released is not None and gone.w_in.numel() == gone.w_out.numel() == 0
        for e in range(kept.num_experts):
            w_in, w_out = gone.released.expert(e)
            assert torch.equal(w_in, kept.w_in[e]) and torch.equal(w_out, kept.w_out[e])
        with pytest.raises(IndexError):
            gone.released.expert(kept.num_experts)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_c_step_is_unchanged_by_the_release(
    fmt: WeightFormat,
    torch_steps: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode steps in C read the same copies. (bf16 prefills run in torch: the held tables on the
    grouped dispatch too, the one a released model runs, so the caches start equal.)"""
    monkeypatch.setattr(MoE, "gather_max_tokens", 0)
    held, released = _pair(fmt)
    want = decode_steps(held, PROMPTS, steps=6)
    got = decode_steps(released, PROMPTS, steps=6)
    assert torch_steps[0] == 0  # both ran the C step
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_torch_paths_unpack_the_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prefill and a full forward run in torch: the released model computes them with the
    unpacked experts, equal to the grouped dispatch over the held tables."""
    held, released = _pair("int8")
    monkeypatch.setattr(MoE, "gather_max_tokens", 0)  # the held model on the same (grouped) dispatch
    ids = torch.randint(0, held.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    stm = held.init_stm(2, torch.Generator().manual_seed(2), std=1.0)
    with torch.no_grad():
        assert torch.equal(held.decoder_logits(ids, stm), released.decoder_logits(ids, stm))


def test_a_rebind_binds_the_copies_again(torch_steps: list[int]) -> None:  # noqa: F811
    held, released = _pair("int8")
    for model in (held, released):  # an in-place edit: the C step binds the weights again
        with torch.no_grad():
            model.get_parameter("decoder.layers.0.self_norm.weight").mul_(1.5)
    want = decode_steps(held, PROMPTS, steps=4)
    got = decode_steps(released, PROMPTS, steps=4)
    assert torch_steps[0] == 0
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_parameter_counts_are_the_models() -> None:
    held, released = _pair("int8")
    assert released.parameter_counts() == held.parameter_counts()
    assert released.active_parameter_count() == held.active_parameter_count()


def test_saving_a_released_model_is_refused() -> None:
    _, released = _pair("int8")
    with pytest.raises(RuntimeError, match="released"):
        released.state_dict()
    with pytest.raises(ValueError, match="released"):
        set_weight_format(released, "bf16")


def test_float32_weights_keep_their_tables() -> None:
    model = _beta(3).eval()
    assert native.prepare(model) == 0
    assert all(m.released is None and m.w_in.numel() > 0 for m in _moes(model))


def test_load_releases_unless_asked_to_keep(tmp_path: Path) -> None:
    save_pretrained(_beta(3, vocab_size=300), tmp_path, RxTokenizer.train(CORPUS, vocab_size=300))
    with rxruntime.load(tmp_path, weights="int8") as engine:
        assert all(m.released is not None for m in _moes(engine.model))
        conversation = engine.conversation(seed=0)
        lean = conversation.ask([5, 9, 2], max_new_tokens=6, timeout=60)
    with rxruntime.load(tmp_path, weights="int8", keep_float32=True) as engine:
        assert all(m.released is None and m.w_in.numel() > 0 for m in _moes(engine.model))
        conversation = engine.conversation(seed=0)
        assert conversation.ask([5, 9, 2], max_new_tokens=6, timeout=60) == lean


@pytest.mark.parametrize(("fmt", "stored"), [("int8", torch.bfloat16), ("bf16", torch.bfloat16), ("int8", None)])
def test_load_compacts_each_moe_as_it_reads(tmp_path: Path, fmt: WeightFormat, stored: torch.dtype | None) -> None:
    """``rxruntime.load`` makes the copies one MoE at a time from the checkpoint's own tensors
    (never the float32 tables of every layer at once): bit for bit the copies, and the answer, of
    loading everything as float32, rounding and releasing afterwards."""
    save_pretrained(_beta(3, vocab_size=300), tmp_path, RxTokenizer.train(CORPUS, vocab_size=300), dtype=stored)
    whole, _ = load_pretrained(tmp_path)
    set_weight_format(whole, fmt)
    assert native.prepare(whole) > 0
    with rxruntime.load(tmp_path, weights=fmt) as engine:
        for before, now in zip(_moes(whole), _moes(engine.model), strict=True):
            assert now.released is not None and now.w_in.numel() == now.w_out.numel() == 0
            assert before.released is not None and before.released.fmt == now.released.fmt == fmt
            for e in (0, now.num_experts - 1):
                for a, b in zip(before.released.expert(e), now.released.expert(e), strict=True):
                    assert torch.equal(a, b)
        got = engine.conversation(seed=0).ask([5, 9, 2], max_new_tokens=6, timeout=60)
    with rxruntime.load(tmp_path, weights=fmt, keep_float32=True) as engine:
        assert engine.conversation(seed=0).ask([5, 9, 2], max_new_tokens=6, timeout=60) == got


def test_float32_loads_keep_float32_tables(tmp_path: Path) -> None:
    """Deferred tables that are not compacted (float32 weights) become the float32 tables, in the
    decode layout, exactly as ``load_pretrained`` reads them."""
    save_pretrained(_beta(3, vocab_size=300), tmp_path, RxTokenizer.train(CORPUS, vocab_size=300), dtype=torch.bfloat16)
    plain, _ = load_pretrained(tmp_path)
    with rxruntime.load(tmp_path, weights="fp32") as engine:
        for a, b in zip(_moes(plain), _moes(engine.model), strict=True):
            assert b.released is None and b.w_in.dtype == torch.float32 and b.in_decode_layout()
            assert torch.equal(a.w_in, b.w_in) and torch.equal(a.w_out, b.w_out)
