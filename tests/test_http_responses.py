"""The Responses and Conversations APIs over real HTTP, driven by the official ``openai`` client."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch

import rxruntime
from rxruntime.engine import Engine
from rxruntime.serving.http.app import context_of
from rxruntime.stores import InMemoryStore

from .http_server import ASK_NAME, JULIA, assert_recalls_julia, client, served


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small", store=InMemoryStore()) as engine:
        yield engine


@pytest.fixture(scope="module")
def api(engine: Engine) -> Iterator[tuple[openai.OpenAI, Any]]:
    with served(engine) as (url, app):
        yield client(url), app


def test_stateful_turns_through_a_conversation(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    conv = c.conversations.create(metadata={"topic": "names"})
    first = c.responses.create(model="rxt", input=JULIA, conversation=conv.id)
    answer = c.responses.create(model="rxt", input=ASK_NAME, conversation={"id": conv.id})
    assert first.status == "completed" and answer.status == "completed"
    assert_recalls_julia(answer.output_text, conv.id, first.output_text)
    assert answer.conversation is not None and answer.conversation.id == conv.id
    # usage counts only the new message: the same question on a fresh conversation reads as many tokens
    fresh = c.responses.create(model="rxt", input=ASK_NAME)
    assert answer.usage is not None and fresh.usage is not None
    assert answer.usage.input_tokens == fresh.usage.input_tokens > 0
    assert answer.usage.output_tokens > 0
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "names"}


def test_previous_response_id_continues_only_the_latest(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    first = c.responses.create(model="rxt", input=JULIA)
    second = c.responses.create(model="rxt", input=ASK_NAME, previous_response_id=first.id)
    assert_recalls_julia(second.output_text, first.conversation.id if first.conversation else None, first.output_text)
    assert second.conversation is not None and first.conversation is not None
    assert second.conversation.id == first.conversation.id
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="rxt", input=ASK_NAME, previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="rxt", input=ASK_NAME, previous_response_id="resp_nothing")


def test_instructions_initialise_a_new_conversations_memory(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    primed = c.responses.create(model="rxt", instructions=JULIA, input=ASK_NAME)
    assert "Julia" in primed.output_text
    assert primed.instructions == JULIA


def test_stream_event_order_and_memory_events(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    conv = c.conversations.create()
    events = [e.model_dump() for e in c.responses.create(model="rxt", input=JULIA, conversation=conv.id, stream=True)]
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert deltas
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
        "rxrt.memory.update_started",
        "rxrt.memory.updated",
    ]
    assert types == [*head, *["response.output_text.delta"] * len(deltas), *tail]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in deltas)
    done = events[types.index("response.output_text.done")]
    completed = events[types.index("response.completed")]["response"]
    assert text == done["text"] == completed["output"][0]["content"][0]["text"]
    assert completed["status"] == "completed" and completed["conversation"]["id"] == conv.id
    assert {e["response"]["id"] for e in events if "response" in e} == {completed["id"]}  # one id throughout
    started, updated = events[-2], events[-1]
    assert started["conversation_id"] == updated["conversation_id"] == conv.id
    assert updated["stm_version"] == started["stm_version"] + 1
    # the streamed turn is in memory: the next one recalls it
    assert "Julia" in c.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id).output_text


def test_max_output_tokens_gives_an_incomplete_response(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    r = c.responses.create(model="rxt", input=JULIA, max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 2


def test_store_false_leaves_nothing_to_continue(api: tuple[openai.OpenAI, Any], engine: Engine) -> None:
    c, _ = api
    open_before = engine.open_conversations
    r = c.responses.create(model="rxt", input=JULIA, store=False)
    assert r.output_text and r.conversation is None
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="rxt", input=ASK_NAME, previous_response_id=r.id)
    assert engine.open_conversations == open_before


def test_conversation_items_are_written_into_memory(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    conv = c.conversations.create(
        items=[
            {"type": "message", "role": "user", "content": JULIA},
            {"type": "message", "role": "assistant", "content": "Nice to meet you, Julia."},
            {"type": "message", "role": "user", "content": "What is 3 plus 5?"},
            {"type": "message", "role": "assistant", "content": "3 plus 5 is 8."},
        ]
    )
    assert "Julia" in c.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id).output_text


def test_a_seed_fixes_a_new_conversations_starting_memory(api: tuple[openai.OpenAI, Any], engine: Engine) -> None:
    """Our extension to ``POST /v1/conversations``: ``seed`` as in ``engine.conversation(seed=...)``,
    so a client can replay a conversation from the same starting STM."""
    c, _ = api
    a, b, other = (c.conversations.create(extra_body={"seed": seed}) for seed in (11, 11, 12))
    local = engine.conversation(seed=11)
    ids = {"a": a.id, "b": b.id, "other": other.id, "local": local.id}
    stm = {name: engine.snapshot(cid)[0] for name, cid in ids.items()}
    local.close()
    assert torch.equal(stm["a"], stm["b"]) and torch.equal(stm["a"], stm["local"])
    assert not torch.equal(stm["a"], stm["other"])
    with pytest.raises(openai.BadRequestError) as err:
        c.conversations.create(extra_body={"seed": -1})
    assert err.value.body["param"] == "seed"  # type: ignore[index]


def test_delete_removes_the_conversation_from_the_store(api: tuple[openai.OpenAI, Any], engine: Engine) -> None:
    c, _ = api
    conv = c.conversations.create()
    c.responses.create(model="rxt", input=JULIA, conversation=conv.id)
    assert engine.store is not None
    context_of(api[1]).registry.get(engine, "", conv.id).conv.wait_for_memory()
    assert engine.store.get(conv.id) is not None
    deleted = c.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    assert engine.store.get(conv.id) is None
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id)


def test_a_restarted_server_resumes_conversations_from_the_store() -> None:
    store = InMemoryStore()
    with rxruntime.load("small", store=store) as engine, served(engine) as (url, _):
        c = client(url)
        conv = c.conversations.create()
        c.responses.create(model="rxt", input=JULIA, conversation=conv.id)
    with rxruntime.load("small", store=store) as engine, served(engine) as (url, _):
        later = client(url).responses.create(model="rxt", input=ASK_NAME, conversation=conv.id)
    assert "Julia" in later.output_text


def test_models_and_metrics(api: tuple[openai.OpenAI, Any]) -> None:
    c, _ = api
    assert [m.id for m in c.models.list()] == ["rxt"]
    c.responses.create(model="rxt", input=JULIA)
    text = _metrics(c)
    for name in (
        'rxrt_http_requests_total{route="/v1/responses",status="200"}',
        'rxrt_tokens_total{kind="prompt",model="rxt"}',
        'rxrt_tokens_total{kind="completion",model="rxt"}',
        'rxrt_time_to_first_token_seconds_count{model="rxt"}',
        'rxrt_inter_token_latency_seconds_count{model="rxt"}',
        'rxrt_e2e_request_latency_seconds_count{model="rxt"}',
        'rxrt_queue_time_seconds_count{model="rxt"}',
        'rxrt_memory_update_seconds_count{model="rxt"}',
        'rxrt_stm_versions_written_total{model="rxt"}',
        "rxrt_queue_depth",
        "rxrt_open_conversations",
        "rxrt_store_errors_total",
    ):
        assert name in text, name
    assert _sample(text, "rxrt_open_conversations") >= 1
    deadline = time.monotonic() + 30  # the non-streamed answer returns before its memory update commits
    while _sample(text, 'rxrt_memory_update_seconds_count{model="rxt"}') < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        text = _metrics(c)
    assert _sample(text, 'rxrt_stm_versions_written_total{model="rxt"}') >= 1


def _metrics(c: openai.OpenAI) -> str:
    base = str(c.base_url).removesuffix("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics") as reply:
        return str(reply.read().decode())


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_idle_conversations_beyond_the_bound_close_and_reopen_from_the_store() -> None:
    store = InMemoryStore()
    with (
        rxruntime.load("small", store=store) as engine,
        served(engine, max_open_conversations=1, idle_close_s=0.0) as (url, _),
    ):
        c = client(url)
        first = c.conversations.create(metadata={"who": "julia"})
        c.responses.create(model="rxt", input=JULIA, conversation=first.id)
        engine.wait_idle(first.id)
        c.conversations.create()  # over the bound: the idle first one is closed in the engine
        assert engine.open_conversations == 1
        assert store.get(first.id) is not None
        assert "Julia" in c.responses.create(model="rxt", input=ASK_NAME, conversation=first.id).output_text
        assert c.conversations.retrieve(first.id).metadata == {"who": "julia"}
