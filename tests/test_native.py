"""The C decode step (``models/native.py``) computes what the torch step computes, and steps
aside whenever it does not apply.

Skipped only where there is no C compiler at all (like the GPU tests without CUDA): where one
exists, a build failure is a test failure.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams, native

from .conftest import biased_mqa_model, tiny_model
from .engine_util import decode_steps

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)


@pytest.fixture
def torch_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the steps that ran the torch kernel (the C step bypasses it)."""
    calls = [0]
    real = RxTModel._decode_kernel

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RxTModel, "_decode_kernel", counted)
    return calls


def _run(model: RxTModel, native_on: bool, prompts: list[list[int]], steps: int = 12) -> list[torch.Tensor]:
    """``decode_steps`` with the C step switched on or off."""
    model.native_decode = native_on
    return decode_steps(model, prompts, steps)


PROMPTS = [[3, 9, 27, 81, 50], [11, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


@pytest.mark.parametrize(
    "make", [lambda: tiny_model(seed=20), lambda: biased_mqa_model(seed=21)], ids=["tiny", "bias-mqa-odd"]
)
@pytest.mark.parametrize("rows", [1, 3])
def test_native_step_equals_torch_step(make: object, rows: int, torch_steps: list[int]) -> None:
    model = make()  # type: ignore[operator]
    prompts = PROMPTS[:rows]
    reference = _run(model, False, prompts)
    assert torch_steps[0] == 12
    got = _run(model, True, prompts)
    assert torch_steps[0] == 12, "the C step did not run"
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_step_steps_aside(torch_steps: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights, more rows than the C step takes (float32: the multi-row kernel's
    MULTI_ROW_MAX_ROWS), RXRT_NATIVE=0 and a model not in decode layout all run the torch step."""
    prompts = [[5, 6, 7]]
    half = tiny_model(seed=22).to(torch.bfloat16)
    _run(half, True, prompts, steps=2)
    assert torch_steps[0] == 2
    wide = tiny_model(seed=22)
    assert native.max_rows(wide) == native.MULTI_ROW_MAX_ROWS
    _run(wide, True, [[5, 6, 7]] * (native.MULTI_ROW_MAX_ROWS + 1), steps=2)
    assert torch_steps[0] == 4
    monkeypatch.setenv("RXRT_NATIVE", "0")
    assert native.unavailable_reason() == "disabled by RXRT_NATIVE=0"
    _run(tiny_model(seed=22), True, prompts, steps=2)
    assert torch_steps[0] == 6
    monkeypatch.delenv("RXRT_NATIVE")
    plain = tiny_model(seed=22)
    cache, memory_kv = plain.new_cache(1), plain.memory_kv(plain.init_stm(1))
    with torch.inference_mode():
        plain.decode_step(torch.tensor([5]), torch.tensor([0]), memory_kv, cache)  # no decode layout
    assert torch_steps[0] == 7
    assert native.decode_step(plain, torch.tensor([5]), torch.tensor([1]), memory_kv, cache) is None


def test_out_of_range_token_raises_and_writes_nothing() -> None:
    model = tiny_model(seed=23)
    batch = DecodeBatch(model, 1)
    batch.join([JoinRequest("a", [5, 6, 7], model.init_stm(1)[0], SamplingParams(temperature=0.0), 0)])
    before = batch.cache.k.clone()
    batch.next_token[0] = model.config.vocab_size
    with pytest.raises(IndexError, match="out of range"):
        batch.step()
    assert torch.equal(batch.cache.k, before)


def test_replaced_and_updated_weights_are_read(torch_steps: list[int]) -> None:
    """The C step follows in-place updates (same addresses) and rebinds replaced parameters."""
    prompts = [[5, 6, 7, 8]]
    model = tiny_model(seed=24)
    _run(model, True, prompts, steps=2)
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(2.0)
    twice = _run(model, True, prompts, steps=2)
    torch.testing.assert_close(twice, _run(model, False, prompts, steps=2), rtol=1e-4, atol=1e-5)
    model.load_state_dict(tiny_model(seed=25).state_dict(), assign=True)
    replaced = _run(model, True, prompts, steps=2)  # DecodeBatch lays the new weights out
    assert torch_steps[0] == 2
    torch.testing.assert_close(replaced, _run(model, False, prompts, steps=2), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(replaced[0], twice[0])
    copy.deepcopy(model)  # the bound C structs live beside the model, not in it


def test_replaced_modules_are_read(torch_steps: list[int]) -> None:
    """Each step checks cheaply (models/native.py's ``_Watch``) that no module, parameter or
    layer was swapped since the weights were bound; a swapped module is read, not the old one."""
    prompts = [[5, 6, 7, 8]]
    model = tiny_model(seed=26)
    before = _run(model, True, prompts, steps=2)
    norm = copy.deepcopy(model.decoder.blocks[0].self_norm)
    with torch.no_grad():
        norm.get_parameter("weight").mul_(3.0)
    model.decoder.layers[0].self_norm = norm  # a new module, its parameter a new tensor
    head = copy.deepcopy(model.decoder.lm_head)
    with torch.no_grad():
        head.weight.mul_(0.5)
    model.decoder.lm_head = head
    swapped = _run(model, True, prompts, steps=2)
    assert torch_steps[0] == 0  # all four steps ran in C
    torch.testing.assert_close(swapped, _run(model, False, prompts, steps=2), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(swapped[0], before[0])


def test_build_failure_is_reported_and_decoding_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, torch_steps: list[int]
) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("RXRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_failures", {})
    reason = native.unavailable_reason()
    assert reason is not None and "failed" in reason
    with pytest.raises(native.NativeUnavailable):
        native.library()
    assert not native.enabled()
    _run(tiny_model(seed=26), True, [[5, 6]], steps=3)
    assert torch_steps[0] == 3


def test_build_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RXRT_CACHE_DIR", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert native.build(force=True) == first


def test_damaged_cached_library_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RXRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_failures", {})
    path = native.build()
    path.write_bytes(b"not a shared library")
    assert native.library() is not None
    assert native.unavailable_reason() is None and path.stat().st_size > 1000


def _decode(model: RxTModel, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    stm = model.init_stm(len(prompts), torch.Generator().manual_seed(len(prompts)), std=1.0)
    batch = DecodeBatch(model, len(prompts))
    batch.join([JoinRequest(i, p, stm[i], SamplingParams(temperature=0.0), 0) for i, p in enumerate(prompts)])
    tokens = torch.stack([batch.step() for _ in range(steps)])
    return tokens, batch.cache.k.clone()


def test_two_batches_of_one_model_step_from_two_threads() -> None:
    """The bound C structs point at one batch's buffers during a call: concurrent batches of the
    same model must not see each other's (a smaller cache would be overrun)."""
    import threading

    model = tiny_model(seed=27)
    jobs = {"a": [[5, 6, 7]], "b": [[9, 10, 11, 12, 13], [14, 15], [16]]}
    expected = {name: _decode(model, prompts, 25) for name, prompts in jobs.items()}
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def work(name: str) -> None:
        for _ in range(4):
            got[name] = _decode(model, jobs[name], 25)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in jobs:
        assert torch.equal(got[name][0], expected[name][0])
        torch.testing.assert_close(got[name][1], expected[name][1], rtol=1e-5, atol=1e-6)
