"""Blast radius of one: a failure that belongs to one row of a batch fails that turn only.

Failures are injected into one conversation of a shared prefill and decode steps: its sampler
raising, its STM holding NaN, its prefill raising, its memory update raising or producing NaN.
The other conversations must finish exactly as they would alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from rxruntime import AnswerCompleted, Engine, InteractionFailed, ModelExecutionError
from rxruntime.events import Event
from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.models import sampler as sampler_module

from .conftest import tiny_config
from .engine_util import Outcome, collect, in_one_prefill

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada. Paris is sunny."] * 30
POISON_SEED = 666


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


def make_model() -> RxTModel:
    torch.manual_seed(0)
    return RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()


@pytest.fixture
def engine(tok: RxTokenizer) -> Iterator[Engine]:
    eng = Engine(make_model(), tok)
    yield eng
    eng.close()


def answers(events: list[Event]) -> tuple[int, ...]:
    return next(e for e in events if isinstance(e, AnswerCompleted)).token_ids


def reference(tok: RxTokenizer, names: list[str], query: Any = "Hi") -> dict[str, tuple[int, ...]]:
    """What each conversation answers with no failing neighbour (greedy, same initial STMs)."""
    with Engine(make_model(), tok) as eng:
        out = {}
        for name in names:
            events, error = collect(eng.conversation(name).interact(query, max_new_tokens=8))
            assert error is None
            out[name] = answers(events)
        return out


NAMES = ["a", "b", "c", "d"]


def check_others(results: list[Outcome], expected: dict[str, tuple[int, ...]], skip: int) -> None:
    for i, (name, (events, error)) in enumerate(zip(NAMES, results)):
        if i == skip:
            continue
        assert error is None, f"{name} failed with {error!r}"
        assert answers(events) == expected[name], f"{name} answered differently beside the failure"


def test_a_raising_sampler_fails_only_its_row(
    engine: Engine, tok: RxTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = reference(tok, NAMES)
    real = sampler_module.sample
    calls = {"poisoned": 0}

    def sample(
        logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, *a: Any, **k: Any
    ) -> Tensor:
        if bool((seed == POISON_SEED).any()):
            calls["poisoned"] += 1
            if calls["poisoned"] >= 3:  # from its second decode step on: after the shared prefill
                raise RuntimeError("injected sampler failure")
        return real(logits, temperature, top_k, top_p, seed, *a, **k)

    monkeypatch.setattr(sampler_module, "sample", sample)
    convs = [engine.conversation(n) for n in NAMES]
    streams = [c.interact("Hi", max_new_tokens=8, seed=POISON_SEED if i == 1 else 1) for i, c in enumerate(convs)]
    results = in_one_prefill(engine, streams)
    events, error = results[1]
    assert isinstance(error, ModelExecutionError) and "injected sampler failure" in str(error)
    assert isinstance(events[-1], InteractionFailed) and events[-1].stage == "generate"
    check_others(results, expected, skip=1)
    assert convs[1].stm_version == 0  # the failed turn wrote no memory
    monkeypatch.setattr(sampler_module, "sample", real)
    assert convs[1].ask("Hi", max_new_tokens=2) is not None  # and the conversation goes on


def test_a_nan_memory_fails_only_its_turn(engine: Engine, tok: RxTokenizer) -> None:
    expected = reference(tok, NAMES)
    convs = [engine.conversation(n) for n in NAMES]
    stm = engine._sched.conversations["c"].stm
    assert stm is not None
    stm[0, 0, 0] = float("nan")  # corrupt one STM in place
    streams = [c.interact("Hi", max_new_tokens=8) for c in convs]
    results = in_one_prefill(engine, streams)
    assert isinstance(results[2][1], ModelExecutionError) and "NaN" in str(results[2][1])
    check_others(results, expected, skip=2)


def test_a_raising_prefill_row_fails_only_its_turn(engine: Engine, tok: RxTokenizer) -> None:
    expected = reference(tok, NAMES)
    model = engine.model
    real = model.prefill
    poison = 7

    def prefill(ids: Tensor, *args: Any) -> Tensor:
        if bool((ids == poison).any()):
            raise RuntimeError("injected prefill failure")
        return real(ids, *args)

    setattr(model, "prefill", prefill)  # noqa: B010 - the fixture's model is thrown away afterwards
    convs = [engine.conversation(n) for n in NAMES]
    streams = [c.interact([poison, 8] if i == 0 else "Hi", max_new_tokens=8) for i, c in enumerate(convs)]
    results = in_one_prefill(engine, streams)
    assert isinstance(results[0][1], ModelExecutionError) and "injected prefill failure" in str(results[0][1])
    check_others(results, expected, skip=0)


def test_non_finite_logits_fail_only_their_row(engine: Engine, tok: RxTokenizer) -> None:
    short, long = [5, 6], [5] * 12 + [6]  # d's positions run past every other row's
    expected = reference(tok, NAMES, short)
    model = engine.model
    real = model.decode_step
    threshold = len(long) + 4  # its prompt with the [BOS][Q]...[A] template

    def decode_step(tokens: Tensor, positions: Tensor, *args: Any) -> Tensor:
        out: Tensor = real(tokens, positions, *args)
        out[positions >= threshold] = float("nan")
        return out

    convs = [engine.conversation(n) for n in NAMES]
    streams = [c.interact(long if i == 3 else short, max_new_tokens=8) for i, c in enumerate(convs)]
    setattr(model, "decode_step", decode_step)  # noqa: B010 - the fixture's model is thrown away afterwards
    results = in_one_prefill(engine, streams)
    assert isinstance(results[3][1], ModelExecutionError) and "not finite" in str(results[3][1])
    check_others(results, expected, skip=3)


def test_a_failing_memory_update_fails_only_its_conversation(tok: RxTokenizer) -> None:
    model = make_model()
    real = model.memory_update
    gate = threading.Event()

    def memory_update(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
        gate.wait(10)  # let every conversation's update queue up: one batch
        if bool((ids == 7).any()):
            raise RuntimeError("injected memory failure")
        return real(stm, ids, mask, gates)

    setattr(model, "memory_update", memory_update)  # noqa: B010
    with Engine(model, tok) as eng:
        convs = [eng.conversation(n) for n in NAMES]
        outcomes = []
        for i, conv in enumerate(convs):
            outcomes.append(conv.interact([7, 8] if i == 2 else "Hi", max_new_tokens=3))
        done = [threading.Event() for _ in convs]
        errors: list[BaseException | None] = [None] * len(convs)
        for i, stream in enumerate(outcomes):

            def on_error(e: Exception, i: int = i) -> None:
                errors[i] = e
                done[i].set()

            stream.subscribe(on_error=on_error, on_completed=done[i].set)
        time.sleep(0.3)
        gate.set()
        assert all(d.wait(20) for d in done)
        assert isinstance(errors[2], ModelExecutionError) and "injected memory failure" in str(errors[2])
        assert [e for i, e in enumerate(errors) if i != 2] == [None] * 3
        assert [c.stm_version for c in convs] == [1, 1, 0, 1]
        assert isinstance(convs[2].memory_error, ModelExecutionError) and convs[0].memory_error is None


def test_a_memory_update_that_yields_nan_is_refused(tok: RxTokenizer) -> None:
    model = make_model()
    real = model.memory_update

    def memory_update(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
        out: Tensor = real(stm, ids, mask, gates)
        for row in range(ids.shape[0]):
            if bool((ids[row] == 7).any()):
                out[row] = float("nan")
        return out

    setattr(model, "memory_update", memory_update)  # noqa: B010
    with Engine(model, tok) as eng:
        bad, good = eng.conversation("bad"), eng.conversation("good")
        with pytest.raises(ModelExecutionError, match="NaN"):
            bad.ask([7, 8], max_new_tokens=2, wait_for_memory=True)
        assert good.ask("Hi", max_new_tokens=2, wait_for_memory=True) is not None
        assert bad.stm_version == 0 and good.stm_version == 1
        assert bool(torch.isfinite(bad.export_state().stm).all())
        assert bad.ask("Hi", max_new_tokens=2, wait_for_memory=True) is not None  # it goes on
        assert bad.stm_version == 1 and bad.memory_error is None


def test_the_finite_check_of_a_join_is_exact() -> None:
    """A NaN or an infinity anywhere refuses the STM; finite values whose sum overflows do not."""
    from rxruntime.engine.decode_loop import all_finite

    def with_value(value: float, at: int = 7) -> torch.Tensor:
        t = torch.randn(3, 4, 5)
        t.view(-1)[at] = value
        return t

    both = torch.zeros(3, 4, 5)
    both.view(-1)[0], both.view(-1)[1] = float("inf"), float("-inf")  # their sum is NaN
    huge = torch.full((3, 4, 5), 3e38)  # every value finite, the float32 sum overflows
    cases = [torch.randn(3, 4, 5), with_value(float("nan")), with_value(float("inf"), 0), with_value(-float("inf"), 59)]
    assert all_finite([*cases, both, huge]) == [True, False, False, False, False, True]
    assert all_finite([]) == []
