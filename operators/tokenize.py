"""``tokenize``: queries -> ``QueryReceived`` events, with the decoder prompt's token ids.

A query is text (wrapped as ``[BOS] [Q] text [A]``; ``[T]`` instead of ``[A]`` for an
``extended`` turn of a ``beta`` model) or a sequence of token ids (used as the query's body,
wrapped the same way). A query is checked first: one that leaves no room for an
answer in ``max_seq_len``, holds ids outside the vocabulary, or finds the conversation's queue
full never enters the conversation and uses no turn number: it becomes ``InteractionFailed``
(turn 0, stage ``query``) followed by ``QueryTooLongError`` / ``InvalidTokenError`` /
``QueueFullError``. An accepted query reserves the conversation's next turn number when its
``QueryReceived`` is emitted: turns run in the order of their numbers. ``generate`` gives the
reservation up if it is disposed before it starts the turn; a ``QueryReceived`` that never reaches
a ``generate`` holds the conversation's later turns until ``backend.release_turn`` is called.

Marble::

    queries:  --"hi"------"bye"---|
    tokenize: --Q(turn 1)--Q(turn 2)--|
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from reactivex import Observable, abc

from rxruntime.engine.options import check_token_ids
from rxruntime.errors import QueryTooLongError, RxTError
from rxruntime.events import Event, QueryReceived
from rxruntime.models.config import ThinkingMode

from ._util import ConversationRef, create, fail_with, failed, ordered

Query = str | Sequence[int]


def tokenize(
    conv: ConversationRef, thinking_mode: ThinkingMode | None = None
) -> Callable[[Observable[Query]], Observable[Event]]:
    """``thinking_mode`` (``beta`` template): ``fast`` ends the prompt with ``[A]``, ``extended``
    with ``[T]``; checked by ``check_options`` before it gets here."""
    backend = conv.backend

    def one(query: Query) -> Observable[Event]:
        tok = backend.tokenizer
        rejected = QueryReceived(conversation_id=conv.id, turn=0, query="", token_ids=())
        try:
            if isinstance(query, str):
                text, body = query, tok.encode(query)
            elif isinstance(query, Sequence):
                body = check_token_ids(query, backend.vocab_size)
                text = tok.decode(body)
            else:
                raise QueryTooLongError(f"a query is text or a sequence of token ids, got {type(query).__name__}")
            ids = tuple(tok.prompt_ids(body, thinking_mode))
            if len(ids) + 2 > backend.max_seq_len:  # room for at least one answer token and [EOS]
                raise QueryTooLongError(
                    f"the query takes {len(ids)} tokens with its template; interactions hold at most "
                    f"{backend.max_seq_len} tokens including the answer and [EOS]"
                )
        except RxTError as exc:
            return fail_with(failed(rejected, exc, "query", _version(conv)), exc)

        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            try:
                turn = backend.next_turn(conv.id)  # QueueFullError: the query never entered
            except RxTError as exc:
                observer.on_next(failed(rejected, exc, "query", _version(conv)))
                observer.on_error(exc)
                return lambda: None
            observer.on_next(QueryReceived(conversation_id=conv.id, turn=turn, query=text, token_ids=ids))
            observer.on_completed()
            return lambda: None

        return create(subscribe)

    return ordered(one)


def _version(conv: ConversationRef) -> int:
    """The STM version a refused query leaves in place (0 if the conversation is gone)."""
    try:
        return conv.backend.stm_version(conv.id)
    except RxTError:
        return 0
