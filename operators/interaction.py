"""``interaction``: queries -> every event of every turn, one turn at a time.

The pipeline a :class:`~rxruntime.conversation.Conversation` runs for each query::

    query -> tokenize -> generate -> detokenize -> encode -> update_memory

Queries are handled in order, each after the previous turn's memory commit (the inner stream of a
query completes with its ``MemoryUpdated``). Sampling options are keywords; ``temperature=0`` is
greedy.

Marble (one query; ``Q`` QueryReceived, ``T`` Token, ``A`` AnswerCompleted, ``M``/``U`` memory)::

    queries:  --"hi"--------------------|
    events:   --Q--T--T--A--M-----U-----|
"""

from __future__ import annotations

from collections.abc import Callable

import reactivex
from reactivex import Observable

from rxruntime.events import Event
from rxruntime.models.sampler import SamplingParams

from ._util import ConversationRef, ordered
from .detokenize import detokenize
from .encode import encode
from .generate import generate
from .tokenize import Query, tokenize
from .update_memory import update_memory


def interaction(
    conv: ConversationRef,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    remember_partial: bool = False,
) -> Callable[[Observable[Query]], Observable[Event]]:
    params = sampling_params(conv.backend.default_sampling, temperature, top_k, top_p, seed)

    def turn(query: Query) -> Observable[Event]:
        return reactivex.of(query).pipe(
            tokenize(conv),
            generate(conv, params, max_new_tokens=max_new_tokens, remember_partial=remember_partial),
            detokenize(conv.backend.tokenizer),
            encode(conv),
            update_memory(conv),
        )

    return ordered(turn)


def sampling_params(
    default: SamplingParams,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """``default`` with the given options replaced (validated: bad values raise ConfigError)."""
    return SamplingParams(
        temperature=default.temperature if temperature is None else temperature,
        top_k=default.top_k if top_k is None else top_k,
        top_p=default.top_p if top_p is None else top_p,
        seed=default.seed if seed is None else seed,
    )
