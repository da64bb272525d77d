"""``generate``: ``QueryReceived`` -> the query, then ``Token`` events, then ``AnswerCompleted``.

The engine decodes the turn in its continuous batch (after the conversation's previous memory
update has committed) and reports each sampled token; this operator turns the reports into
events. Token events carry ids only (``text=""``): ``detokenize`` adds the text. Other events pass
through untouched, so the operators chain into one event stream.

Disposing the subscription before ``AnswerCompleted`` cancels the turn within one decode step
(before the turn has started, it releases the turn number ``tokenize`` reserved);
its partial answer is not written to memory unless ``remember_partial=True`` (then
``AnswerCompleted`` is not emitted to the disposed subscriber, but the memory update runs).

Marble (``T`` = Token, ``A`` = AnswerCompleted)::

    in:   --Q-----------|
    out:  --Q--T-T-T-A--|
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc
from reactivex import operators as ops

from rxruntime.engine import AnswerStats, TurnRequest
from rxruntime.events import AnswerCompleted, Event, FinishReason, QueryReceived, Token
from rxruntime.models.sampler import SamplingParams

from ._util import ConversationRef, create, failed, ordered


def generate(
    conv: ConversationRef,
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int | None = None,
    remember_partial: bool = False,
) -> Callable[[Observable[Event]], Observable[Event]]:
    backend = conv.backend

    def answer(query: QueryReceived) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            cid, turn = query.conversation_id, query.turn

            class Listener:
                def on_token(self, token_id: int, position: int) -> None:
                    observer.on_next(
                        Token(conversation_id=cid, turn=turn, token_id=token_id, text="", position=position)
                    )

                def on_answer(
                    self, token_ids: tuple[int, ...], finish_reason: FinishReason, stats: AnswerStats
                ) -> None:
                    observer.on_next(
                        AnswerCompleted(
                            conversation_id=cid,
                            turn=turn,
                            text="",
                            token_ids=token_ids,
                            finish_reason=finish_reason,
                            ttft_s=stats.ttft_s,
                            tokens_per_s=stats.tokens_per_s,
                            duration_s=stats.duration_s,
                            queued_s=stats.queued_s,
                        )
                    )
                    observer.on_completed()

                def on_error(self, exc: Exception, stm_version: int) -> None:
                    observer.on_next(failed(query, exc, "generate", stm_version))
                    observer.on_error(exc)

            request = TurnRequest(
                conversation_id=cid,
                turn=turn,
                prompt_ids=query.token_ids,
                params=params or backend.default_sampling,
                max_new_tokens=max_new_tokens,
                remember_partial=remember_partial,
            )
            return backend.start_turn(request, Listener())

        # Disposed before the turn started (e.g. the subscriber left at QueryReceived): its
        # reserved turn number must not hold back the conversation's later turns.
        release = ops.finally_action(lambda: backend.release_turn(query.conversation_id, query.turn))
        return reactivex.concat(reactivex.of(query), create(subscribe)).pipe(release)

    def route(event: Event) -> Observable[Event] | None:
        return answer(event) if isinstance(event, QueryReceived) else None

    return ordered(route)
