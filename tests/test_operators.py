"""Marble tests of the operators on reactivex's TestScheduler (virtual time, a scripted engine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from reactivex import Observable
from reactivex.notification import OnError, OnNext
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.recorded import Recorded

from rxruntime.backend import AnswerStats, MemoryListener, TurnListener, TurnRequest
from rxruntime.errors import InvalidTokenError, ModelExecutionError, QueryTooLongError
from rxruntime.events import (
    AnswerCompleted,
    InteractionFailed,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
)
from rxruntime.models import RxTokenizer, SamplingParams
from rxruntime.operators import detokenize, generate, interaction, memory_started, memory_updated, tokenize

on_next, on_completed = ReactiveTest.on_next, ReactiveTest.on_completed

CORPUS = ["Hi, I'm Ada. My cat is Pixel. What is my name? Your name is Ada."] * 20


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


@dataclass
class FakeBackend:
    """A scripted engine on virtual time: each turn answers ``script`` one tick per token, and
    its memory update starts 5 ticks after the answer and commits 10 ticks after that."""

    scheduler: TestScheduler
    tokenizer: RxTokenizer
    script: list[int]
    max_seq_len: int = 40
    vocab_size: int = 300
    default_sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    fail_generate: bool = False
    fail_memory: bool = False
    turns: int = 0
    version: int = 0
    requests: list[TurnRequest] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    memory_done: dict[int, int] = field(default_factory=dict)  # turn -> committed at tick
    busy_until: int = 0

    def next_turn(self, conversation_id: str) -> int:
        self.turns += 1
        return self.turns

    def release_turn(self, conversation_id: str, turn: int) -> None:
        self.released.append(turn)

    def stm_version(self, conversation_id: str) -> int:
        return self.version

    def start_turn(self, request: TurnRequest, listener: TurnListener) -> Callable[[], None]:
        self.requests.append(request)
        state = {"cancelled": False, "done": False}
        start = max(self.scheduler.clock, self.busy_until)  # a turn waits for the previous memory commit

        def emit(i: int) -> Callable[..., None]:
            def action(*_: Any) -> None:
                if state["cancelled"]:
                    return
                if self.fail_generate:
                    state["done"] = True
                    listener.on_error(ModelExecutionError("boom"), self.version)
                elif i < len(self.script):
                    listener.on_token(self.script[i], i)
                else:
                    state["done"] = True
                    listener.on_answer(tuple(self.script), "eos", AnswerStats(0.1, 10.0, 0.5, 0.0))
                    self.busy_until = self.scheduler.clock + 15

            return action

        for i in range(len(self.script) + 1):
            self.scheduler.schedule_absolute(start + i + 1, emit(i))

        def cancel() -> None:
            if not state["done"]:
                state["cancelled"] = True
                self.cancelled.append(request.turn)

        return cancel

    def watch_memory(self, conversation_id: str, turn: int, listener: MemoryListener) -> Callable[[], None]:
        done_at = self.busy_until

        def started(*_: Any) -> None:
            listener.on_memory_started(turn, self.version)

        def finished(*_: Any) -> None:
            if self.fail_memory:
                listener.on_memory_failed(turn, ModelExecutionError("memory boom"), self.version)
                return
            if turn not in self.memory_done:
                self.version += 1
                self.memory_done[turn] = self.scheduler.clock
            listener.on_memory_updated(turn, self.version, 0.01)

        self.scheduler.schedule_absolute(done_at - 10, started)
        self.scheduler.schedule_absolute(done_at, finished)
        return lambda: None


@dataclass
class FakeConversation:
    backend: FakeBackend
    id: str = "c"


def values(messages: list[Recorded[Any]]) -> list[tuple[int, Any]]:
    return [(m.time, m.value.value) for m in messages if isinstance(m.value, OnNext)]


def error_of(messages: list[Recorded[Any]]) -> Exception:
    (err,) = [m.value.exception for m in messages if isinstance(m.value, OnError)]
    return err


def test_tokenize_marbles(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    conv = FakeConversation(FakeBackend(scheduler, tok, []))
    queries = scheduler.create_hot_observable(on_next(210, "Hi"), on_next(250, [10, 11]), on_completed(300))
    results = scheduler.start(lambda: queries.pipe(tokenize(conv)))
    got = values(results.messages)
    assert [t for t, _ in got] == [210, 250]
    first, second = got[0][1], got[1][1]
    assert isinstance(first, QueryReceived) and (first.turn, first.query) == (1, "Hi")
    assert first.token_ids == (2, 4, *tok.encode("Hi"), 5)
    assert second.turn == 2 and second.token_ids == (2, 4, 10, 11, 5)
    assert results.messages[-1] == on_completed(300)


def test_tokenize_rejects_long_queries_and_bad_ids(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    conv = FakeConversation(FakeBackend(scheduler, tok, []))
    long_query = "Ada " * 60
    results = scheduler.start(lambda: scheduler.create_hot_observable(on_next(210, long_query)).pipe(tokenize(conv)))
    kinds = [type(v).__name__ for _, v in values(results.messages)]
    assert kinds == ["InteractionFailed"]
    assert isinstance(error_of(results.messages), QueryTooLongError)
    failed = values(results.messages)[0][1]
    assert failed.stage == "query" and failed.error_type == "QueryTooLongError"

    scheduler = TestScheduler()
    conv = FakeConversation(FakeBackend(scheduler, tok, []))
    results = scheduler.start(lambda: scheduler.create_hot_observable(on_next(210, [5, 9999])).pipe(tokenize(conv)))
    assert isinstance(error_of(results.messages), InvalidTokenError)


def test_generate_marbles(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [40, 41, 42])
    conv = FakeConversation(backend)
    q = QueryReceived("c", 1, "Hi", (2, 4, 40, 5))
    other = MemoryUpdated("c", 0, 1, 0.0)
    source = scheduler.create_hot_observable(on_next(205, other), on_next(210, q), on_completed(300))
    results = scheduler.start(lambda: source.pipe(generate(conv)))
    got = values(results.messages)
    assert [t for t, _ in got] == [205, 210, 211, 212, 213, 214]
    assert got[0][1] is other and got[1][1] is q  # pass-through, then the query itself
    tokens = [v for _, v in got[2:5]]
    assert [(t.token_id, t.position, t.text) for t in tokens] == [(40, 0, ""), (41, 1, ""), (42, 2, "")]
    answer = got[5][1]
    assert isinstance(answer, AnswerCompleted) and answer.token_ids == (40, 41, 42) and answer.finish_reason == "eos"
    assert results.messages[-1] == on_completed(300)
    assert backend.requests[0].prompt_ids == q.token_ids


def test_generate_disposal_cancels_the_turn(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [40, 41, 42, 43, 44])
    conv = FakeConversation(backend)
    source = scheduler.create_hot_observable(on_next(210, QueryReceived("c", 1, "Hi", (2, 4, 5))))
    results = scheduler.start(lambda: source.pipe(generate(conv)), disposed=212)
    assert [type(v).__name__ for _, v in values(results.messages)] == ["QueryReceived", "Token"]
    assert backend.cancelled == [1]


def test_generate_errors_become_interaction_failed(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [40], fail_generate=True)
    source = scheduler.create_hot_observable(on_next(210, QueryReceived("c", 1, "Hi", (2, 4, 5))))
    results = scheduler.start(lambda: source.pipe(generate(FakeConversation(backend))))
    failed = values(results.messages)[-1][1]
    assert isinstance(failed, InteractionFailed) and failed.stage == "generate"
    assert isinstance(error_of(results.messages), ModelExecutionError)


def test_detokenize_handles_split_and_merged_characters(tok: RxTokenizer) -> None:
    text = "é🐈 Ada"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters are split over several tokens
    scheduler = TestScheduler()
    msgs: list[Recorded[Any]] = [on_next(210 + i, Token("c", 1, t, "", i)) for i, t in enumerate(ids)]
    msgs.append(on_next(300, AnswerCompleted("c", 1, "", tuple(ids), "eos", 0.0, 0.0, 0.0, 0.0)))
    msgs.append(on_next(301, MemoryUpdateStarted("c", 1, 0)))
    source = scheduler.create_hot_observable(*msgs, on_completed(400))
    results = scheduler.start(lambda: source.pipe(detokenize(tok)))
    got = [v for _, v in values(results.messages)]
    pieces = [e.text for e in got if isinstance(e, Token)]
    assert "".join(pieces) == text
    assert "" in pieces  # a token that ends mid-character waits
    assert all("\ufffd" not in p for p in pieces)
    assert isinstance(got[-2], AnswerCompleted) and got[-2].text == text
    assert isinstance(got[-1], MemoryUpdateStarted)


def test_detokenize_answer_cut_mid_character_equals_the_streamed_text(tok: RxTokenizer) -> None:
    ids = tok.encode("Ada 🐈")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    scheduler = TestScheduler()
    msgs: list[Recorded[Any]] = [on_next(210 + i, Token("c", 1, t, "", i)) for i, t in enumerate(ids[:cut])]
    msgs.append(on_next(300, AnswerCompleted("c", 1, "", tuple(ids[:cut]), "length", 0.0, 0.0, 0.0, 0.0)))
    source = scheduler.create_hot_observable(*msgs, on_completed(400))
    got = [v for _, v in values(scheduler.start(lambda: source.pipe(detokenize(tok))).messages)]
    answer = got[-1]
    assert isinstance(answer, AnswerCompleted) and answer.token_ids == tuple(ids[:cut])
    assert answer.text == "".join(e.text for e in got if isinstance(e, Token)) == "Ada "


def test_detokenize_keeps_turns_apart(tok: RxTokenizer) -> None:
    a, b = tok.encode("é"), tok.encode("Pixel")
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(
        on_next(210, Token("c", 1, a[0], "", 0)),
        on_next(211, Token("d", 1, b[0], "", 0)),  # another conversation interleaves
        *[on_next(212 + i, Token("c", 1, t, "", i + 1)) for i, t in enumerate(a[1:])],
    )
    results = scheduler.start(lambda: source.pipe(detokenize(tok)))
    by_conv: dict[str, str] = {}
    for _, e in values(results.messages):
        by_conv[e.conversation_id] = by_conv.get(e.conversation_id, "") + e.text
    assert by_conv == {"c": "é", "d": tok.decode(b[:1])}


def test_encode_and_update_memory_marbles(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [])
    backend.busy_until = 230  # the memory update of turn 1 starts at 220, commits at 230
    conv = FakeConversation(backend)
    answer = AnswerCompleted("c", 1, "hi", (40,), "eos", 0.0, 0.0, 0.0, 0.0)
    source = scheduler.create_hot_observable(on_next(210, answer), on_completed(215))
    results = scheduler.start(lambda: source.pipe(memory_started(conv), memory_updated(conv)))
    got = values(results.messages)
    assert [(t, type(v).__name__) for t, v in got] == [
        (210, "AnswerCompleted"),
        (220, "MemoryUpdateStarted"),
        (230, "MemoryUpdated"),
    ]
    assert got[1][1].stm_version == 0 and got[2][1].stm_version == 1
    assert results.messages[-1] == on_completed(230)  # completes only after the commit


def test_memory_failure_becomes_interaction_failed(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [], fail_memory=True)
    backend.busy_until = 230
    conv = FakeConversation(backend)
    answer = AnswerCompleted("c", 1, "hi", (40,), "eos", 0.0, 0.0, 0.0, 0.0)
    source = scheduler.create_hot_observable(on_next(210, answer))
    results = scheduler.start(lambda: source.pipe(memory_started(conv), memory_updated(conv)))
    failed = values(results.messages)[-1][1]
    assert isinstance(failed, InteractionFailed) and failed.stage == "memory" and failed.stm_version == 0
    assert isinstance(error_of(results.messages), ModelExecutionError)


def test_interaction_runs_queries_in_order_after_each_memory_commit(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, tok.encode("Ada"))
    conv = FakeConversation(backend)
    # the second query arrives while the first turn is still answering
    queries = scheduler.create_hot_observable(on_next(210, "Hi"), on_next(212, "And?"), on_completed(213))
    results = scheduler.start(lambda: queries.pipe(interaction(conv)))
    got = values(results.messages)
    kinds = [type(v).__name__ for _, v in got]
    n = len(tok.encode("Ada"))
    one_turn = ["QueryReceived", *["Token"] * n, "AnswerCompleted", "MemoryUpdateStarted", "MemoryUpdated"]
    assert kinds == one_turn * 2
    turns = [v.turn for _, v in got]
    assert turns == [1] * len(one_turn) + [2] * len(one_turn)
    first_commit = got[len(one_turn) - 1][0]
    second_tokens = [t for t, v in got[len(one_turn) :] if isinstance(v, Token)]
    assert min(second_tokens) > first_commit  # turn 2 decoded only after turn 1's memory commit
    answers = [v.text for _, v in got if isinstance(v, AnswerCompleted)]
    assert answers == ["Ada", "Ada"]
    assert results.messages[-1] == on_completed(results.messages[-1].time)


def test_interaction_passes_sampling_options(tok: RxTokenizer) -> None:
    scheduler = TestScheduler()
    backend = FakeBackend(scheduler, tok, [40])
    queries: Observable[Any] = scheduler.create_hot_observable(on_next(210, "Hi"))
    scheduler.start(lambda: queries.pipe(interaction(FakeConversation(backend), temperature=0.7, top_k=5, seed=3)))
    params = backend.requests[0].params
    assert (params.temperature, params.top_k, params.seed) == (0.7, 5, 3)


def test_old_operator_names_still_import_with_a_warning() -> None:
    """``encode`` / ``update_memory`` were renamed to what they are: views of the memory stage."""
    import rxruntime.operators as operators

    with pytest.warns(DeprecationWarning, match="memory_started"):
        assert operators.encode is memory_started
    with pytest.warns(DeprecationWarning, match="memory_updated"):
        assert operators.update_memory is memory_updated
    with pytest.raises(AttributeError):
        _ = operators.no_such_operator


def test_names_moved_out_of_the_engine_package_still_import_with_a_warning() -> None:
    import rxruntime.backend
    import rxruntime.engine
    import rxruntime.options

    for name in ("AnswerStats", "Backend", "MemoryListener", "TurnListener", "TurnRequest"):
        with pytest.warns(DeprecationWarning, match=f"rxruntime.backend.{name}"):
            assert getattr(rxruntime.engine, name) is getattr(rxruntime.backend, name)
    for name in ("TurnOptions", "check_options"):
        with pytest.warns(DeprecationWarning, match=f"rxruntime.options.{name}"):
            assert getattr(rxruntime.engine, name) is getattr(rxruntime.options, name)
