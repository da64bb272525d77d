"""``/v1/conversations``: create (with metadata and initial items), retrieve, update, delete.

Initial items are written into memory, not kept as a transcript: ``system`` / ``developer``
messages initialise the STM from text, then each user message with the assistant message after it
is replayed as one past turn (encoder + memory attention, no decoding). The conversation keeps no
item list, so the items endpoints are not offered.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import bad_field
from rxruntime.serving.http.fields import json_body, metadata, opt_int
from rxruntime.serving.http.messages import parse_items
from rxruntime.serving.http.registry import CONVERSATION_HEADER, Entry


async def create_conversation(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes) if await request.body() else {}
    engine = ctx.slot.engine
    meta = metadata(body)
    system, pairs = parse_items(body.get("items"))
    seed = opt_int(body, "seed", 0, 2**63 - 1)  # our extension: the starting STM, as engine.conversation(seed=)
    entry = await ctx.blocking(
        lambda: ctx.registry.create(engine, owner, metadata=meta, memory_init=system, history=pairs, seed=seed)
    )
    return JSONResponse(conversation_object(entry), headers={CONVERSATION_HEADER: entry.conv.id})


async def get_conversation(ctx: Context, request: Request, owner: str) -> Response:
    engine = ctx.slot.engine
    cid = str(request.path_params["conversation_id"])
    entry = await ctx.blocking(lambda: ctx.registry.get(engine, owner, cid, "conversation_id"))
    return JSONResponse(conversation_object(entry))


async def update_conversation(ctx: Context, request: Request, owner: str) -> Response:
    body = await json_body(request, ctx.max_body_bytes)
    if "metadata" not in body:
        raise bad_field("metadata", "required")
    meta = metadata(body)
    engine = ctx.slot.engine
    cid = str(request.path_params["conversation_id"])
    entry = await ctx.blocking(lambda: ctx.registry.get(engine, owner, cid, "conversation_id"))
    await ctx.blocking(lambda: ctx.registry.set_metadata(entry, meta))
    return JSONResponse(conversation_object(entry))


async def delete_conversation(ctx: Context, request: Request, owner: str) -> Response:
    engine = ctx.slot.engine
    cid = str(request.path_params["conversation_id"])
    await ctx.blocking(lambda: ctx.registry.delete(engine, owner, cid))
    return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})


def conversation_object(entry: Entry) -> dict[str, Any]:
    return {"id": entry.conv.id, "object": "conversation", "created_at": entry.created_at, "metadata": entry.metadata}
