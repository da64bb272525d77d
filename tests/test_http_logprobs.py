"""Log probabilities over real HTTP with the official ``openai`` client, in each API's shape.

Chat Completions (``logprobs`` + ``top_logprobs``, streamed and not), legacy Completions
(``logprobs``: tokens, token_logprobs, top_logprobs, text_offset) and Responses
(``include: ["message.output_text.logprobs"]`` + ``top_logprobs``). Every reported value is
checked against ``log_softmax`` of the torch model's logits for that position, teacher-forced over
the same tokens from the same STM; tokens cut by a stop sequence are not reported; a request
that does not ask gets none, also when it shares the decode batch with one that does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import openai
import pytest
import torch

import rxruntime
from rxruntime.engine import Engine

from .engine_util import teacher_forced_logprobs
from .http_server import JULIA, client, served


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The shipped model in float32: the decode step equals the torch forward to float tolerance."""
    with rxruntime.load("small", weights="fp32") as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with served(engine) as (url, _):
        yield url


@pytest.fixture(scope="module")
def chat_stm(engine: Engine) -> torch.Tensor:
    """The STM a chat request without history starts from (the front opens it with seed 0)."""
    conv = engine.conversation("reference-seed-0", seed=0)
    stm = engine.snapshot(conv.id)[0]
    conv.close()
    return stm


def _ids_of(engine: Engine, token_bytes: Sequence[Sequence[int]]) -> list[int]:
    """The ids of reported tokens, from their ``bytes`` (unique per token in byte-level BPE)."""
    tok = engine.tokenizer
    by_bytes = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    return [by_bytes[bytes(b)] for b in token_bytes]


def _check(engine: Engine, stm: torch.Tensor, query: str, entries: Sequence[Any], k: int) -> None:
    """Each entry (token, logprob, bytes, top_logprobs) against the teacher-forced model."""
    tok = engine.tokenizer
    ids = _ids_of(engine, [e.bytes for e in entries])
    reference = teacher_forced_logprobs(engine.model, stm, tok.prompt_ids(tok.encode(query)), ids)
    for entry, token_id, ref in zip(entries, ids, reference):
        assert entry.token == tok.token_piece(token_id)
        assert entry.logprob == pytest.approx(float(ref[token_id]), abs=1e-4)
        top = entry.top_logprobs
        assert len(top) == k
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert [t.logprob for t in top] == pytest.approx(ref.topk(k).values.tolist(), abs=1e-4)
        assert [bytes(t.bytes) for t in top] == [tok.token_bytes(i) for i in ref.topk(k).indices.tolist()]


def _chat(url: str, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"temperature": 0, "max_tokens": 16, **kwargs}
    return client(url).chat.completions.create(model="rxt", messages=[{"role": "user", "content": JULIA}], **options)


# ---------------------------------------------------------------------- chat completions
def test_chat_reports_the_models_logprobs(url: str, engine: Engine, chat_stm: torch.Tensor) -> None:
    reply = _chat(url, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens >= 3
    _check(engine, chat_stm, JULIA, content, 3)
    assert all(e.top_logprobs[0].token == e.token for e in content)  # greedy: the chosen token leads
    assert "".join(e.token for e in content).lstrip(" ") == choice.message.content
    assert choice.logprobs.refusal is None


def test_chat_streams_logprobs_with_each_piece(url: str, engine: Engine, chat_stm: torch.Tensor) -> None:
    whole = _chat(url, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    entries: list[Any] = []
    for chunk in _chat(url, logprobs=True, top_logprobs=2, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None
            pieces = "".join(e.token for e in choice.logprobs.content)
            assert pieces.lstrip(" ") == choice.delta.content.lstrip(" ")  # each chunk: its own tokens
        if choice.logprobs is not None:
            entries.extend(choice.logprobs.content)
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in whole]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole], abs=1e-6)
    _check(engine, chat_stm, JULIA, entries, 2)


def test_chat_without_logprobs_reports_none(url: str) -> None:
    reply = _chat(url, logprobs=False, top_logprobs=0)
    assert reply.choices[0].logprobs is None
    chunks = [c for c in _chat(url, stream=True) if c.choices]
    assert all(c.choices[0].logprobs is None for c in chunks)


def test_one_request_asking_and_one_not_at_once(url: str) -> None:
    """Two requests in flight together (they share decode steps when admitted together)."""
    solo = _chat(url).choices[0].message.content
    results: dict[str, Any] = {}

    def run(name: str, **kwargs: Any) -> None:
        results[name] = _chat(url, **kwargs)

    threads = [
        threading.Thread(target=run, args=("asking",), kwargs={"logprobs": True, "top_logprobs": 1}),
        threading.Thread(target=run, args=("silent",)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    asking, silent = results["asking"].choices[0], results["silent"].choices[0]
    assert asking.message.content == silent.message.content == solo
    assert silent.logprobs is None
    assert len(asking.logprobs.content) == results["asking"].usage.completion_tokens


# ---------------------------------------------------------------------- stop sequences
def _starts(tokens: Sequence[str]) -> list[int]:
    """Where each token's text starts in the answer (whose first leading space is trimmed)."""
    starts, at = [], 0
    for i, token in enumerate(tokens):
        starts.append(at)
        at += len(token.lstrip(" ") if i == 0 else token)
    return starts


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_cut_by_a_stop_sequence_are_not_reported(url: str, stream: bool) -> None:
    full = _chat(url, logprobs=True).choices[0]
    text, tokens = full.message.content, [e.token for e in full.logprobs.content]
    assert text.isascii() and len(tokens) >= 4, text
    cut = _starts(tokens)[len(tokens) // 2] + 1  # inside a token: that token was partly shown
    stop = text[cut : cut + 2]
    shown = text[: text.index(stop)]
    if stream:
        entries: list[Any] = []
        content = ""
        for chunk in _chat(url, logprobs=True, stop=[stop], stream=True):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                entries.extend(chunk.choices[0].logprobs.content)
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
    else:
        cut_reply = _chat(url, logprobs=True, stop=[stop]).choices[0]
        entries, content = cut_reply.logprobs.content, cut_reply.message.content
    assert content == shown
    reported = [e.token for e in entries]
    assert reported == [t for t, start in zip(tokens, _starts(tokens)) if start < len(shown)]
    assert len(reported) < len(tokens)
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in full.logprobs.content[: len(entries)]])


# ---------------------------------------------------------------------- legacy completions
def _named_conversation(url: str, engine: Engine) -> tuple[str, torch.Tensor]:
    conv = client(url).conversations.create()
    return conv.id, engine.snapshot(conv.id)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_report_tokens_logprobs_alternatives_and_offsets(url: str, engine: Engine, stream: bool) -> None:
    cid, stm = _named_conversation(url, engine)
    options: dict[str, Any] = {"logprobs": 2, "max_tokens": 12, "temperature": 0, "extra_body": {"conversation": cid}}
    c = client(url)
    if stream:
        text, tokens, values, tops, offsets = "", [], [], [], []
        for chunk in c.completions.create(model="rxt", prompt=JULIA, stream=True, **options):
            choice = chunk.choices[0]
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                tops += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
    else:
        choice = c.completions.create(model="rxt", prompt=JULIA, **options).choices[0]
        text, lp = choice.text, choice.logprobs
        tokens, values, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    assert len(tokens) == len(values) == len(tops) == len(offsets) >= 3
    tok = engine.tokenizer
    by_text = {tok.token_piece(i): i for i in range(tok.vocab_size)}
    ids = [by_text[t] for t in tokens]
    reference = teacher_forced_logprobs(engine.model, stm, tok.prompt_ids(tok.encode(JULIA)), ids)
    for token_id, value, top, ref in zip(ids, values, tops, reference):
        assert value == pytest.approx(float(ref[token_id]), abs=1e-4)
        assert tok.token_piece(token_id) in top and len(top) <= 3  # the chosen token and 2 alternatives
        best = ref.topk(2)
        for alt, logprob in zip(best.indices.tolist(), best.values.tolist()):
            assert top[tok.token_piece(alt)] == pytest.approx(logprob, abs=1e-4)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for i, (token, offset) in enumerate(zip(tokens, offsets)):
        assert text[offset:].startswith(token.lstrip(" ") if i == 0 else token)


# ---------------------------------------------------------------------- responses
def test_responses_include_logprobs(url: str, engine: Engine) -> None:
    cid, stm = _named_conversation(url, engine)
    response: Any = client(url).responses.create(
        model="rxt",
        input=JULIA,
        conversation=cid,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=12,
        temperature=0,
    )
    part = response.output[0].content[0]
    assert part.type == "output_text" and part.logprobs is not None
    assert len(part.logprobs) == response.usage.output_tokens
    _check(engine, stm, JULIA, part.logprobs, 2)
    assert "".join(e.token for e in part.logprobs).lstrip(" ") == part.text
    assert response.top_logprobs == 2


def test_responses_stream_logprobs_on_each_delta(url: str, engine: Engine) -> None:
    cid, stm = _named_conversation(url, engine)
    deltas: list[Any] = []
    done: list[Any] = []
    final: Any = None
    stream = client(url).responses.create(
        model="rxt", input=JULIA, conversation=cid, top_logprobs=1, max_output_tokens=10, temperature=0, stream=True
    )
    for event in stream:
        if event.type == "response.output_text.delta":
            assert len(event.logprobs) >= 1 or not event.delta
            deltas.extend(event.logprobs)
        elif event.type == "response.output_text.done":
            done = list(event.logprobs)
        elif event.type == "response.completed":
            final = event.response
    assert [d.model_dump() for d in deltas] == [d.model_dump() for d in done]
    assert final is not None and final.output[0].content[0].logprobs is not None
    items = final.output[0].content[0].logprobs
    assert [(e.token, e.logprob) for e in items] == [(d.token, d.logprob) for d in deltas]
    _check(engine, stm, JULIA, items, 1)


def test_responses_without_include_report_none(url: str) -> None:
    response: Any = client(url).responses.create(model="rxt", input=JULIA, max_output_tokens=4, store=False)
    assert response.output[0].content[0].logprobs is None


# ---------------------------------------------------------------------- refused values
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # alternatives without logprobs: true
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("responses", {"top_logprobs": 21}, "top_logprobs"),
    ("responses", {"include": ["reasoning.encrypted_content"]}, "include"),
    ("responses", {"include": "message.output_text.logprobs"}, "include"),
]


@pytest.mark.parametrize(("api", "fields", "param"), REFUSED)
def test_out_of_range_values_are_refused_by_name(url: str, api: str, fields: dict[str, Any], param: str) -> None:
    c = client(url)
    calls: dict[str, Callable[[], object]] = {
        "chat": lambda: c.chat.completions.create(
            model="rxt", messages=[{"role": "user", "content": JULIA}], extra_body=fields
        ),
        "completions": lambda: c.completions.create(model="rxt", prompt=JULIA, extra_body=fields),
        "responses": lambda: c.responses.create(model="rxt", input=JULIA, store=False, extra_body=fields),
    }
    with pytest.raises(openai.BadRequestError) as err:
        calls[api]()
    body: Any = err.value.body
    assert body["param"] == param and param in body["message"], body
