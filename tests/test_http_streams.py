"""Streams over real HTTP: a client leaving mid-answer, one leaving before the memory events, 100 at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import rxruntime
from rxruntime.engine import Engine
from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.serving.http.app import context_of

from .conftest import tiny_config
from .http_server import ASK_NAME, JULIA, assert_recalls_julia, async_client, client, served

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada."] * 30


def _until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def chatty_engine() -> Iterator[Engine]:
    """Untrained weights and a 2048-token interaction: answers run to the length limit (seconds)."""
    torch.manual_seed(0)
    model = RxTModel(tiny_config(vocab_size=300, max_seq_len=2048))
    with Engine(model, RxTokenizer.train(CORPUS, vocab_size=300)) as engine:
        yield engine


def test_a_client_leaving_mid_stream_cancels_its_turn(chatty_engine: Engine) -> None:
    with served(chatty_engine) as (url, app):
        c = client(url)
        stream = c.responses.create(model="rxt", input="Hi", stream=True)
        conversation_id = None
        for event in stream:
            if event.type == "response.created":
                assert event.response.conversation is not None
                conversation_id = event.response.conversation.id
            if event.type == "response.output_text.delta":
                break
        stream.close()  # the client goes away after its first piece of text
        assert conversation_id is not None
        record = _until(lambda: [h for h in chatty_engine.history(conversation_id) if "finish_reason" in h])[0]
        assert record["finish_reason"] == "cancelled"
        assert int(record["tokens"]) < 2000  # far from the length limit it would otherwise have reached
        assert chatty_engine.stm_version(conversation_id) == 0  # a cancelled answer is not written to memory
        _until(lambda: context_of(app).metrics.cancelled._value.get() >= 1)
        # the conversation is still usable
        again = c.responses.create(model="rxt", input="Hi", conversation=conversation_id, max_output_tokens=3)
        assert again.status == "incomplete" and again.usage is not None and again.usage.output_tokens == 3


def test_a_completed_answers_memory_commits_after_the_client_left() -> None:
    with rxruntime.load("small") as engine, served(engine) as (url, _):
        c = client(url)
        conv = c.conversations.create()
        stream = c.responses.create(model="rxt", input=JULIA, conversation=conv.id, stream=True)
        told = None
        for event in stream:
            if event.type == "response.completed":
                told = event.response.output_text
                break
        stream.close()  # gone before rxrt.memory.update_started / updated
        _until(lambda: engine.stm_version(conv.id) == 1)
        asked = c.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id).output_text
        assert_recalls_julia(asked, conv.id, told)


def test_100_concurrent_streaming_conversations_lose_no_event() -> None:
    queries = [JULIA, "What is 3 plus 5?", "Count from 2 to 5.", "I live in Lisbon."]

    async def one(c: Any, i: int) -> list[dict[str, Any]]:
        stream = await c.responses.create(
            model="rxt", input=queries[i % len(queries)], stream=True, max_output_tokens=4
        )
        return [event.model_dump() async for event in stream]

    async def everyone(url: str) -> list[list[dict[str, Any]]]:
        c = async_client(url)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(100)))
        finally:
            await c.close()

    with rxruntime.load("small") as engine, served(engine) as (url, _):
        results = asyncio.run(everyone(url))
    conversations = set()
    for events in results:
        types = [e["type"] for e in events]
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert types[-6:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",  # 4 tokens: every answer here is longer
            "rxrt.memory.update_started",
            "rxrt.memory.updated",
        ]
        assert set(types[4:-6]) == {"response.output_text.delta"}
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        final = events[-3]["response"]
        assert text == events[-6]["text"] == final["output"][0]["content"][0]["text"]
        assert final["usage"]["output_tokens"] == 4
        conversations.add(final["conversation"]["id"])
    assert len(conversations) == 100


def test_a_chat_client_leaving_mid_stream_cancels_and_leaves_nothing_open(chatty_engine: Engine) -> None:
    with served(chatty_engine) as (url, app):
        ctx = context_of(app)
        before, open_before = ctx.metrics.cancelled._value.get(), chatty_engine.open_conversations
        stream = client(url).chat.completions.create(
            model="rxt", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        _until(lambda: ctx.metrics.cancelled._value.get() > before)
        _until(lambda: chatty_engine.open_conversations == open_before)  # the request's conversation is closed
        assert len(ctx.history) == 0  # a cancelled answer is not cached


def test_a_failed_memory_update_is_reported_in_the_stream_and_never_cached() -> None:
    from rxruntime.models.checkpoint import load_pretrained

    model, tokenizer = load_pretrained("small")
    assert tokenizer is not None
    real = model.memory_update
    broken = {"on": True}

    def memory_update(
        stm: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, gates: Any = None
    ) -> torch.Tensor:
        if broken["on"]:
            raise RuntimeError("injected memory failure")
        return real(stm, ids, mask, gates)

    setattr(model, "memory_update", memory_update)  # noqa: B010
    with Engine(model, tokenizer) as engine, served(engine) as (url, _):
        c = client(url)
        events = [e.model_dump() for e in c.responses.create(model="rxt", input=JULIA, stream=True)]
        types = [e["type"] for e in events]
        # update_started is missing when the update failed before the turn began watching its memory
        # (a late watcher is told only the outcome of a failed update)
        after = types[types.index("response.completed") + 1 :]
        assert after in (["rxrt.memory.update_started", "rxrt.memory.failed"], ["rxrt.memory.failed"])
        assert "injected memory failure" in events[-1]["message"]
        # Chat Completions: the answer arrives, but a history whose memory failed is not cached
        reply = c.chat.completions.create(model="rxt", messages=[{"role": "user", "content": JULIA}])
        assert reply.choices[0].message.content
        said = reply.choices[0].message.content or ""
        _until(lambda: engine.open_conversations == 1)  # the chat's memory update ran (and failed), then it closed
        broken["on"] = False
        follow = c.chat.completions.create(
            model="rxt",
            messages=[
                {"role": "user", "content": JULIA},
                {"role": "assistant", "content": said},
                {"role": "user", "content": ASK_NAME},
            ],
        )
        assert follow.model_dump()["usage"]["rxrt"]["history_cache"] == "miss"  # replayed, not the failed STM
