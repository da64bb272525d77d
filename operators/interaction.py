"""``interaction``: queries -> every event of every turn, one turn at a time.

The pipeline a :class:`~rxruntime.conversation.Conversation` runs for each query::

    query -> tokenize -> generate -> detokenize -> encode -> update_memory

Queries are handled in order, each after the previous turn's memory commit (the inner stream of a
query completes with its ``MemoryUpdated``). Sampling options are keywords; ``temperature=0`` is
greedy. Every option is checked by type and range when the pipeline is built
(``InvalidOptionError`` naming the field), so a bad value never reaches the engine.

Marble (one query; ``Q`` QueryReceived, ``T`` Token, ``A`` AnswerCompleted, ``M``/``U`` memory)::

    queries:  --"hi"--------------------|
    events:   --Q--T--T--A--M-----U-----|
"""

from __future__ import annotations

from collections.abc import Callable

import reactivex
from reactivex import Observable

from rxruntime.engine.options import check_options
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
    thinking_mode: str | None = None,
) -> Callable[[Observable[Query]], Observable[Event]]:
    options = check_options(
        conv.backend.default_sampling,
        conv.backend.vocab_size,
        {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "remember_partial": remember_partial,
            "thinking_mode": thinking_mode,
        },
        conv.backend.tokenizer.interaction_template,
    )

    def turn(query: Query) -> Observable[Event]:
        return reactivex.of(query).pipe(
            tokenize(conv, options.thinking_mode),
            generate(
                conv,
                options.params,
                max_new_tokens=options.max_new_tokens,
                remember_partial=options.remember_partial,
            ),
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
    """``default`` with the given options replaced (checked: bad values raise InvalidOptionError)."""
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    return check_options(default, 2**63, options).params
