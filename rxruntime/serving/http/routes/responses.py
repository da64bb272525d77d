"""``POST /v1/responses``: OpenAI's Responses API on a stateful conversation.

A request carries only the new user message. It continues a conversation (``conversation``, or
``previous_response_id`` naming that conversation's latest response) or starts one, whose memory is
first initialised from ``instructions``. The answer comes as a Response object, or as the typed
stream ``response.created`` ... ``response.completed``, followed by our own
``rxrt.memory.update_started`` / ``rxrt.memory.updated`` once the STM has taken the turn in.

A response id names its conversation and turn (``resp_<conversation>_<turn>``), so continuing from
one needs no table. Only the latest response can be continued: the STM has moved past older ones.
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

from rxruntime.events import (
    AnswerCompleted,
    InteractionFailed,
    MemoryUpdated,
    MemoryUpdateStarted,
    Token,
    TokenLogprob,
)
from rxruntime.serving.http import logprobs
from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import APIError, bad_field, not_found
from rxruntime.serving.http.fields import (
    RESPONSES,
    check_fields,
    json_body,
    metadata,
    opt_bool,
    opt_str,
    sampling_options,
    thinking_mode,
    user_of,
)
from rxruntime.serving.http.messages import parse_input
from rxruntime.serving.http.registry import CONVERSATION_HEADER, PREFIX, Entry
from rxruntime.serving.http.stops import parse_stop
from rxruntime.serving.http.turns import Reasoning, Turn, TurnSummary, sse, sse_response

log = logging.getLogger(__name__)


async def create_response(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes)
    check_fields(body, RESPONSES)
    engine = ctx.slot.engine
    query, item_instructions = parse_input(body.get("input"))
    instructions = opt_str(body, "instructions") or item_instructions
    stream = opt_bool(body, "stream", False)
    store = opt_bool(body, "store", True)
    meta = metadata(body)
    options = sampling_options(body, "max_output_tokens")
    top = logprobs.responses_request(body)
    if top is not None:
        options["logprobs"] = top
    stop = parse_stop(body.get("stop"))
    user = user_of(body)
    effort = _effort(body.get("reasoning"))
    mode = thinking_mode(effort, "reasoning.effort", engine.tokenizer.interaction_template)
    if mode is not None:
        options["thinking_mode"] = mode
    conversation_id = conversation_ref(body.get("conversation"))
    previous = opt_str(body, "previous_response_id")
    if conversation_id is not None and previous is not None:
        raise bad_field("previous_response_id", "pass either conversation or previous_response_id, not both")

    new = conversation_id is None and previous is None
    if conversation_id is not None:
        cid = conversation_id
        entry = await ctx.blocking(lambda: ctx.registry.get(engine, owner, cid))
    elif previous is not None:
        entry = await _from_previous(ctx, owner, previous)
    else:
        entry = await ctx.blocking(
            lambda: ctx.registry.create(engine, owner, metadata=meta, memory_init=instructions or None)
        )
    ephemeral = new and not store  # nobody can continue it: gone after this turn

    turn = Turn(entry.conv, query, options, ctx.metrics, "input", stop)
    try:
        await turn.start()
    except APIError:
        if new:
            await ctx.blocking(lambda: ctx.registry.forget(entry.conv.id))
        raise
    shape = _Shape(ctx.model_name, entry, turn.number, body, meta, instructions, previous, store, ephemeral)
    shape.set_request(user, effort, mode == "extended", top is not None)
    if user:
        log.info("response %s for user %r", shape.id, user)
    if not stream:
        try:
            summary = await turn.answer_only()
        finally:
            if ephemeral:
                await ctx.blocking(lambda: ctx.registry.forget(entry.conv.id))
        await ctx.blocking(lambda: ctx.registry.answered(entry, summary.turn))
        return JSONResponse(shape.response(summary), headers={CONVERSATION_HEADER: entry.conv.id})
    return sse_response(_stream(ctx, turn, shape), headers={CONVERSATION_HEADER: entry.conv.id})


async def _from_previous(ctx: Context, owner: str, previous: str) -> Entry:
    engine = ctx.slot.engine
    conversation_id, turn = parse_response_id(previous)
    entry = await ctx.blocking(lambda: ctx.registry.get(engine, owner, conversation_id, "previous_response_id"))
    if entry.last_response_turn is not None and entry.last_response_turn != turn:
        raise bad_field(
            "previous_response_id",
            f"only the latest response of a conversation can be continued (turn {entry.last_response_turn}); "
            "the memory has moved past this one",
        )
    return entry


async def _stream(ctx: Context, turn: Turn, shape: _Shape) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return sse(data, kind)

    item = shape.message_item("", "in_progress")
    part = {"type": "output_text", "text": "", "annotations": []}
    index = 1 if shape.thinking else 0
    at = {"item_id": shape.item_id, "output_index": index, "content_index": 0}
    think_at = {"item_id": shape.reasoning_id, "output_index": 0, "content_index": 0}
    thinking: list[str] | None = [] if shape.thinking else None

    def end_thinking() -> list[bytes]:
        nonlocal thinking
        if thinking is None:
            return []
        text, thinking = "".join(thinking), None
        return [
            event("response.reasoning_text.done", **think_at, text=text),
            event("response.output_item.done", output_index=0, item=shape.reasoning_item(text)),
            event("response.output_item.added", output_index=index, item=item),
            event("response.content_part.added", **at, part=part),
        ]

    try:
        yield event("response.created", response=shape.pending())
        yield event("response.in_progress", response=shape.pending())
        if shape.thinking:
            yield event("response.output_item.added", output_index=0, item=shape.reasoning_item("", "in_progress"))
        else:
            yield event("response.output_item.added", output_index=0, item=item)
            yield event("response.content_part.added", **at, part=part)
        async for ev in turn.events():
            if isinstance(ev, Reasoning):
                if thinking is not None:
                    thinking.append(ev.text)
                    yield event("response.reasoning_text.delta", **think_at, delta=ev.text)
                continue
            if isinstance(ev, (Token, AnswerCompleted)):
                for chunk in end_thinking():
                    yield chunk
            if isinstance(ev, Token):
                if ev.text or ev.logprobs:
                    scores = shape.scores(ev.logprobs, with_bytes=False)
                    yield event("response.output_text.delta", **at, delta=ev.text, logprobs=scores)
            elif isinstance(ev, AnswerCompleted):
                summary = turn.summary()
                number = summary.turn
                await ctx.blocking(lambda: ctx.registry.answered(shape.entry, number))  # noqa: B023
                message = shape.message_item(summary.text, scores=summary.logprobs)
                text_part = message["content"][0]
                all_scores = shape.scores(summary.logprobs, with_bytes=False)
                yield event("response.output_text.done", **at, text=summary.text, logprobs=all_scores)
                yield event("response.content_part.done", **at, part=text_part)
                yield event("response.output_item.done", output_index=index, item=message)
                done = shape.response(summary)
                kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
                yield event(kind, response=done)
            elif isinstance(ev, MemoryUpdateStarted):
                yield event(
                    "rxrt.memory.update_started",
                    conversation_id=ev.conversation_id,
                    turn=ev.turn,
                    stm_version=ev.stm_version,
                )
            elif isinstance(ev, MemoryUpdated):
                yield event(
                    "rxrt.memory.updated",
                    conversation_id=ev.conversation_id,
                    turn=ev.turn,
                    stm_version=ev.stm_version,
                    duration_s=ev.duration_s,
                    layers=memory_layers(ev),
                )
            elif isinstance(ev, InteractionFailed) and ev.stage == "memory":
                yield event("rxrt.memory.failed", conversation_id=ev.conversation_id, turn=ev.turn, message=ev.message)
    except APIError as exc:
        if turn.answer is None:
            yield event("error", code=exc.code, message=exc.message, param=exc.param)
            yield event("response.failed", response=shape.failed(exc))
        # after the answer only the memory update can fail; its rxrt.memory.failed event said so
    finally:
        with anyio.CancelScope(shield=True):  # runs when the client went away, too
            await turn.aclose()
            if shape.ephemeral:
                entry = shape.entry
                await ctx.blocking(lambda: ctx.registry.forget(entry.conv.id))


# ---------------------------------------------------------------------- request fields
def _effort(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_field("reasoning", "expected an object {'effort': ...}")
    for key, item in value.items():
        if key != "effort" and item is not None:
            raise bad_field(f"reasoning.{key}", "only reasoning.effort is supported (the thinking text comes whole)")
    effort = value.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise bad_field("reasoning.effort", "expected a string")
    return effort


def memory_layers(ev: MemoryUpdated) -> list[dict[str, float]]:
    """Per STM layer: how far the memory moved and how open its residual gates were."""
    return [{"change": c, "gate": g} for c, g in zip(ev.layer_change, ev.layer_gate)]


def conversation_ref(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str) and value["id"]:
        return str(value["id"])
    raise bad_field("conversation", "expected a conversation id or an object {'id': ...}")


def response_id(conversation_id: str, turn: int) -> str:
    return f"resp_{conversation_id.removeprefix(PREFIX + '_')}_{turn}"


def parse_response_id(value: str) -> tuple[str, int]:
    """(conversation id, turn); 404 for anything that is not one of our response ids."""
    body = value.removeprefix("resp_")
    suffix, _, turn = body.rpartition("_")
    if not value.startswith("resp_") or not suffix or not turn.isdigit():
        raise not_found(f"response {value!r}", "previous_response_id")
    return f"{PREFIX}_{suffix}", int(turn)


# ---------------------------------------------------------------------- response objects
class _Shape:
    """Builds the Response object of one request in its successive states."""

    def __init__(
        self,
        model: str,
        entry: Entry,
        turn: int,
        body: dict[str, Any],
        meta: dict[str, str],
        instructions: str | None,
        previous: str | None,
        store: bool,
        ephemeral: bool,
    ) -> None:
        self.entry = entry
        self.ephemeral = ephemeral
        self.item_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex[:24]}"
        self.thinking = False
        self.reports_logprobs = False
        self._tokenizer = entry.conv.backend.tokenizer
        self.id = response_id(entry.conv.id, turn)
        self._base: dict[str, Any] = {
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "instructions": instructions,
            "previous_response_id": previous,
            "conversation": None if ephemeral else {"id": entry.conv.id},
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"),
            "top_logprobs": body.get("top_logprobs"),
            "metadata": meta,
            "store": store,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "error": None,
            "incomplete_details": None,
        }

    def set_request(self, user: str | None, effort: str | None, thinking: bool, reports_logprobs: bool) -> None:
        self.thinking = thinking
        self.reports_logprobs = reports_logprobs
        self._base["user"] = user
        self._base["reasoning"] = {"effort": effort, "summary": None}

    def reasoning_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
        return {"id": self.reasoning_id, "type": "reasoning", "status": status, "summary": [], "content": content}

    def pending(self) -> dict[str, Any]:
        return {"id": self.id, **self._base, "status": "in_progress", "output": [], "usage": None}

    def failed(self, exc: APIError) -> dict[str, Any]:
        error = {"code": exc.code, "message": exc.message}
        return {"id": self.id, **self._base, "status": "failed", "output": [], "usage": None, "error": error}

    def scores(self, entries: tuple[TokenLogprob, ...], with_bytes: bool = True) -> list[dict[str, Any]]:
        """``output_text``'s ``logprobs`` (empty unless the request asked for them)."""
        return logprobs.content(self._tokenizer, entries, with_bytes) if self.reports_logprobs else []

    def message_item(
        self, text: str, status: str = "completed", scores: tuple[TokenLogprob, ...] = ()
    ) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.reports_logprobs:
            part["logprobs"] = self.scores(scores)
        content = [part] if status == "completed" else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def response(self, summary: TurnSummary) -> dict[str, Any]:
        incomplete = summary.finish_reason == "length"
        return {
            "id": self.id,
            **self._base,
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [
                *([self.reasoning_item(summary.reasoning)] if self.thinking else []),
                self.message_item(summary.text, scores=summary.logprobs),
            ],
            "usage": {
                "input_tokens": summary.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": summary.output_tokens,
                "output_tokens_details": {"reasoning_tokens": summary.reasoning_tokens},
                "total_tokens": summary.input_tokens + summary.output_tokens,
            },
        }
