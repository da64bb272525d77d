"""Chat Completions over real HTTP: the history a stateless client resends becomes STM, replayed or cached."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import rxruntime
from rxruntime.conversation import ConversationState
from rxruntime.engine import Engine
from rxruntime.stores import InMemoryStore

from .http_server import ASK_NAME, JULIA, client, served


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small") as engine:
        yield engine


def _history(*texts: str) -> list[Any]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


def test_replayed_history_remembers_a_fact(engine: Engine) -> None:
    with served(engine) as (url, _):
        c = client(url)
        messages = _history(JULIA, "Nice to meet you, Julia.", ASK_NAME)
        reply = c.chat.completions.create(model="rxt", messages=messages)
    assert "Julia" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.model_dump()["usage"]
    replayed = len(engine.tokenizer.interaction_ids(JULIA, "Nice to meet you, Julia."))
    query = len(engine.tokenizer.query_ids(ASK_NAME))
    assert usage["rxrt"] == {
        "query_tokens": query,
        "stm_tokens": replayed,
        "history_turns": 1,
        "cached_turns": 0,
        "replayed_turns": 1,
        "replayed_tokens": replayed,
        "history_cache": "miss",
    }
    assert usage["prompt_tokens"] == query + replayed  # the whole prompt, as OpenAI counts it
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_the_clients_next_request_hits_the_cache_and_answers_as_a_replay_would(engine: Engine) -> None:
    with served(engine) as (url, _):
        c = client(url)
        messages = _history(JULIA)
        first = c.chat.completions.create(model="rxt", messages=messages)
        said = first.choices[0].message.content or ""
        assert first.model_dump()["usage"]["rxrt"]["history_cache"] == "none"
        messages = _history(JULIA, said, "What is 3 plus 5?", "3 plus 5 is 8.", ASK_NAME)
        # one pair is cached (our own answer), the next one is replayed
        partial = c.chat.completions.create(model="rxt", messages=messages).model_dump()
        assert partial["usage"]["rxrt"]["history_cache"] == "partial"
        assert partial["usage"]["rxrt"]["cached_turns"] == 1 and partial["usage"]["rxrt"]["replayed_turns"] == 1
        assert partial["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        hit = c.chat.completions.create(model="rxt", messages=messages).model_dump()
        assert hit["usage"]["rxrt"]["history_cache"] == "hit" and hit["usage"]["rxrt"]["replayed_turns"] == 0
    with served(engine) as (url, _):  # a fresh server has no cache: the whole history is replayed
        replayed = client(url).chat.completions.create(model="rxt", messages=messages).model_dump()
    assert replayed["usage"]["rxrt"]["history_cache"] == "miss"
    assert replayed["usage"]["rxrt"]["replayed_turns"] == 2
    answers = {r["choices"][0]["message"]["content"] for r in (partial, hit, replayed)}
    assert len(answers) == 1 and "Julia" in answers.pop()


def test_a_system_message_initialises_memory(engine: Engine) -> None:
    with served(engine) as (url, _):
        reply = client(url).chat.completions.create(
            model="rxt", messages=[{"role": "system", "content": JULIA}, {"role": "user", "content": ASK_NAME}]
        )
    assert "Julia" in (reply.choices[0].message.content or "")


def test_streaming_matches_the_plain_answer(engine: Engine) -> None:
    messages = _history(JULIA, "Nice to meet you, Julia.", ASK_NAME)
    with served(engine) as (url, _):
        c = client(url)
        plain = c.chat.completions.create(model="rxt", messages=messages)
        chunks = list(
            c.chat.completions.create(
                model="rxt", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


class RecordingStore(InMemoryStore):
    """Remembers every id it was asked to store."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def put(self, state: ConversationState) -> None:
        self.ids.add(state.conversation_id)
        super().put(state)


def test_request_conversations_leave_no_trace_in_engine_or_store() -> None:
    store = RecordingStore()
    with rxruntime.load("small", store=store) as engine, served(engine) as (url, app):
        c = client(url)
        for _ in range(2):
            c.chat.completions.create(model="rxt", messages=_history(JULIA, "Nice to meet you, Julia.", ASK_NAME))
        app.state.rxrt.background.submit(lambda: None).result()  # the caching jobs queued before this are done
        deadline_ok = _eventually(lambda: engine.open_conversations == 0)
        assert deadline_ok, engine.stats()
    assert len(store.ids) == 2  # each request's conversation was persisted while it lived...
    assert all(store.get(i) is None for i in store.ids)  # ...and deleted after


def _eventually(check: Any, timeout: float = 20.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_a_history_longer_than_the_engines_per_conversation_queue_replays_in_chunks() -> None:
    from rxruntime.models.checkpoint import load_pretrained

    model, tokenizer = load_pretrained("small")
    assert tokenizer is not None
    with Engine(model, tokenizer, max_turns_per_conversation=2) as engine, served(engine) as (url, _):
        messages = _history(JULIA, "Nice to meet you, Julia.", *["What is 3 plus 5?", "3 plus 5 is 8."] * 2, ASK_NAME)
        reply = client(url).chat.completions.create(model="rxt", messages=messages)
    assert reply.model_dump()["usage"]["rxrt"]["replayed_turns"] == 3
    assert "Julia" in (reply.choices[0].message.content or "")
