"""``POST /v1/chat/completions``: stateless clients, whose history becomes STM without re-reading it.

The last user message is the query; a leading ``system`` message initialises memory from text.
The STM for the earlier turns comes from the history cache or from replaying them
(``http/replay.py``), on a conversation that lives for this request; the messages are read by
``http/messages.py``. This module shapes the answer: a ``chat.completion``, or
``chat.completion.chunk`` events ending with ``[DONE]``. ``usage`` says what was replayed in the
extension field ``rxrt``, and ``prompt_tokens_details.cached_tokens`` counts the history tokens
the cache spared.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rxruntime.conversation import Conversation
from rxruntime.events import AnswerCompleted, Token, TokenLogprob
from rxruntime.serving.http import logprobs
from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import APIError, bad_field
from rxruntime.serving.http.fields import (
    CHAT_COMPLETIONS,
    check_fields,
    json_body,
    metadata,
    opt_bool,
    opt_int,
    opt_str,
    sampling_options,
    thinking_mode,
    user_of,
)
from rxruntime.serving.http.messages import parse_messages
from rxruntime.serving.http.replay import History, Replay, after_answer, memory_for
from rxruntime.serving.http.stops import parse_stop
from rxruntime.serving.http.turns import Reasoning, Turn, TurnSummary, sse, sse_response

log = logging.getLogger(__name__)

_FINISH = {"eos": "stop", "length": "length", "cancelled": "stop", "stop": "stop"}


async def create_chat_completion(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes)
    check_fields(body, CHAT_COMPLETIONS)
    engine = ctx.slot.engine
    history = History(*parse_messages(body.get("messages")))
    stream = opt_bool(body, "stream", False)
    n = opt_int(body, "n", 1, 1)
    del n  # one choice: a conversation's memory takes one answer
    stop = parse_stop(body.get("stop"))
    user = user_of(body)
    metadata(body)  # checked as OpenAI does; kept nowhere, as completions are never stored
    options = sampling_options(body, ("max_tokens", "max_completion_tokens"))
    top = logprobs.chat_request(body)
    if top is not None:
        options["logprobs"] = top
    effort = opt_str(body, "reasoning_effort")
    mode = thinking_mode(effort, "reasoning_effort", engine.tokenizer.interaction_template)
    if mode is not None:
        options["thinking_mode"] = mode
    include_usage = stream and include_usage_of(body.get("stream_options"))

    conv, replay = await memory_for(ctx, engine, owner, history)
    if user:
        log.info("chat completion in %s for user %r", conv.id, user)
    turn = Turn(conv, history.query, options, ctx.metrics, "messages", stop)
    try:
        await turn.start()
    except APIError:
        after_answer(ctx, conv, None, history, replay)
        raise
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not stream:
        try:
            summary = await turn.answer_only()
        finally:
            after_answer(ctx, conv, turn.answer, history, replay)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": ctx.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": _message(summary, mode == "extended"),
                        "logprobs": None if top is None else logprobs.chat(engine.tokenizer, summary.logprobs),
                        "finish_reason": _FINISH[summary.finish_reason],
                    }
                ],
                "usage": _usage(summary, replay),
            }
        )
    asked = top is not None
    return sse_response(_stream(ctx, conv, turn, history, replay, completion_id, created, include_usage, asked))


async def _stream(
    ctx: Context,
    conv: Conversation,
    turn: Turn,
    history: History,
    replay: Replay,
    completion_id: str,
    created: int,
    include_usage: bool,
    asked: bool,
) -> AsyncIterator[bytes]:
    tok = conv.backend.tokenizer

    def chunk(
        delta: dict[str, Any],
        finish: str | None = None,
        usage: dict[str, Any] | None = None,
        scores: tuple[TokenLogprob, ...] = (),
    ) -> bytes:
        reported = logprobs.chat(tok, scores) if asked and scores else None
        choice = {"index": 0, "delta": delta, "logprobs": reported, "finish_reason": finish}
        choices = [] if usage is not None else [choice]
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
            if isinstance(ev, Reasoning):
                yield chunk({"reasoning_content": ev.text})
            elif isinstance(ev, Token) and (ev.text or ev.logprobs):
                yield chunk({"content": ev.text}, scores=ev.logprobs)
            elif isinstance(ev, AnswerCompleted):
                summary = turn.summary()
                yield chunk({}, _FINISH[summary.finish_reason])
                if include_usage:
                    yield chunk({}, usage=_usage(summary, replay))
                yield sse("[DONE]")
                if not turn.memorizes:
                    break  # else read on: the turn writes the shown answer to memory itself
    except APIError as exc:
        yield sse(exc.body())
    finally:
        with anyio.CancelScope(shield=True):  # the client may have gone: still clean up
            await turn.aclose()
            after_answer(ctx, conv, turn.answer, history, replay)


def _message(summary: TurnSummary, thinking: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": summary.text, "refusal": None}
    if thinking:
        message["reasoning_content"] = summary.reasoning
    return message


# ---------------------------------------------------------------------- request fields
def include_usage_of(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise bad_field("stream_options", "expected an object")
    flag = value.get("include_usage", False)
    if not isinstance(flag, bool):
        raise bad_field("stream_options.include_usage", "expected a boolean")
    return flag


def _usage(summary: TurnSummary, replay: Replay) -> dict[str, Any]:
    """OpenAI's usage: the prompt is the whole history and the query, of which ``cached_tokens``
    came from the history cache's STM (never more than ``prompt_tokens``); ``rxrt`` says how the
    STM was built and how many of the prompt's tokens it stood for."""
    history_tokens = replay.cached_tokens + replay.replayed_tokens
    prompt = summary.input_tokens + history_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": summary.output_tokens,
        "total_tokens": prompt + summary.output_tokens,
        "prompt_tokens_details": {"cached_tokens": replay.cached_tokens},
        "rxrt": {
            "query_tokens": summary.input_tokens,
            "stm_tokens": history_tokens,
            "history_turns": replay.history_turns,
            "cached_turns": replay.cached_turns,
            "replayed_turns": replay.replayed_turns,
            "replayed_tokens": replay.replayed_tokens,
            "history_cache": replay.cache,
        },
    }
