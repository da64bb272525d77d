"""``detokenize``: fill in the text of ``Token`` and ``AnswerCompleted`` events, streaming-safe.

Byte-level BPE can split one character over several tokens and merge several characters into
one. Each turn gets an incremental decoder that releases text only once its bytes are complete:
a token that ends mid-character gets ``text=""`` and the token that completes it carries the whole
character. ``AnswerCompleted.text`` is exactly the concatenation of the turn's token texts: the
decode of all the answer's ids, less a character cut off by the length limit (its bytes cannot
form text; its ids stay in ``token_ids``). Other events pass through; state is kept per
subscription and per turn.

Marble (token ids of "é" split in two bytes)::

    in:   --T(b"\\xc3")--T(b"\\xa9")--A--|
    out:  --T("")-------T("é")-------A("é")--|
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import reactivex
from reactivex import Observable
from reactivex import operators as ops

from rxruntime.events import AnswerCompleted, Event, Token
from rxruntime.models.tokenizer import IncrementalDecoder, RxTokenizer


def detokenize(tokenizer: RxTokenizer) -> Callable[[Observable[Event]], Observable[Event]]:
    def operator(source: Observable[Event]) -> Observable[Event]:
        def per_subscription() -> Observable[Event]:
            decoders: dict[tuple[str, int], IncrementalDecoder] = {}

            def fill(event: Event) -> Event:
                key = (event.conversation_id, event.turn)
                if isinstance(event, Token):
                    decoder = decoders.get(key)
                    if decoder is None:
                        decoder = decoders[key] = tokenizer.incremental_decoder()
                    return dataclasses.replace(event, text=decoder.push(event.token_id))
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
