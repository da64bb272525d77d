"""``POST /v1/completions``: the legacy API, a prompt as one query turn.

The prompt (a string, or a list holding one) is the query of one turn: in a fresh conversation,
closed after the answer, or in the conversation our extension field ``conversation`` names (one
made by ``/v1/conversations`` or a Responses turn), whose memory then takes the turn in like any
other. Answers come as a ``text_completion`` or as chunks ending with ``[DONE]``.
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

from rxruntime.events import AnswerCompleted, Token, TokenLogprob
from rxruntime.serving.http import logprobs
from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import APIError, bad_field
from rxruntime.serving.http.fields import (
    COMPLETIONS,
    check_fields,
    json_body,
    metadata,
    opt_bool,
    opt_int,
    sampling_options,
    user_of,
)
from rxruntime.serving.http.registry import CONVERSATION_HEADER, Entry
from rxruntime.serving.http.routes.chat_completions import include_usage_of
from rxruntime.serving.http.routes.responses import conversation_ref
from rxruntime.serving.http.stops import parse_stop
from rxruntime.serving.http.turns import Turn, TurnSummary, sse, sse_response

log = logging.getLogger(__name__)

_FINISH = {"eos": "stop", "length": "length", "cancelled": "stop", "stop": "stop"}


async def create_completion(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes)
    check_fields(body, COMPLETIONS)
    engine = ctx.slot.engine
    prompt = _prompt(body.get("prompt"))
    stream = opt_bool(body, "stream", False)
    opt_int(body, "n", 1, 1)
    metadata(body)
    stop = parse_stop(body.get("stop"))
    user = user_of(body)
    options = sampling_options(body, "max_tokens")
    top = logprobs.completions_request(body)
    if top is not None:
        options["logprobs"] = top
    include_usage = stream and include_usage_of(body.get("stream_options"))
    named = conversation_ref(body.get("conversation"))
    if named is not None:
        entry = await ctx.blocking(lambda: ctx.registry.get(engine, owner, named))
    else:
        entry = await ctx.blocking(lambda: ctx.registry.create(engine, owner))
    if user:
        log.info("completion in %s for user %r", entry.conv.id, user)

    turn = Turn(entry.conv, prompt, options, ctx.metrics, "prompt", stop)
    try:
        await turn.start()
    except APIError:
        await _done(ctx, entry, named is None, None)
        raise
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time())}
    head["model"] = ctx.model_name
    headers = {CONVERSATION_HEADER: entry.conv.id} if named is not None else {}
    if not stream:
        summary: TurnSummary | None = None
        try:
            summary = await turn.answer_only()
        finally:
            await _done(ctx, entry, named is None, summary)
        scores = None if top is None else logprobs.legacy(summary.logprobs, summary.offsets)
        choice = {"text": summary.text, "index": 0, "logprobs": scores, "finish_reason": _FINISH[summary.finish_reason]}
        return JSONResponse({**head, "choices": [choice], "usage": usage(summary)}, headers=headers)
    stream_it = _stream(ctx, entry, named is None, turn, head, include_usage, top is not None)
    return sse_response(stream_it, headers=headers)


async def _stream(
    ctx: Context, entry: Entry, fresh: bool, turn: Turn, head: dict[str, Any], include_usage: bool, asked: bool
) -> AsyncIterator[bytes]:
    reported = 0  # tokens whose log-probabilities went out: their offsets are turn.offsets[:reported]

    def chunk(text: str, finish: str | None = None, scores: tuple[TokenLogprob, ...] = ()) -> bytes:
        nonlocal reported
        lp = None
        if asked and scores:
            lp = logprobs.legacy(scores, turn.offsets[reported : reported + len(scores)])
            reported += len(scores)
        choice = {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
        return sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    summary: TurnSummary | None = None
    try:
        async for ev in turn.events():
            if isinstance(ev, Token) and (ev.text or ev.logprobs):
                yield chunk(ev.text, scores=ev.logprobs)
            elif isinstance(ev, AnswerCompleted):
                summary = turn.summary()
                yield chunk("", _FINISH[summary.finish_reason])
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(summary)})
                yield sse("[DONE]")
                if not turn.memorizes:
                    break
    except APIError as exc:
        yield sse(exc.body())
    finally:
        with anyio.CancelScope(shield=True):
            await turn.aclose()
            await _done(ctx, entry, fresh, summary)


async def _done(ctx: Context, entry: Entry, fresh: bool, summary: TurnSummary | None) -> None:
    """A fresh conversation is closed after its one turn; a named one records its answered turn."""
    if fresh:
        await ctx.blocking(lambda: ctx.registry.forget(entry.conv.id))
    elif summary is not None:
        number = summary.turn
        await ctx.blocking(lambda: ctx.registry.answered(entry, number))


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise bad_field("prompt", "expected a non-empty string (or a list holding one); token arrays are not read")
    return value


def usage(summary: TurnSummary) -> dict[str, Any]:
    """OpenAI's usage: the prompt is read whole, nothing of it is cached."""
    return {
        "prompt_tokens": summary.input_tokens,
        "completion_tokens": summary.output_tokens,
        "total_tokens": summary.input_tokens + summary.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
