"""``POST /v1/chat/completions``: stateless clients, whose history becomes STM without re-reading it.

The last user message is the query. The memory for everything before it comes from
:class:`~rxruntime.serving.http_history.HistoryCache` when the same history was seen before (the
STM after our previous answer is cached under the hash of the turns), and otherwise from replaying
the missing (user, assistant) pairs through the encoder and memory attention only, one memory
update per pair and no decoding. A leading ``system`` message initialises memory from text.

Each request runs on a conversation of its own that lives for that request; after the answer its
memory update commits in the background, the resulting STM is cached for the client's next request
(which waits for it rather than replaying), and the conversation is closed. ``usage`` says what
was replayed in the extension field ``rxrt``, and ``prompt_tokens_details.cached_tokens`` counts
the history tokens the cache spared.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from torch import Tensor

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.events import AnswerCompleted, Token
from rxruntime.serving.http_auth import new_id
from rxruntime.serving.http_context import Context
from rxruntime.serving.http_errors import APIError, bad_field, from_engine_error
from rxruntime.serving.http_fields import json_body, message_text, opt_bool, opt_int, sampling_options
from rxruntime.serving.http_history import Pair, extend_key, prefix_keys
from rxruntime.serving.http_registry import replay_pairs
from rxruntime.serving.http_sse import sse, sse_response
from rxruntime.serving.http_turns import Turn, TurnSummary

_FINISH = {"eos": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class History:
    system: str | None
    pairs: list[Pair]
    query: str


@dataclass
class Replay:
    """How the memory for the history was obtained (reported in ``usage.rxrt``)."""

    history_turns: int
    cached_turns: int
    replayed_turns: int
    replayed_tokens: int
    cached_tokens: int
    cache: str  # hit (all from the cache), partial, miss (all replayed), none (no history)


async def create_chat_completion(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes)
    engine = ctx.slot.engine
    history = parse_messages(body.get("messages"))
    stream = opt_bool(body, "stream", False)
    n = opt_int(body, "n", 1, 1)
    del n  # one choice: a conversation's memory takes one answer
    if body.get("stop") is not None:
        raise bad_field("stop", "stop sequences are not supported; the model ends its answers with [EOS]")
    options = sampling_options(body, ("max_tokens", "max_completion_tokens"))
    include_usage = stream and _include_usage(body.get("stream_options"))

    keys = prefix_keys(history.system, history.pairs)
    conv, replay = await _memory_for(ctx, engine, owner, history, keys)
    turn = Turn(conv, history.query, options, ctx.metrics, "messages")
    try:
        await turn.start()
    except APIError:
        _finish_in_background(ctx, conv, None, None)
        raise
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not stream:
        try:
            summary = await turn.answer_only()
        finally:
            _cache_after_answer(ctx, conv, turn, history, keys)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": ctx.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": summary.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": _FINISH[summary.finish_reason],
                    }
                ],
                "usage": _usage(summary, replay),
            }
        )
    return sse_response(_stream(ctx, conv, turn, history, keys, replay, completion_id, created, include_usage))


async def _stream(
    ctx: Context,
    conv: Conversation,
    turn: Turn,
    history: History,
    keys: list[str],
    replay: Replay,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model_name,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return sse(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in turn.events():
            if isinstance(ev, Token) and ev.text:
                yield chunk({"content": ev.text})
            elif isinstance(ev, AnswerCompleted):
                summary = turn.summary()
                yield chunk({}, _FINISH[summary.finish_reason])
                if include_usage:
                    yield chunk({}, usage=_usage(summary, replay))
                yield sse("[DONE]")
                break
    except APIError as exc:
        yield sse(exc.body())
    finally:
        with anyio.CancelScope(shield=True):  # the client may have gone: still clean up
            await turn.aclose()
            _cache_after_answer(ctx, conv, turn, history, keys)


# ---------------------------------------------------------------------- memory for the history
async def _memory_for(
    ctx: Context, engine: Engine, owner: str, history: History, keys: list[str]
) -> tuple[Conversation, Replay]:
    """A fresh conversation whose STM holds the history: from the cache, else replayed."""
    n = len(history.pairs)
    cached_k, stm = 0, None
    while True:
        found = ctx.history.longest(keys)
        if found is None:
            break
        k, entry = found
        result = await asyncio.wrap_future(entry)
        if result is not None:
            cached_k, stm = k, result
            break
        ctx.history.discard(keys[k], entry)  # failed meanwhile: look again
    tokenizer = engine.tokenizer
    missing = history.pairs[cached_k:]
    cached_tokens = (
        sum(len(tokenizer.interaction_ids(u, a)) for u, a in history.pairs[:cached_k]) if stm is not None else 0
    )
    replayed_tokens = sum(len(tokenizer.interaction_ids(u, a)) for u, a in missing)
    conversation_id = new_id("chat", owner)

    computed = bool(missing) or (stm is None and history.system is not None)

    def open_and_replay() -> Conversation:
        if stm is not None:
            conv = engine.conversation(conversation_id, stm=stm)
        else:  # one fixed random STM: the same history gives the same memory, whatever the id
            conv = engine.conversation(conversation_id, memory_init=history.system, seed=0)
        try:
            if missing:
                replay_pairs(conv, missing)
            if computed:  # the history's own STM, for a client that asks again from the same point
                ctx.history.put(keys[n], conv.export_state(wait=True).stm)
        except BaseException:
            _close(conv)
            raise
        return conv

    try:
        conv = await ctx.blocking(open_and_replay)
    except Exception as exc:
        raise from_engine_error(exc, "messages") from exc
    if not n and history.system is None:
        cache = "none"
    else:
        cache = "miss" if stm is None else "partial" if missing else "hit"
        ctx.metrics.replay.labels(cache).inc()
    ctx.metrics.replayed_turns.inc(len(missing))
    replay = Replay(n, cached_k if stm is not None else 0, len(missing), replayed_tokens, cached_tokens, cache)
    return conv, replay


def _cache_after_answer(ctx: Context, conv: Conversation, turn: Turn, history: History, keys: list[str]) -> None:
    """Once the answer's memory update commits: cache the STM under history + answer, then close."""
    answer = turn.answer
    if answer is None or answer.finish_reason == "cancelled":
        _finish_in_background(ctx, conv, None, None)
        return
    key = extend_key(keys[-1], history.query, answer.text)
    _finish_in_background(ctx, conv, key, ctx.history.reserve(key))


def _finish_in_background(
    ctx: Context, conv: Conversation, key: str | None, slot: Future[Tensor | None] | None
) -> None:
    def work() -> None:
        stm = None
        try:
            if slot is not None:
                conv.wait_for_memory()
                stm = conv.export_state(wait=False).stm
        except Exception:
            stm = None
        finally:
            if slot is not None:
                slot.set_result(stm)
            _close(conv)

    ctx.background.submit(work)


def _close(conv: Conversation) -> None:
    try:
        if conv.backend.store is not None:
            conv.delete()  # a request's conversation is never resumed: keep the store clean
        else:
            conv.close()
    except Exception:
        pass


# ---------------------------------------------------------------------- request fields
def parse_messages(value: Any) -> History:
    """system* then alternating user / assistant, ending with the user's new message."""
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "expected a non-empty list of messages")
    system: list[str] = []
    pairs: list[Pair] = []
    user: str | None = None
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(param, "expected a message object")
        role = message.get("role")
        text = message_text(message.get("content"), f"{param}.content") if message.get("content") is not None else ""
        if role in ("system", "developer"):
            if pairs or user is not None:
                raise bad_field(f"{param}.role", "system messages are only read before the first user message")
            system.append(text)
        elif role == "user":
            user = text if user is None else f"{user}\n{text}"  # consecutive user messages read as one
        elif role == "assistant":
            if message.get("tool_calls"):
                raise bad_field(f"{param}.tool_calls", "tool calls are not supported")
            pairs.append((user or "", text))
            user = None
        else:
            raise bad_field(f"{param}.role", "expected 'system', 'developer', 'user' or 'assistant'")
    if user is None or not user:
        raise bad_field(f"messages[{len(value) - 1}]", "the last message must be the user's (non-empty)")
    return History("\n".join(system) or None, pairs, user)


def _include_usage(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise bad_field("stream_options", "expected an object")
    flag = value.get("include_usage", False)
    if not isinstance(flag, bool):
        raise bad_field("stream_options.include_usage", "expected a boolean")
    return flag


def _usage(summary: TurnSummary, replay: Replay) -> dict[str, Any]:
    return {
        "prompt_tokens": summary.input_tokens,
        "completion_tokens": summary.output_tokens,
        "total_tokens": summary.input_tokens + summary.output_tokens,
        "prompt_tokens_details": {"cached_tokens": replay.cached_tokens},
        "rxrt": {
            "history_turns": replay.history_turns,
            "cached_turns": replay.cached_turns,
            "replayed_turns": replay.replayed_turns,
            "replayed_tokens": replay.replayed_tokens,
            "history_cache": replay.cache,
        },
    }
