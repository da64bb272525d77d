"""The engine and conversations on a real (tiny, random) model: ordering, batching, cancellation,
errors, backpressure, snapshots."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch
from torch import Tensor

import rxruntime
from rxruntime import (
    AnswerCompleted,
    ConversationError,
    ConversationState,
    Engine,
    EngineClosedError,
    Event,
    InteractionFailed,
    InvalidTokenError,
    MemoryUpdated,
    MemoryUpdateStarted,
    ModelExecutionError,
    QueryReceived,
    QueryTooLongError,
    StreamOverflowError,
    Token,
)
from rxruntime.models import RxTModel, RxTokenizer, save_pretrained

from .conftest import tiny_config
from .engine_util import collect, make_model, patch


def endless(model: RxTModel, delay: float) -> None:
    """Make every answer run until the length limit, ``delay`` seconds per decode step."""
    real_step = model.decode_step

    def step(*args: Any) -> Tensor:
        time.sleep(delay)
        out: Tensor = real_step(*args)
        out[:, model.config.special_tokens.eos_id] = -1e9
        return out

    patch(model, "decode_step", step)


def slow(fn: Any, seconds: float) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


def test_one_turn_emits_every_event_in_order(engine: Engine, tok: RxTokenizer) -> None:
    conv = engine.conversation("ada")
    events, error = collect(conv.interact("Hi, I'm Ada.", max_new_tokens=10))
    assert error is None
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "QueryReceived" and kinds[-3:] == ["AnswerCompleted", "MemoryUpdateStarted", "MemoryUpdated"]
    tokens = [e for e in events if isinstance(e, Token)]
    answer = events[-3]
    assert isinstance(answer, AnswerCompleted)
    assert [t.token_id for t in tokens] == list(answer.token_ids) and len(tokens) <= 10
    assert [t.position for t in tokens] == list(range(len(tokens)))
    assert answer.text == tok.decode(answer.token_ids)
    assert answer.ttft_s > 0 and answer.duration_s >= answer.ttft_s
    assert all(e.conversation_id == "ada" and e.turn == 1 for e in events)
    started, updated = events[-2], events[-1]
    assert isinstance(started, MemoryUpdateStarted) and started.stm_version == 0
    assert isinstance(updated, MemoryUpdated) and updated.stm_version == 1 and updated.duration_s > 0
    assert conv.stm_version == 1


def test_memory_update_changes_what_the_decoder_reads(engine: Engine) -> None:
    conv = engine.conversation("m")
    before = conv.export_state().stm
    conv.ask("Hi, I'm Ada.", max_new_tokens=5)
    after = conv.export_state().stm
    assert not torch.equal(before, after)


def test_a_query_sent_during_a_memory_update_waits_for_the_commit(tok: RxTokenizer) -> None:
    """Turn 2 sent right after turn 1's answer reads STM(1), exactly as if sent after the commit."""
    queries = ["Hi, I'm Ada.", "What is my name?", "And my cat?"]

    def run(wait_between: bool, delay: float) -> list[str]:
        model = make_model(1)
        patch(model, "memory_update", slow(model.memory_update, delay))
        with Engine(model, tok) as eng:
            conv = eng.conversation("c")
            answers = []
            for q in queries:
                answers.append(conv.ask(q, max_new_tokens=6))
                if wait_between:
                    conv.wait_for_memory()
            conv.wait_for_memory()
            assert conv.stm_version == len(queries)
            waited = [float(h["queued_s"]) for h in conv.history() if "queued_s" in h]
            if not wait_between:
                assert max(waited[1:]) > delay / 2  # the later queries really queued behind memory updates
            return answers

    assert run(wait_between=False, delay=0.3) == run(wait_between=True, delay=0.0)


def test_turn_two_decodes_only_after_turn_one_commits(tok: RxTokenizer) -> None:
    model = make_model(2)
    patch(model, "memory_update", slow(model.memory_update, 0.3))
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        stamps: list[tuple[str, int, float]] = []
        lock = threading.Lock()

        def record(e: Event) -> None:
            with lock:
                stamps.append((type(e).__name__, e.turn, time.perf_counter()))

        done = threading.Event()
        conv.interact("Hi", max_new_tokens=4).subscribe(record)
        conv.interact("Again", max_new_tokens=4).subscribe(record, on_completed=done.set)
        assert done.wait(20)
    commit_1 = next(t for k, turn, t in stamps if k == "MemoryUpdated" and turn == 1)
    first_token_2 = min(t for k, turn, t in stamps if k in ("Token", "AnswerCompleted") and turn == 2)
    query_2 = next(t for k, turn, t in stamps if k == "QueryReceived" and turn == 2)
    assert query_2 < commit_1 < first_token_2  # queued early, decoded after the commit


def test_other_conversations_are_not_blocked_by_a_memory_update(tok: RxTokenizer) -> None:
    model = make_model(3)
    real = model.memory_update
    gate = threading.Event()

    def memory_update(stm: Tensor, ids: Tensor, mask: Tensor | None = None, gates: Any = None) -> Tensor:
        if getattr(threading.current_thread(), "slow", False):
            gate.wait(5)
        return real(stm, ids, mask, gates)

    patch(model, "memory_update", memory_update)
    with Engine(model, tok) as eng:
        eng._memory._thread.slow = True  # type: ignore[attr-defined]
        a, b = eng.conversation("a"), eng.conversation("b")
        a.ask("Hi, I'm Ada.", max_new_tokens=3)  # its memory update now hangs on the gate
        start = time.perf_counter()
        answer_b = b.ask("Hello", max_new_tokens=3, timeout=10)  # b's decode still runs
        assert time.perf_counter() - start < 5
        assert a.stm_version == 0 and isinstance(answer_b, str)
        gate.set()
        assert a.wait_for_memory(10) and a.stm_version == 1


def test_concurrent_greedy_conversations_equal_each_alone(tok: RxTokenizer) -> None:
    queries = ["Hi, I'm Ada.", "What is my name?", "Paris is sunny.", "my cat", "Your name", "Hi"]
    with Engine(make_model(4), tok) as eng:
        alone = [eng.conversation(f"alone{i}").ask(q, max_new_tokens=8) for i, q in enumerate(queries)]
    with Engine(make_model(4), tok, max_batch=4) as eng:  # 6 conversations through 4 rows: joins and leaves
        convs = [eng.conversation(f"alone{i}") for i in range(len(queries))]
        results: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i, q=q: results.__setitem__(i, convs[i].ask(q, max_new_tokens=8)))
            for i, q in enumerate(queries)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert [results[i] for i in range(len(queries))] == alone


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    a = engine.conversation("s1", seed=7).ask("Hi", temperature=1.0, top_k=50, seed=11, max_new_tokens=12)
    b = engine.conversation("s2", seed=7).ask("Hi", temperature=1.0, top_k=50, seed=11, max_new_tokens=12)
    assert a == b


def test_disposing_cancels_within_one_step_and_frees_the_row(tok: RxTokenizer) -> None:
    model = make_model(5)
    endless(model, 0.02)
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        tokens: list[Token] = []
        first = threading.Event()

        def on_next(e: Event) -> None:
            if isinstance(e, Token):
                tokens.append(e)
                first.set()

        sub = conv.interact("Hi").subscribe(on_next)
        assert first.wait(10)
        sub.dispose()
        seen = len(tokens)
        assert conv.wait_for_memory(10)
        assert len(tokens) <= seen + 1  # at most the token already in flight
        assert eng.stats()["active_turns"] == 0
        assert conv.stm_version == 0  # the partial answer was not remembered
        assert conv.history()[-1]["finish_reason"] == "cancelled"
        assert conv.ask("Hi again", max_new_tokens=2) is not None  # the conversation still works
        assert conv.wait_for_memory(10) and conv.stm_version == 1


def test_remember_partial_writes_the_cancelled_answer_to_memory(tok: RxTokenizer) -> None:
    model = make_model(6)
    endless(model, 0.01)
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        got = threading.Event()

        def on_next(e: Event) -> None:
            if isinstance(e, Token):
                got.set()

        sub = conv.interact("Hi", remember_partial=True).subscribe(on_next)
        assert got.wait(10)
        sub.dispose()
        assert conv.wait_for_memory(10)
        assert conv.stm_version == 1


def test_leaving_after_the_answer_still_commits_memory(engine: Engine) -> None:
    conv = engine.conversation("c")
    memory: list[Event] = []
    conv.memory_events.subscribe(memory.append)
    answered = threading.Event()
    holder: list[Any] = []

    def on_next(e: Event) -> None:
        if isinstance(e, AnswerCompleted):
            holder[0].dispose()
            answered.set()

    holder.append(conv.interact("Hi", max_new_tokens=3).subscribe(on_next))
    assert answered.wait(10)
    assert conv.wait_for_memory(10)
    assert conv.stm_version == 1
    assert [type(e).__name__ for e in memory] == ["MemoryUpdateStarted", "MemoryUpdated"]


def test_over_long_query_and_bad_ids_fail_cleanly(engine: Engine) -> None:
    conv = engine.conversation("c")
    events, error = collect(conv.interact("Ada " * 100))
    assert isinstance(error, QueryTooLongError)
    assert isinstance(events[-1], InteractionFailed) and events[-1].stm_version == 0
    with pytest.raises(QueryTooLongError):
        conv.ask("Ada " * 100)
    with pytest.raises(InvalidTokenError):
        conv.ask([7, 8, 100000])
    assert conv.stm_version == 0
    assert conv.ask([7, 8, 9], max_new_tokens=2) is not None  # pre-tokenised queries work


def test_a_model_failure_fails_the_turn_and_keeps_the_stm(tok: RxTokenizer) -> None:
    model = make_model(7)
    real_step = model.decode_step
    broken = {"on": True}

    def step(*args: Any) -> Tensor:
        if broken["on"]:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        result: Tensor = real_step(*args)
        return result

    patch(model, "decode_step", step)
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        events, error = collect(conv.interact("Hi"))
        assert isinstance(error, ModelExecutionError) and "out of memory" in str(error)
        failed = events[-1]
        assert isinstance(failed, InteractionFailed) and failed.stage == "generate" and failed.stm_version == 0
        broken["on"] = False
        assert conv.ask("Hi", max_new_tokens=2) is not None  # the engine survived
        assert eng.stats()["active_turns"] == 0


def test_a_memory_failure_keeps_the_last_committed_stm(tok: RxTokenizer) -> None:
    model = make_model(8)

    def broken(*args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("encoder exploded")

    patch(model, "memory_update", broken)
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        before = conv.export_state().stm
        events, error = collect(conv.interact("Hi", max_new_tokens=3))
        kinds = [type(e).__name__ for e in events]
        assert "AnswerCompleted" in kinds and kinds[-1] == "InteractionFailed"
        assert isinstance(error, ModelExecutionError)
        assert events[-1].stage == "memory"  # type: ignore[union-attr]
        assert conv.stm_version == 0 and torch.equal(conv.export_state().stm, before)


def test_slow_subscriber_stalls_only_its_own_conversation(tok: RxTokenizer) -> None:
    with Engine(make_model(9), tok) as eng:
        slow_conv, fast_conv = eng.conversation("slow"), eng.conversation("fast")
        inside = {"n": 0, "max": 0}
        lock = threading.Lock()
        done = threading.Event()

        def sluggish(e: Event) -> None:
            with lock:
                inside["n"] += 1
                inside["max"] = max(inside["max"], inside["n"])
            time.sleep(0.05)
            with lock:
                inside["n"] -= 1

        slow_conv.interact("Hi", max_new_tokens=12).subscribe(sluggish, on_completed=done.set)
        start = time.perf_counter()
        fast_conv.ask("Hello", max_new_tokens=12, timeout=10)
        fast_time = time.perf_counter() - start
        assert not done.is_set()  # the slow subscriber is still busy...
        assert fast_time < 0.05 * 12  # ...while the other conversation already got its answer
        assert done.wait(20)
        assert inside["max"] == 1  # on_next was never called concurrently


def test_astream_yields_the_same_events(engine: Engine) -> None:
    conv = engine.conversation("c")

    async def main() -> list[Event]:
        return [e async for e in conv.astream("Hi, I'm Ada.", max_new_tokens=6)]

    events = asyncio.run(main())
    assert type(events[0]) is QueryReceived and type(events[-1]) is MemoryUpdated
    answer = next(e for e in events if isinstance(e, AnswerCompleted))
    assert "".join(e.text for e in events if isinstance(e, Token)) == answer.text


def test_astream_slow_consumer_gets_coalesced_tokens_with_no_loss(engine: Engine) -> None:
    conv = engine.conversation("c")

    async def main() -> list[Event]:
        out = []
        async for e in conv.astream("Hi", buffer=2, max_new_tokens=30, temperature=1.0, seed=3):
            out.append(e)
            await asyncio.sleep(0.05)  # slower than the decoder
        return out

    events = asyncio.run(main())
    tokens = [e for e in events if isinstance(e, Token)]
    answer = next(e for e in events if isinstance(e, AnswerCompleted))
    assert sum(t.count for t in tokens) == len(answer.token_ids)
    assert any(t.count > 1 for t in tokens)  # merged because the consumer was behind
    assert "".join(t.text for t in tokens) == answer.text


def test_astream_overflow_error_policy(engine: Engine) -> None:
    conv = engine.conversation("c")

    async def main() -> None:
        async for _ in conv.astream("Hi", buffer=1, overflow="error", max_new_tokens=30, temperature=1.0, seed=3):
            await asyncio.sleep(0.1)

    with pytest.raises(StreamOverflowError):
        asyncio.run(main())


def test_cancelling_the_async_consumer_cancels_the_turn(tok: RxTokenizer) -> None:
    model = make_model(10)
    endless(model, 0.01)
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")

        async def main() -> int:
            n = 0
            async for e in conv.astream("Hi"):
                if isinstance(e, Token):
                    n += 1
                    if n == 2:
                        break
            return n

        assert asyncio.run(main()) == 2
        assert conv.wait_for_memory(10)
        assert conv.stm_version == 0 and eng.stats()["active_turns"] == 0
        assert conv.history()[-1]["finish_reason"] == "cancelled"


def test_ask_timeout(tok: RxTokenizer) -> None:
    model = make_model(11)
    patch(model, "decode_step", slow(model.decode_step, 0.5))
    with Engine(model, tok) as eng, pytest.raises(TimeoutError):
        eng.conversation("c").ask("Hi", timeout=0.2, max_new_tokens=20)


def test_export_and_restore_state(tok: RxTokenizer, tmp_path: Any) -> None:
    with Engine(make_model(12), tok) as eng:
        conv = eng.conversation("c")
        conv.ask("Hi, I'm Ada.", max_new_tokens=5)
        state = conv.export_state()
        assert (state.turn, state.stm_version) == (1, 1)
        expected = conv.ask("What is my name?", max_new_tokens=8)
        state.save(tmp_path / "stm.bin")
    with Engine(make_model(12), tok) as eng:
        restored = eng.conversation(state=ConversationState.load(tmp_path / "stm.bin"))
        assert restored.id == "c" and restored.stm_version == 1
        assert restored.ask("What is my name?", max_new_tokens=8) == expected
        events, _ = collect(restored.interact("x", max_new_tokens=1))
        assert events[0].turn == 3  # numbering continues
        with pytest.raises(ConversationError, match="already exists"):
            eng.conversation(state=state)
    other = RxTModel(tiny_config(vocab_size=300, max_seq_len=48, stm_size=4))
    with Engine(other, tok) as eng, pytest.raises(ConversationError, match="shape"):
        eng.conversation(state=state)
    (tmp_path / "bad.bin").write_bytes(b"not a snapshot")
    with pytest.raises(ConversationError, match="bad.bin"):
        ConversationState.load(tmp_path / "bad.bin")


def test_memory_init_from_system_text(engine: Engine) -> None:
    plain = engine.conversation("plain", seed=1)
    primed = engine.conversation("primed", seed=1, memory_init="You are talking to Ada, who has a cat.")
    assert primed.wait_for_memory(10)
    assert primed.stm_version == 1 and plain.stm_version == 0
    assert not torch.equal(plain.export_state().stm, primed.export_state().stm)
    primed.reset()
    assert torch.equal(plain.export_state().stm, primed.export_state().stm)


def test_unknown_and_duplicate_conversations(engine: Engine) -> None:
    engine.conversation("x")
    with pytest.raises(ConversationError, match="already exists"):
        engine.conversation("x")
    with pytest.raises(ConversationError, match="unknown conversation"):
        engine.stm_version("nope")


def test_closing_the_engine_fails_queued_turns_but_commits_owed_memory(tok: RxTokenizer) -> None:
    model = make_model(13)
    patch(model, "memory_update", slow(model.memory_update, 0.3))
    eng = Engine(model, tok)
    conv = eng.conversation("c")
    conv.ask("Hi", max_new_tokens=2)  # memory update owed, still running
    box: list[Any] = []
    done = threading.Event()

    def on_error(e: Exception) -> None:
        box.append(e)
        done.set()

    conv.interact("queued behind it").subscribe(on_error=on_error)
    eng.close()
    assert done.wait(5) and isinstance(box[0], EngineClosedError)
    assert eng.snapshot("c")[1] == 1  # the owed update committed before the threads stopped
    with pytest.raises(EngineClosedError):
        eng.conversation("new")


def test_load_a_model_directory(tok: RxTokenizer, tmp_path: Any) -> None:
    save_pretrained(make_model(14), tmp_path, tokenizer=tok)
    with rxruntime.load(tmp_path) as eng:
        assert isinstance(eng.conversation().ask("Hi", max_new_tokens=3), str)


def test_observables_cross_into_an_asyncio_loop_with_observe_on(engine: Engine) -> None:
    from reactivex import operators as ops
    from reactivex.scheduler.eventloop import AsyncIOThreadSafeScheduler

    conv = engine.conversation("c")

    async def main() -> tuple[set[int], int, list[str]]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        threads: set[int] = set()
        kinds: list[str] = []

        def on_next(e: Event) -> None:
            threads.add(threading.get_ident())
            kinds.append(type(e).__name__)

        conv.interact("Hi", max_new_tokens=4).pipe(ops.observe_on(AsyncIOThreadSafeScheduler(loop))).subscribe(
            on_next, on_completed=lambda: done.set_result(None)
        )
        await asyncio.wait_for(done, 20)
        return threads, threading.get_ident(), kinds

    threads, loop_thread, kinds = asyncio.run(main())
    assert threads == {loop_thread}  # every event was delivered on the event loop's thread
    assert kinds[0] == "QueryReceived" and kinds[-1] == "MemoryUpdated"


def test_closing_a_conversation_fails_its_queued_turns(tok: RxTokenizer) -> None:
    model = make_model(15)
    patch(model, "memory_update", slow(model.memory_update, 0.3))
    with Engine(model, tok) as eng:
        conv = eng.conversation("c")
        conv.ask("Hi", max_new_tokens=2)  # memory update running: the next turn queues
        box: list[Exception] = []
        done = threading.Event()

        def on_error(e: Exception) -> None:
            box.append(e)
            done.set()

        conv.interact("queued").subscribe(on_error=on_error)
        conv.close()
        assert done.wait(5) and isinstance(box[0], ConversationError)
        with pytest.raises(ConversationError, match="unknown conversation"):
            eng.stm_version("c")
        assert eng.conversation("other").ask("Hi", max_new_tokens=2) is not None
