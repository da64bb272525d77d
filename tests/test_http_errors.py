"""Keys and errors over real HTTP: each failure is OpenAI's error object with its status code."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import rxruntime
from rxruntime.engine import Engine
from rxruntime.models.checkpoint import load_pretrained

from .http_server import ASK_NAME, JULIA, assert_recalls_julia, client, served


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small") as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with served(engine) as (url, _):
        yield url


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as reply:
            body = reply.read()
            status = reply.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


# ---------------------------------------------------------------------- keys
def test_api_keys_guard_v1_but_not_health_or_metrics(engine: Engine, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nkey-b\n\n")
    from rxruntime.serving.http.bearer import KeyRing

    with served(engine, api_keys=KeyRing.from_file(key_file, ["key-a"])) as (url, _):
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, "wrong").models.list()
        assert _error(err.value)["type"] == "authentication_error"
        status, body = _get(f"{url}/v1/models")  # no Authorization header at all
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert _get(f"{url}/health")[0] == 200
        assert _get(f"{url}/metrics")[0] == 200  # scrapers hold no API key: open unless metrics keys are set
        assert _get(f"{url}/v1/models", {"Authorization": "Basic key-a"})[0] == 401
        a, b = client(url, "key-a"), client(url, "key-b")
        conv = a.conversations.create()
        told = a.responses.create(model="rxt", input=JULIA, conversation=conv.id).output_text
        # another key's conversation looks exactly like one that does not exist
        with pytest.raises(openai.NotFoundError):
            b.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id)
        with pytest.raises(openai.NotFoundError):
            b.conversations.delete(conv.id)
        asked = a.responses.create(model="rxt", input=ASK_NAME, conversation=conv.id).output_text
        assert_recalls_julia(asked, conv.id, told)


def test_metrics_keys_guard_metrics_alone(engine: Engine) -> None:
    with served(engine, metrics_keys=["scrape"]) as (url, _):
        assert _get(f"{url}/metrics")[0] == 401
        assert _get(f"{url}/metrics", {"Authorization": "Bearer other"})[0] == 401
        assert _get(f"{url}/metrics", {"Authorization": "Bearer scrape"})[0] == 200
        assert _get(f"{url}/v1/models")[0] == 200  # no API keys: /v1 stays open


# ---------------------------------------------------------------------- 400: the bad field is named
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": JULIA, "temperature": "hot"}, "temperature"),
        ({"input": JULIA, "top_p": 0}, "top_p"),
        ({"input": JULIA, "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": JULIA, "stream": "yes"}, "stream"),
        ({"input": 42}, "input"),
        ({}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "input[1]"),
        ({"input": JULIA, "conversation": 7}, "conversation"),
        ({"input": JULIA, "metadata": {"k": 1}}, "metadata.k"),
        ({"input": JULIA, "conversation": "conv_x", "previous_response_id": "resp_x_1"}, "previous_response_id"),
    ],
)
def test_responses_bad_fields_are_named(url: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(url).post("/responses", body=body, cast_to=object)
    error = _error(err.value)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert err.value.status_code == 400


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "assistant", "content": "hi"}], "messages[0]"),
        ([{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role"),
    ],
)
def test_chat_bad_messages_are_named(url: str, messages: list[Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model="rxt", messages=messages)
    assert _error(err.value)["param"] == param


def test_chat_options_we_cannot_honour_are_refused(url: str) -> None:
    messages: Any = [{"role": "user", "content": JULIA}]
    for extra, param in (({"n": 2}, "n"), ({"stop": [""]}, "stop"), ({"max_tokens": -1}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            client(url).chat.completions.create(model="rxt", messages=messages, **extra)
        assert _error(err.value)["param"] == param


def test_a_body_that_is_not_json(url: str) -> None:
    request = urllib.request.Request(f"{url}/v1/responses", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["param"] == "body"


# ---------------------------------------------------------------------- 404, 413
def test_unknown_conversation_response_and_route(url: str) -> None:
    c = client(url)
    for call in (
        lambda: c.conversations.retrieve("conv_doesnotexist"),
        lambda: c.conversations.delete("conv_doesnotexist"),
        lambda: c.responses.create(model="rxt", input=JULIA, conversation="conv_doesnotexist"),
        lambda: c.responses.create(model="rxt", input=JULIA, previous_response_id="resp_doesnotexist_3"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert _error(err.value)["code"] == "not_found"
    status, body = _get(f"{url}/v1/nothing/here")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_a_query_too_long_is_413(url: str, engine: Engine) -> None:
    c = client(url)
    long = "Count from 2 to 5. " * engine.max_seq_len
    with pytest.raises(openai.APIStatusError) as err:
        c.responses.create(model="rxt", input=long)
    assert err.value.status_code == 413 and _error(err.value)["param"] == "input"
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="rxt", messages=[{"role": "user", "content": long}])
    assert err.value.status_code == 413 and _error(err.value)["code"] == "query_too_long"
    with pytest.raises(openai.APIStatusError) as err:  # a streamed request fails before its stream starts
        c.responses.create(model="rxt", input=long, stream=True)
    assert err.value.status_code == 413
    # nothing else is hurt
    assert c.responses.create(model="rxt", input=JULIA).output_text


# ---------------------------------------------------------------------- 429, 503
def test_a_full_queue_is_429() -> None:
    model, tokenizer = load_pretrained("small")
    assert tokenizer is not None
    with Engine(model, tokenizer, max_queued_turns=0) as engine, served(engine) as (url, _):
        c = client(url)
        with pytest.raises(openai.RateLimitError) as err:
            c.responses.create(model="rxt", input=JULIA)
        assert _error(err.value)["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="rxt", messages=[{"role": "user", "content": JULIA}], stream=True)


def test_503_while_loading_and_after_shutdown() -> None:
    release = threading.Event()

    def slow_load() -> Engine:
        release.wait(60)
        return rxruntime.load("small")

    with served(slow_load) as (url, _):
        status, body = _get(f"{url}/health")
        assert (status, body["status"]) == (503, "loading")
        with pytest.raises(openai.InternalServerError) as err:
            client(url).models.list()
        assert err.value.status_code == 503 and _error(err.value)["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 60
        while _get(f"{url}/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [m.id for m in client(url).models.list()] == ["rxt"]
    # an engine closed under the server: new turns are refused with 503
    engine = rxruntime.load("small")
    with served(engine) as (url, _):
        c = client(url)
        conv = c.conversations.create()
        engine.close()
        with pytest.raises(openai.InternalServerError) as err:
            c.responses.create(model="rxt", input=JULIA, conversation=conv.id)
        assert err.value.status_code == 503 and _error(err.value)["code"] == "shutting_down"


def test_a_model_that_fails_to_load_is_503_with_the_reason() -> None:
    def broken() -> Engine:
        raise FileNotFoundError("no model at /nowhere")

    with served(broken) as (url, _):
        deadline = time.monotonic() + 30
        while (reply := _get(f"{url}/health"))[1]["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, body = reply
        assert status == 503 and body["status"] == "failed" and "no model at /nowhere" in body["error"]
        with pytest.raises(openai.InternalServerError) as err:
            client(url).responses.create(model="rxt", input=JULIA)
        assert _error(err.value)["code"] == "load_failed"


def test_a_body_over_the_limit_is_413(engine: Engine) -> None:
    with served(engine, max_body_bytes=200) as (url, _):
        with pytest.raises(openai.APIStatusError) as err:
            client(url).responses.create(model="rxt", input="x" * 300)
        assert err.value.status_code == 413 and _error(err.value)["code"] == "too_large"
        assert client(url).responses.create(model="rxt", input=JULIA).output_text  # small ones still pass
