"""What real clients do besides the basics: browsers (CORS), model lookups, the legacy Completions
API, usage that cost tools can subtract, and the calls a chat UI makes (list models with a key,
stream a chat with usage, a short non-streamed title request, a stop sequence)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import rxruntime
from rxruntime.engine import Engine

from .http_server import ASK_NAME, JULIA, client, served

PAGE = "http://page.example"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small") as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with served(engine, api_keys=["k"], cors_origins=[PAGE]) as (url, _):
        yield url


def _call(url: str, method: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


# ---------------------------------------------------------------------- CORS
def test_cors_preflight_and_response_headers(url: str) -> None:
    preflight = {
        "Origin": PAGE,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers = _call(f"{url}/v1/chat/completions", "OPTIONS", preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == PAGE
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers = _call(f"{url}/v1/models", "GET", {"Origin": PAGE, "Authorization": "Bearer k"})
    assert status == 200 and headers["access-control-allow-origin"] == PAGE
    assert "x-rxrt-conversation" in headers["access-control-expose-headers"].lower()
    status, headers = _call(f"{url}/v1/chat/completions", "OPTIONS", {**preflight, "Origin": "http://other.example"})
    assert status == 400 and "access-control-allow-origin" not in headers


def test_cors_is_off_by_default(engine: Engine) -> None:
    with served(engine) as (url, _):
        preflight = {"Origin": PAGE, "Access-Control-Request-Method": "POST"}
        status, headers = _call(f"{url}/v1/chat/completions", "OPTIONS", preflight)
        assert status == 405 and "access-control-allow-origin" not in headers
        status, headers = _call(f"{url}/v1/models", "GET", {"Origin": PAGE})
        assert status == 200 and "access-control-allow-origin" not in headers


# ---------------------------------------------------------------------- models
def test_model_by_id(url: str) -> None:
    c = client(url, "k")
    assert c.models.retrieve("rxt").id == "rxt"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4o")
    body: Any = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == "not_found"


# ---------------------------------------------------------------------- completions
def test_completions_one_turn_in_a_fresh_conversation(url: str) -> None:
    c = client(url, "k")
    done = c.completions.create(model="rxt", prompt=JULIA, max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text
    assert done.usage is not None and done.usage.completion_tokens <= 6
    pieces: list[str] = []
    usage = None
    for chunk in c.completions.create(
        model="rxt", prompt=JULIA, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        pieces.extend(choice.text for choice in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(pieces)  # each fresh conversation starts from its own random STM: not the same text
    assert usage is not None and 1 <= usage.completion_tokens <= 6
    assert usage.prompt_tokens == done.usage.prompt_tokens  # the same prompt, read whole


def test_completions_in_a_named_conversation_remember(url: str) -> None:
    c = client(url, "k")
    conv = c.conversations.create()
    c.completions.create(model="rxt", prompt=JULIA, max_tokens=16, extra_body={"conversation": conv.id})
    answer = c.completions.create(model="rxt", prompt=ASK_NAME, max_tokens=16, extra_body={"conversation": conv.id})
    assert "Julia" in answer.choices[0].text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="rxt", prompt=ASK_NAME, extra_body={"conversation": "conv_unknown"})
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="rxt", prompt=ASK_NAME, echo=True)
    assert err.value.body["param"] == "echo"  # type: ignore[index]


# ---------------------------------------------------------------------- usage
def test_chat_usage_counts_cached_tokens_inside_the_prompt(url: str) -> None:
    c = client(url, "k")
    first = c.chat.completions.create(model="rxt", messages=[{"role": "user", "content": JULIA}], max_tokens=12)
    history: Any = [
        {"role": "user", "content": JULIA},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": ASK_NAME},
    ]
    for _ in range(2):  # a miss, then a hit from the history cache
        reply = c.chat.completions.create(model="rxt", messages=history, max_tokens=4)
        usage: Any = reply.usage
        details = usage.prompt_tokens_details
        assert 0 <= details.cached_tokens <= usage.prompt_tokens
        extra = usage.model_extra["rxrt"]
        assert usage.prompt_tokens == extra["query_tokens"] + extra["stm_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert details.cached_tokens > 0 and extra["history_cache"] == "hit"


# ---------------------------------------------------------------------- a chat UI's calls
def test_a_chat_ui_session(url: str) -> None:
    """List models with a bearer key, stream a chat with usage, ask a title without streaming, stop."""
    c = client(url, "k")
    assert [m.id for m in c.models.list()] == ["rxt"]
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(
            {
                "model": "rxt",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": JULIA}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 12,
            }
        ).encode(),
        headers={"Authorization": "Bearer k", "Content-Type": "application/json", "Origin": PAGE},
    )
    with urllib.request.urlopen(request) as reply:
        assert reply.headers["access-control-allow-origin"] == PAGE
        lines = [line for line in reply.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []
    title = c.chat.completions.create(
        model="rxt",
        messages=[{"role": "user", "content": f"Create a concise title for this chat: {JULIA}"}],
        stream=False,
        max_tokens=8,
    )
    assert title.choices[0].message.content is not None
    stopped = c.chat.completions.create(
        model="rxt", messages=[{"role": "user", "content": JULIA}], max_tokens=12, stop=["\n", " "]
    )
    assert " " not in (stopped.choices[0].message.content or "").strip()


# ---------------------------------------------------------------------- metrics
def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as reply:  # open: no key needed by default
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            total += float(line.split()[1])
    return total


def test_metrics_observe_every_token_gap_with_a_model_label(engine: Engine) -> None:
    with served(engine, model_name="tiny") as (url, _):
        c = client(url)
        done = c.responses.create(model="tiny", input=JULIA, max_output_tokens=9, store=False)
        assert done.usage is not None
        n = done.usage.output_tokens
        assert n >= 2
        assert _metric(url, 'rxrt_inter_token_latency_seconds_count{model="tiny"}') == n - 1  # one per gap
        assert _metric(url, 'rxrt_tokens_total{kind="completion",model="tiny"}') == n
        reason = "length" if done.status == "incomplete" else "eos"
        assert _metric(url, f'rxrt_requests_finished_total{{finish_reason="{reason}",model="tiny"}}') == 1
        for name in ("time_to_first_token", "e2e_request_latency", "queue_time"):
            assert _metric(url, f'rxrt_{name}_seconds_count{{model="tiny"}}') == 1
        stream = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": JULIA}], max_tokens=12, stop=" ", stream=True
        )
        assert [chunk.choices[0].finish_reason for chunk in stream][-1] == "stop"
        assert _metric(url, 'rxrt_requests_finished_total{finish_reason="stop",model="tiny"}') >= 1


# ---------------------------------------------------------------------- the memory, watched
def test_the_stream_carries_what_the_memory_update_changed(url: str, engine: Engine) -> None:
    events = list(client(url, "k").responses.create(model="rxt", input=JULIA, max_output_tokens=8, stream=True))
    updated: Any = next(e for e in events if str(e.type) == "rxrt.memory.updated")
    layers = updated.layers
    assert len(layers) == engine.config.num_layers
    assert all(layer["change"] > 0 and 0 <= layer["gate"] <= 1 for layer in layers)
