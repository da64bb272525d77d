"""The STM for a chat history: taken from the cache, or rebuilt by replay, then cached after the answer.

Chat Completions' memory path (``routes/chat_completions.py`` is the endpoint). For a request,
``memory_for`` opens a conversation of its own whose STM holds the history before the new query:

* the longest prefix of the history found in the :class:`~.history_cache.HistoryCache` is taken
  as it is (a pending entry is waited for: the previous answer's memory update may still
  be running);
* the (user, assistant) pairs after that prefix are replayed through the encoder and memory
  attention only (``Conversation.replay``), one memory update per pair, no decoding;
* with no cached prefix, the conversation starts from one fixed random STM, initialised from the
  system message if there is one, so a history gives the same memory whether cached or replayed.

After the answer, ``after_answer`` waits (on a background thread) for its memory update, caches
the STM under the history plus that answer, and closes the conversation (deleting it from the
store, if any: it is never resumed).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field

from torch import Tensor

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.events import AnswerCompleted
from rxruntime.serving.http.context import Context
from rxruntime.serving.http.errors import from_engine_error
from rxruntime.serving.http.history_cache import Pair, extend_key, prefix_keys
from rxruntime.serving.http.registry import replay_pairs
from rxruntime.serving.ownership import new_id


@dataclass
class History:
    """A Chat Completions request's messages: system text, earlier (user, assistant) pairs, the query."""

    system: str | None
    pairs: list[Pair]
    query: str
    keys: list[str] = field(init=False)  # cache key of each prefix: keys[k] covers pairs[:k]

    def __post_init__(self) -> None:
        self.keys = prefix_keys(self.system, self.pairs)


@dataclass
class Replay:
    """How the memory for the history was obtained (reported in ``usage.rxrt``)."""

    history_turns: int
    cached_turns: int
    replayed_turns: int
    replayed_tokens: int
    cached_tokens: int
    cache: str  # hit (all from the cache), partial, miss (all replayed), none (no history)
    version: int  # the STM version holding the history (the answer's update makes it version + 1)


async def memory_for(ctx: Context, engine: Engine, owner: str, history: History) -> tuple[Conversation, Replay]:
    """A fresh conversation whose STM holds the history: from the cache, else replayed."""
    keys = history.keys
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
    cached = history.pairs[:cached_k] if stm is not None else []
    cached_tokens = sum(len(tokenizer.interaction_ids(u, a)) for u, a in cached)
    replayed_tokens = sum(len(tokenizer.interaction_ids(u, a)) for u, a in missing)
    conversation_id = new_id("chat", owner)
    computed = bool(missing) or (stm is None and history.system is not None)

    def open_and_replay() -> tuple[Conversation, int]:
        if stm is not None:
            conv = engine.conversation(conversation_id, stm=stm)
        else:  # one fixed random STM: the same history gives the same memory, whatever the id
            conv = engine.conversation(conversation_id, memory_init=history.system, seed=0)
        try:
            if missing:
                replay_pairs(conv, missing)
            state = conv.export_state(wait=True)
            if computed:  # the history's own STM, for a client that asks again from the same point
                ctx.history.put(keys[n], state.stm)
        except BaseException:
            close(conv)
            raise
        return conv, state.stm_version

    try:
        conv, version = await ctx.blocking(open_and_replay)
    except Exception as exc:
        raise from_engine_error(exc, "messages") from exc
    if not n and history.system is None:
        cache = "none"
    else:
        cache = "miss" if stm is None else "partial" if missing else "hit"
        ctx.metrics.replay.labels(cache).inc()
    ctx.metrics.replayed_turns.inc(len(missing))
    replay = Replay(n, len(cached), len(missing), replayed_tokens, cached_tokens, cache, version)
    return conv, replay


def after_answer(
    ctx: Context, conv: Conversation, answer: AnswerCompleted | None, history: History, replay: Replay
) -> None:
    """Cache the STM under history + answer once its memory update commits, then close (background)."""
    if answer is None or answer.finish_reason == "cancelled":  # nothing was written to memory
        slot: Future[Tensor | None] | None = None
    else:
        slot = ctx.history.reserve(extend_key(history.keys[-1], history.query, answer.text))

    def work() -> None:
        stm = None
        try:
            if slot is not None:
                conv.wait_for_memory()
                state = conv.export_state(wait=False)
                # only the STM that took this answer in: not one whose update failed
                if conv.memory_error is None and state.stm_version == replay.version + 1:
                    stm = state.stm
        except Exception:
            stm = None
        finally:
            if slot is not None:
                slot.set_result(stm)
            close(conv)

    ctx.background.submit(work)


def close(conv: Conversation) -> None:
    """Close a request's conversation; with a store also delete it (it is never resumed)."""
    try:
        if conv.backend.store is not None:
            conv.delete()
        else:
            conv.close()
    except Exception:
        pass
