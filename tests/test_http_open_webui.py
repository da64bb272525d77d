"""Open WebUI's calls, replayed from its own request shapes (tests/fixtures/open_webui/README.md says
which file of Open WebUI each field comes from), and the answers read as Open WebUI reads them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rxruntime

from .http_server import served

FIXTURES = Path(__file__).parent / "fixtures" / "open_webui"
KEY = "sk-webui"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with rxruntime.load("small") as engine, served(engine, api_keys=[KEY]) as (url, _):
        yield f"{url}/v1"  # Open WebUI's connection URL ends in /v1


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def _send(url: str, request: dict[str, Any], key: str = KEY) -> tuple[int, str, bytes]:
    """(status, content type, body) of the request as Open WebUI's backend sends it (aiohttp, a bearer key)."""
    body = request["body"]
    sent = urllib.request.Request(
        url + request["path"],
        method=request["method"],
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(sent, timeout=300) as reply:
            return reply.status, reply.headers.get("content-type", ""), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def _read_stream(raw: bytes) -> tuple[str, dict[str, Any] | None, list[str | None]]:
    """As Open WebUI's middleware reads a stream: ``data:`` lines up to ``[DONE]``; text from
    ``choices[0].delta.content``, ``usage`` from whichever chunk carries it."""
    text, usage, finishes = "", None, []
    lines = [line for line in raw.decode().splitlines() if line.startswith("data:")]
    assert lines[-1].removeprefix("data:").strip() == "[DONE]"
    for line in lines[:-1]:
        data = json.loads(line.removeprefix("data:").strip())
        assert "error" not in data, data
        if data.get("usage"):
            usage = data["usage"]
        choices = data.get("choices", [])
        if not choices:
            continue
        delta = choices[0].get("delta", {})
        text += delta.get("content") or ""
        finishes.append(choices[0].get("finish_reason"))
    return text, usage, finishes


def test_list_models_with_a_bearer_key(url: str) -> None:
    request = _fixture("models.json")
    status, kind, raw = _send(url, request)
    assert status == 200 and kind.startswith("application/json")
    models = [m for m in json.loads(raw)["data"] if m.get("id") or m.get("name")]  # merge_models_lists
    assert [m["id"] for m in models] == ["rxt"]
    status, _, raw = _send(url, request, key="sk-wrong")
    assert status == 401 and json.loads(raw)["error"]["message"]  # shown as the connection's error


def test_streamed_chat_with_usage(url: str) -> None:
    status, kind, raw = _send(url, _fixture("chat_stream.json"))
    assert status == 200 and kind.startswith("text/event-stream")
    text, usage, finishes = _read_stream(raw)
    assert text
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert usage is not None
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def test_user_set_parameters_and_a_stop_sequence(url: str) -> None:
    request = _fixture("chat_params.json")
    status, _, raw = _send(url, request)
    assert status == 200
    text, usage, finishes = _read_stream(raw)
    assert usage is not None and usage["completion_tokens"] <= request["body"]["max_tokens"]
    assert "\n" not in text and "USER:" not in text  # a stop sequence is never shown
    # the seed makes it the same answer again, and the same as the API gives without streaming
    again = _read_stream(_send(url, request)[2])[0]
    assert again == text
    whole = {**request["body"], "stream": False}
    whole.pop("stream_options")
    status, _, raw = _send(url, {**request, "body": whole})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == text
    assert finishes[-1] in ("stop", "length")


def test_title_generation_without_streaming(url: str) -> None:
    status, kind, raw = _send(url, _fixture("title.json"))
    assert status == 200 and kind.startswith("application/json")
    reply = json.loads(raw)
    content = reply["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    # Open WebUI cuts the text between the first '{' and the last '}' and falls back when that is no
    # JSON: what matters here is that the reply has the shape it reads, and a finish reason
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1


def test_top_k_as_open_webui_passes_it_on_is_honoured(url: str) -> None:
    """Open WebUI copies a user's ``top_k`` as it is (tests/fixtures/open_webui/README.md): at the
    fixture's temperature, ``top_k: 1`` leaves only the likeliest token, so the greedy answer."""
    request = _fixture("chat_params.json")
    greedy = _send(url, {**request, "body": {**request["body"], "temperature": 0}})
    top_1 = _send(url, {**request, "body": {**request["body"], "top_k": 1}})
    assert greedy[0] == top_1[0] == 200
    assert _read_stream(top_1[2])[0] == _read_stream(greedy[2])[0]
    assert _send(url, {**request, "body": {**request["body"], "top_k": 40}})[0] == 200


def test_penalties_as_open_webui_sends_them_are_honoured(url: str) -> None:
    """Open WebUI sends a user's penalties as floats (tests/fixtures/open_webui/README.md): the turn
    runs and, seeded, gives the same answer again."""
    request = _fixture("chat_params.json")
    body = {**request["body"], **_fixture("penalty_params.json")}
    first, again = _send(url, {**request, "body": body}), _send(url, {**request, "body": body})
    assert first[0] == again[0] == 200
    text = _read_stream(first[2])[0]
    assert text == _read_stream(again[2])[0]


@pytest.mark.parametrize("field", sorted(_fixture("refused_params.json")))
def test_each_parameter_we_cannot_honour_is_a_400_naming_it(url: str, field: str) -> None:
    request = _fixture("chat_params.json")
    value = _fixture("refused_params.json")[field]
    status, _, raw = _send(url, {**request, "body": {**request["body"], field: value}})
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["param"] == field and error["message"]
    assert error["code"] in ("unsupported_parameter", "unknown_parameter")
