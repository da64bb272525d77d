"""The operators of one turn, in the order a query meets them (import name: ``rxruntime.operators``).

A :class:`~rxruntime.conversation.Conversation` runs every query through one pipeline::

    query -> tokenize -> generate -> detokenize -> memory_started -> memory_updated

``tokenize`` makes the prompt and takes the turn number the engine hands out; ``generate`` asks
the engine to run the turn and turns its callbacks into ``Token`` events and ``AnswerCompleted``;
``detokenize`` gives the tokens their text. When an answer completes, the engine always runs the
memory update itself (encoder + memory attention, then the commit), whether or not anyone still
listens, so no turn is lost: ``memory_started`` and ``memory_updated`` are the views of that
stage (``MemoryUpdateStarted``, ``MemoryUpdated``), they start nothing. The **engine owns the work
and the turn's number and order; the operators own the events.**

Each operator is a pipeable reactivex function: it transforms the events it is about and passes
every other event through, so they chain into one stream and a custom pipeline can insert its
own anywhere. Options are checked once, when the pipeline is built (``InvalidOptionError``
naming the field), so a bad value never reaches the engine.

Marble (one query; ``Q`` QueryReceived, ``T`` Token, ``A`` AnswerCompleted, ``M``/``U`` memory)::

    queries:  --"hi"--------------------|
    events:   --Q--T--T--A--M-----U-----|
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import reactivex
from reactivex import Observable, abc
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable, Disposable, SerialDisposable

from rxruntime.backend import AnswerStats, Backend, ConversationRef, MemoryEvents, TurnRequest
from rxruntime.errors import QueryTooLongError, RxTError
from rxruntime.events import (
    AnswerCompleted,
    Event,
    FinishReason,
    InteractionFailed,
    MemoryEvent,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
    TokenLogprob,
)
from rxruntime.models.config import ThinkingMode
from rxruntime.models.sampler import SamplingParams
from rxruntime.models.tokenizer import IncrementalDecoder, RxTokenizer
from rxruntime.options import TurnOptions, check_options, check_token_ids

Query = str | Sequence[int]


# ---------------------------------------------------------------------- the whole turn
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
    logprobs: int | None = None,
) -> Callable[[Observable[Query]], Observable[Event]]:
    """Queries -> every event of every turn, one turn at a time.

    Queries are handled in order, each after the previous turn's memory commit (the inner stream
    of a query completes with its ``MemoryUpdated``). ``temperature=0`` is greedy. Every option is
    checked here, by type and range."""
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
            "logprobs": logprobs,
        },
        conv.backend.tokenizer.interaction_template,
    )
    return turn_pipeline(conv, options)


def turn_pipeline(conv: ConversationRef, options: TurnOptions) -> Callable[[Observable[Query]], Observable[Event]]:
    """:func:`interaction` with options already checked (``check_options``), so nothing checks twice."""

    def turn(query: Query) -> Observable[Event]:
        return reactivex.of(query).pipe(
            tokenize(conv, options.thinking_mode),
            generate(
                conv,
                options.params,
                max_new_tokens=options.max_new_tokens,
                remember_partial=options.remember_partial,
                remember=options.remember,
                logprobs=options.logprobs,
            ),
            detokenize(conv.backend.tokenizer),
            memory_started(conv),
            memory_updated(conv),
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


# ---------------------------------------------------------------------- tokenize
def tokenize(
    conv: ConversationRef, thinking_mode: ThinkingMode | None = None
) -> Callable[[Observable[Query]], Observable[Event]]:
    """Queries -> ``QueryReceived`` events, with the decoder prompt's token ids.

    A query is text (wrapped as ``[BOS] [Q] text [A]``; ``[T]`` instead of ``[A]`` for an
    ``extended`` turn of a ``beta`` model: ``thinking_mode``, checked by ``check_options`` before
    it gets here) or a sequence of token ids (used as the query's body, wrapped the same way). A
    query is checked first: one that leaves no room for an answer in ``max_seq_len``, holds ids
    outside the vocabulary, or finds the conversation's queue full never enters the conversation
    and uses no turn number: it becomes ``InteractionFailed`` (turn 0, stage ``query``) followed by
    ``QueryTooLongError`` / ``InvalidTokenError`` / ``QueueFullError``. An accepted query gets the
    conversation's next turn number from the engine (``backend.next_turn``) when its
    ``QueryReceived`` is emitted: the engine runs turns in the order of their numbers. ``generate``
    gives the number back if it is disposed before it starts the turn; a ``QueryReceived`` that
    never reaches a ``generate`` holds the conversation's later turns until
    ``backend.release_turn`` is called.

    Marble::

        queries:  --"hi"------"bye"---|
        tokenize: --Q(turn 1)--Q(turn 2)--|
    """
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


# ---------------------------------------------------------------------- generate
def generate(
    conv: ConversationRef,
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int | None = None,
    remember_partial: bool = False,
    remember: bool = True,
    logprobs: int | None = None,
) -> Callable[[Observable[Event]], Observable[Event]]:
    """``QueryReceived`` -> the query, then ``Token`` events, then ``AnswerCompleted``.

    The engine decodes the turn in its continuous batch (after the conversation's previous memory
    update has committed) and reports each sampled token; this operator turns the reports into
    events. Token events carry ids only (``text=""``): ``detokenize`` adds the text.

    Disposing the subscription before ``AnswerCompleted`` cancels the turn within one decode step
    (before the turn has started, it gives back the turn number ``tokenize`` was handed); its
    partial answer is not written to memory unless ``remember_partial=True`` (then
    ``AnswerCompleted`` is not emitted to the disposed subscriber, but the memory update runs).
    ``remember=False`` writes no answer to memory at all: the caller memorizes the text it chose
    to show (the HTTP front after a stop sequence). ``logprobs=k`` (0 to 20) gives each ``Token``
    its log-probability and the ``k`` most probable alternatives (``Token.logprobs``); the engine
    computes them only for turns that ask.

    Marble (``T`` = Token, ``A`` = AnswerCompleted)::

        in:   --Q-----------|
        out:  --Q--T-T-T-A--|
    """
    backend = conv.backend

    def answer(query: QueryReceived) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            cid, turn = query.conversation_id, query.turn

            class Listener:
                def on_token(self, token_id: int, position: int, logprobs: TokenLogprob | None = None) -> None:
                    observer.on_next(
                        Token(
                            conversation_id=cid,
                            turn=turn,
                            token_id=token_id,
                            text="",
                            position=position,
                            logprobs=() if logprobs is None else (logprobs,),
                        )
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
                remember=remember,
                logprobs=logprobs,
            )
            return backend.start_turn(request, Listener())

        # Disposed before the turn started (e.g. the subscriber left at QueryReceived): its
        # turn number must not hold back the conversation's later turns.
        release = ops.finally_action(lambda: backend.release_turn(query.conversation_id, query.turn))
        return reactivex.concat(reactivex.of(query), create(subscribe)).pipe(release)

    def route(event: Event) -> Observable[Event] | None:
        return answer(event) if isinstance(event, QueryReceived) else None

    return ordered(route)


# ---------------------------------------------------------------------- detokenize
def detokenize(tokenizer: RxTokenizer) -> Callable[[Observable[Event]], Observable[Event]]:
    """Fill in the text of ``Token`` and ``AnswerCompleted`` events, streaming-safe.

    Byte-level BPE can split one character over several tokens and merge several characters into
    one. Each turn gets an incremental decoder that releases text only once its bytes are
    complete: a token that ends mid-character gets ``text=""`` and the token that completes it
    carries the whole character. ``AnswerCompleted.text`` is exactly the concatenation of the
    turn's token texts: the decode of all the answer's ids, less a character cut off by the
    length limit (its bytes cannot form text; its ids stay in ``token_ids``). State is kept per
    subscription and per turn. Log-probability entries (``Token.logprobs``) get each token's own
    text (``RxTokenizer.token_piece``).

    Marble (token ids of "é" split in two bytes)::

        in:   --T(b"\\xc3")--T(b"\\xa9")--A--|
        out:  --T("")-------T("é")-------A("é")--|
    """

    def operator(source: Observable[Event]) -> Observable[Event]:
        def per_subscription() -> Observable[Event]:
            decoders: dict[tuple[str, int], IncrementalDecoder] = {}

            def fill(event: Event) -> Event:
                key = (event.conversation_id, event.turn)
                if isinstance(event, Token):
                    decoder = decoders.get(key)
                    if decoder is None:
                        decoder = decoders[key] = tokenizer.incremental_decoder()
                    text = decoder.push(event.token_id)
                    if event.logprobs:
                        return dataclasses.replace(event, text=text, logprobs=_named(tokenizer, event.logprobs))
                    return dataclasses.replace(event, text=text)
                if isinstance(event, AnswerCompleted):
                    text = tokenizer.decode(event.token_ids)
                    held = decoder.flush() if (decoder := decoders.pop(key, None)) else ""
                    if held and text.endswith(held):  # an incomplete last character: never streamed
                        text = text[: -len(held)]
                    return dataclasses.replace(event, text=text)
                return event

            return source.pipe(ops.map(fill))

        return reactivex.defer(lambda _: per_subscription())

    return operator


def _named(tokenizer: RxTokenizer, entries: tuple[TokenLogprob, ...]) -> tuple[TokenLogprob, ...]:
    """Log-probability entries with each token's own text filled in."""

    def name(entry: TokenLogprob) -> TokenLogprob:
        top = tuple(name(t) for t in entry.top)
        return TokenLogprob(entry.token_id, tokenizer.token_piece(entry.token_id), entry.logprob, top)

    return tuple(name(e) for e in entries)


# ---------------------------------------------------------------------- the memory stage (views)
def memory_started(conv: ConversationRef) -> Callable[[Observable[Event]], Observable[Event]]:
    """``AnswerCompleted`` -> the answer, then ``MemoryUpdateStarted`` (formerly ``encode``).

    A view of the engine's memory stage, which starts by itself once an answer completes: the
    encoder reads ``[BOS][Q] query [A] answer [EOS]`` and memory attention writes the STM, on the
    memory thread or CUDA stream. This reports the start of that stage for the turn:
    ``MemoryUpdateStarted`` carries the STM version being replaced. A cancelled turn that is not
    remembered has no memory stage: the answer passes through alone.

    Marble::

        in:   --A----------|
        out:  --A---M(v3)--|
    """
    backend = conv.backend

    def started(answer: AnswerCompleted) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            return _watch_memory(backend, answer, observer, report="started")

        return reactivex.concat(reactivex.of(answer), create(subscribe))

    def route(event: Event) -> Observable[Event] | None:
        return started(event) if isinstance(event, AnswerCompleted) else None

    return ordered(route)


def memory_updated(conv: ConversationRef) -> Callable[[Observable[Event]], Observable[Event]]:
    """``MemoryUpdateStarted`` -> it, then ``MemoryUpdated`` once STM(t) is committed (formerly
    ``update_memory``).

    A view of the end of the engine's memory stage. Commit means the conversation's STM now is
    the new version and its next query may run. If the update fails, ``InteractionFailed`` (stage
    ``memory``) and the error follow; the STM keeps its last committed version.

    Marble::

        in:   --M(v3)------------|
        out:  --M(v3)---U(v4)----|
    """
    backend = conv.backend

    def committed(start: MemoryUpdateStarted) -> Observable[Event]:
        def subscribe(observer: abc.ObserverBase[Any]) -> Callable[[], None]:
            return _watch_memory(backend, start, observer, report="updated")

        return reactivex.concat(reactivex.of(start), create(subscribe))

    def route(event: Event) -> Observable[Event] | None:
        return committed(event) if isinstance(event, MemoryUpdateStarted) else None

    return ordered(route)


# ---------------------------------------------------------------------- plumbing
def _watch_memory(
    backend: Backend, source: Event, observer: abc.ObserverBase[Any], report: Literal["started", "updated"]
) -> Callable[[], None]:
    """Watch the engine's memory stage for ``source``'s turn and report one end of it to
    ``observer`` (``MemoryUpdateStarted`` or ``MemoryUpdated``), then complete; a failure is
    ``InteractionFailed`` (stage ``memory``) and the error, a skipped update just completes."""
    cid = source.conversation_id

    class Watcher(MemoryEvents):
        def memory_event(self, event: MemoryEvent) -> None:
            if isinstance(event, MemoryUpdateStarted):
                if report == "started":
                    observer.on_next(event)
                    observer.on_completed()
                return
            if report == "updated":
                observer.on_next(event)
            observer.on_completed()  # "started": only reached if the start was already reported

        def on_memory_failed(self, turn: int, exc: Exception, stm_version: int) -> None:
            observer.on_next(failed(source, exc, "memory", stm_version))
            observer.on_error(exc)

        def on_memory_skipped(self, turn: int) -> None:
            observer.on_completed()

    return backend.watch_memory(cid, source.turn, Watcher(cid))


def failed(event_source: Event, exc: Exception, stage: str, stm_version: int) -> InteractionFailed:
    return InteractionFailed(
        conversation_id=event_source.conversation_id,
        turn=event_source.turn,
        error_type=type(exc).__name__,
        message=str(exc),
        stage=stage,  # type: ignore[arg-type]
        stm_version=stm_version,
    )


def fail_with(event: InteractionFailed, exc: Exception) -> Observable[Event]:
    """Emit ``InteractionFailed`` and then the typed error (Rx streams end on errors)."""
    return reactivex.concat(reactivex.of(event), reactivex.throw(exc))


def create(subscribe: Callable[[abc.ObserverBase[Any]], Callable[[], None]]) -> Observable[Any]:
    """``reactivex.create`` for callbacks that return a plain ``dispose`` function."""

    def on_subscribe(observer: abc.ObserverBase[Any], scheduler: abc.SchedulerBase | None = None) -> abc.DisposableBase:
        return Disposable(subscribe(observer))

    return reactivex.create(on_subscribe)


_Item = tuple[str, Any]


def ordered(project: Callable[[Any], Observable[Any] | None]) -> Callable[[Observable[Any]], Observable[Any]]:
    """``concat_map`` with the ordering the event pipeline needs.

    ``project(item)`` returns an Observable to run before the next item, or None to pass the item
    through as is. Unlike ``concat_map``: pass-through items are emitted synchronously (no hop
    through the trampoline, where a following upstream error would overtake them), and an upstream
    error or completion is delivered only after the output of every earlier item. So
    ``InteractionFailed`` always reaches the subscriber before its error.
    """

    def operator(source: Observable[Any]) -> Observable[Any]:
        def on_subscribe(
            observer: abc.ObserverBase[Any], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            queue: deque[_Item] = deque()
            lock = threading.RLock()
            state = {"draining": False, "inner": False, "stopped": False}
            inner = SerialDisposable()

            def inner_completed() -> None:
                with lock:
                    state["inner"] = False
                drain()

            def inner_error(exc: Exception) -> None:
                with lock:
                    state["stopped"] = True
                observer.on_error(exc)

            def drain() -> None:
                with lock:
                    if state["draining"]:
                        return
                    state["draining"] = True
                try:
                    while True:
                        with lock:
                            if state["inner"] or state["stopped"] or not queue:
                                return
                            kind, value = queue.popleft()
                            if kind != "item":
                                state["stopped"] = True
                        if kind == "error":
                            observer.on_error(value)
                            return
                        if kind == "completed":
                            observer.on_completed()
                            return
                        result = project(value)
                        if result is None:
                            observer.on_next(value)
                            continue
                        with lock:
                            state["inner"] = True
                        inner.disposable = result.subscribe(
                            observer.on_next, inner_error, inner_completed, scheduler=scheduler
                        )
                finally:
                    with lock:
                        state["draining"] = False
                    # an inner that completed while we held the drain flag left work behind
                    with lock:
                        pending = bool(queue) and not state["inner"] and not state["stopped"]
                    if pending:
                        drain()

            def push(kind: str, value: Any = None) -> None:
                with lock:
                    queue.append((kind, value))
                drain()

            upstream = source.subscribe(
                lambda x: push("item", x),
                lambda e: push("error", e),
                lambda: push("completed"),
                scheduler=scheduler,
            )
            return CompositeDisposable(upstream, inner)

        return reactivex.create(on_subscribe)

    return operator
