"""``tokenize``: queries -> ``QueryReceived`` events, with the decoder prompt's token ids.

A query is text (wrapped as ``[BOS] [Q] text [A]``) or a sequence of token ids (used as the
query's body, wrapped the same way). Each query reserves the conversation's next turn number.
A query that leaves no room for an answer in ``max_seq_len``, or ids outside the vocabulary,
never enters the conversation: it becomes ``InteractionFailed`` followed by ``QueryTooLongError``
/ ``InvalidTokenError``.

Marble::

    queries:  --"hi"------"bye"---|
    tokenize: --Q(turn 1)--Q(turn 2)--|
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import reactivex
from reactivex import Observable

from rxruntime.errors import InvalidTokenError, QueryTooLongError
from rxruntime.events import Event, QueryReceived

from ._util import ConversationRef, fail_with, failed, ordered

Query = str | Sequence[int]


def tokenize(conv: ConversationRef) -> Callable[[Observable[Query]], Observable[Event]]:
    backend = conv.backend

    def one(query: Query) -> Observable[Event]:
        turn = backend.next_turn(conv.id)
        tok = backend.tokenizer
        if isinstance(query, str):
            text, body = query, tok.encode(query)
        else:
            body = [int(i) for i in query]
            text = tok.decode(body)
        ids = (tok.special.bos_id, tok.special.query_id, *body, tok.special.answer_id)
        event = QueryReceived(conversation_id=conv.id, turn=turn, query=text, token_ids=ids)
        vocab = backend.vocab_size
        bad = [i for i in body if not 0 <= i < vocab]
        if bad:
            exc: Exception = InvalidTokenError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        elif len(ids) + 2 > backend.max_seq_len:  # room for at least one answer token and [EOS]
            exc = QueryTooLongError(
                f"the query takes {len(ids)} tokens with its template; interactions hold at most "
                f"{backend.max_seq_len} tokens including the answer and [EOS]"
            )
        else:
            return reactivex.of(event)
        # The query never enters the conversation: no QueryReceived, no turn for generate to run.
        return fail_with(failed(event, exc, "query", backend.stm_version(conv.id)), exc)

    return ordered(one)
