"""Order: the turns of one conversation run in turn-number order, however their callers race."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rxruntime import AnswerCompleted, Engine, MemoryUpdated, SamplingParams
from rxruntime.backend import AnswerStats, TurnRequest
from rxruntime.events import Event
from rxruntime.models import RxTModel, RxTokenizer

from .conftest import tiny_config


@pytest.fixture
def engine(tok: RxTokenizer) -> Iterator[Engine]:
    torch.manual_seed(0)
    eng = Engine(RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval(), tok)
    yield eng
    eng.close()


class Recorder:
    """A turn listener that logs when its answer completed, into a shared list."""

    def __init__(self, turn: int, log: list[int], done: threading.Event) -> None:
        self.turn, self.log, self.done = turn, log, done

    def on_token(self, token_id: int, position: int, logprobs: Any = None) -> None:
        pass

    def on_answer(self, token_ids: tuple[int, ...], finish_reason: Any, stats: AnswerStats) -> None:
        self.log.append(self.turn)
        self.done.set()

    def on_error(self, exc: Exception, stm_version: int) -> None:
        self.log.append(-self.turn)
        self.done.set()


def request(engine: Engine, cid: str, turn: int) -> TurnRequest:
    ids = tuple(engine.tokenizer.encode("Hi"))
    s = engine.tokenizer.special
    return TurnRequest(cid, turn, (s.bos_id, s.query_id, *ids, s.answer_id), SamplingParams(temperature=0.0), 3)


def test_a_later_turn_started_first_waits_for_the_earlier_one(engine: Engine) -> None:
    """Turn numbers reserved 1, 2; the caller of turn 2 wins the race to start_turn."""
    conv = engine.conversation("race")
    log: list[int] = []
    first, second = engine.next_turn(conv.id), engine.next_turn(conv.id)
    done2 = threading.Event()
    engine.start_turn(request(engine, conv.id, second), Recorder(second, log, done2))
    assert not done2.wait(0.5), "turn 2 ran although turn 1 had not started"
    done1 = threading.Event()
    engine.start_turn(request(engine, conv.id, first), Recorder(first, log, done1))
    assert done1.wait(10) and done2.wait(10)
    assert log == [1, 2]
    assert conv.wait_for_memory(10) and conv.stm_version == 2


def test_a_released_reservation_does_not_hold_later_turns(engine: Engine) -> None:
    conv = engine.conversation("released")
    log: list[int] = []
    abandoned, second = engine.next_turn(conv.id), engine.next_turn(conv.id)
    done = threading.Event()
    engine.start_turn(request(engine, conv.id, second), Recorder(second, log, done))
    assert not done.wait(0.3)
    engine.release_turn(conv.id, abandoned)
    assert done.wait(10) and log == [2]


def test_disposing_after_query_received_releases_the_turn(engine: Engine) -> None:
    """A subscriber that leaves at QueryReceived gives its reservation back (it never started)."""
    import reactivex.operators as ops

    conv = engine.conversation("take1")
    got: list[Event] = []
    conv.interact("Hi", max_new_tokens=3).pipe(ops.take(1)).subscribe(got.append)
    assert got and got[0].turn == 1
    assert conv.ask("Hi", max_new_tokens=3, timeout=10) is not None  # turn 2 is not stuck behind 1


def test_pipelined_turns_from_many_threads_run_in_turn_order(engine: Engine) -> None:
    """Turns subscribed from racing threads: whatever numbers they drew, they run in that order."""
    conv = engine.conversation("pipelined")
    n = 8
    outcomes: list[list[Event]] = [[] for _ in range(n)]
    done = [threading.Event() for _ in range(n)]
    barrier = threading.Barrier(n)

    def send(i: int) -> None:
        barrier.wait()
        conv.interact("Hi", max_new_tokens=2).subscribe(outcomes[i].append, lambda e: done[i].set(), done[i].set)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(d.wait(30) for d in done)
    commits = sorted((e.stm_version, e.turn) for events in outcomes for e in events if isinstance(e, MemoryUpdated))
    assert [turn for _, turn in commits] == list(range(1, n + 1))  # version k committed turn k
    answers = [next(e for e in events if isinstance(e, AnswerCompleted)) for events in outcomes]
    assert sorted(a.turn for a in answers) == list(range(1, n + 1))


def test_interact_turns_run_in_number_order_when_their_starts_race(engine: Engine) -> None:
    """Through the real pipeline: turn 1's thread is slow between reserving and starting, turn 2's
    thread starts at once. Turn 2 still runs second (once, it ran first)."""
    import time

    conv = engine.conversation("pipeline-race")
    reserved_first = threading.Event()
    real_next, real_start = engine.next_turn, engine.start_turn

    def next_turn(cid: str) -> int:
        turn = real_next(cid)
        if turn == 1:
            reserved_first.set()
        return turn

    def start_turn(req: TurnRequest, listener: Any) -> Any:
        if req.turn == 1:
            time.sleep(0.5)  # the thread holding turn 1 is descheduled
        return real_start(req, listener)

    setattr(engine, "next_turn", next_turn)  # noqa: B010 - this test's engine only
    setattr(engine, "start_turn", start_turn)  # noqa: B010
    outcomes: list[list[Event]] = [[], []]
    done = [threading.Event(), threading.Event()]

    def send(i: int) -> None:
        conv.interact("Hi", max_new_tokens=2).subscribe(outcomes[i].append, lambda e: done[i].set(), done[i].set)

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert reserved_first.wait(10)
    send(1)
    first.join(10)
    assert done[0].wait(20) and done[1].wait(20)
    commits = {e.turn: e.stm_version for events in outcomes for e in events if isinstance(e, MemoryUpdated)}
    assert commits == {1: 1, 2: 2}
