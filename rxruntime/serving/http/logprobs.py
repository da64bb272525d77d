"""Log probabilities in each API's own shape, and the request fields that ask for them.

The engine reports, per answer token, ``log_softmax`` of the model's raw logits (before
temperature and top-p: docs/http.md says why) and the most probable alternatives
(:class:`~rxruntime.events.TokenLogprob`). This module reads how many alternatives a request asks
for (``None``: none asked, nothing computed) and writes the entries as Chat Completions
(``choices[].logprobs.content``), legacy Completions (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and Responses (``output_text.logprobs``) define them. Which
tokens are reported when a stop sequence cuts the answer is decided in ``turns.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rxruntime.events import TokenLogprob
from rxruntime.models.tokenizer import RxTokenizer
from rxruntime.serving.http.errors import APIError, bad_field
from rxruntime.serving.http.fields import opt_bool, opt_int

MAX_TOP = 20  # Chat Completions' and Responses' top_logprobs
MAX_LEGACY = 5  # legacy Completions' logprobs
INCLUDE_LOGPROBS = "message.output_text.logprobs"


# ---------------------------------------------------------------------- request fields
def chat_request(body: dict[str, Any]) -> int | None:
    """``logprobs: true`` with ``top_logprobs`` (0 to 20) alternatives; ``top_logprobs`` > 0
    without ``logprobs: true`` is a 400 naming it, as OpenAI answers."""
    asked = opt_bool(body, "logprobs", False)
    top = opt_int(body, "top_logprobs", 0, MAX_TOP)
    if not asked:
        if top:
            raise bad_field("top_logprobs", "needs logprobs: true")
        return None
    return top or 0


def completions_request(body: dict[str, Any]) -> int | None:
    """Legacy ``logprobs``: the chosen token's and up to 5 alternatives (0: the chosen one's)."""
    return opt_int(body, "logprobs", 0, MAX_LEGACY)


def responses_request(body: dict[str, Any]) -> int | None:
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs`` (0 to 20)
    alternatives; ``top_logprobs`` > 0 reports them too. Anything else to include is a 400."""
    include = body.get("include")
    if include is None:
        include = []
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise bad_field("include", "expected a list of strings")
    other = [item for item in include if item != INCLUDE_LOGPROBS]
    if other:
        raise APIError(
            400,
            f"include: {other[0]!r} cannot be included; only {INCLUDE_LOGPROBS!r} is supported",
            type="invalid_request_error",
            param="include",
            code="unsupported_parameter",
        )
    top = opt_int(body, "top_logprobs", 0, MAX_TOP)
    if INCLUDE_LOGPROBS in include or top:
        return top or 0
    return None


# ---------------------------------------------------------------------- response shapes
def _alternative(tok: RxTokenizer, entry: TokenLogprob, with_bytes: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"token": entry.text, "logprob": entry.logprob}
    if with_bytes:
        out["bytes"] = list(tok.token_bytes(entry.token_id))
    return out


def content(tok: RxTokenizer, entries: Sequence[TokenLogprob], with_bytes: bool = True) -> list[dict[str, Any]]:
    """Chat Completions' ``logprobs.content`` and Responses' ``output_text.logprobs``: per token,
    ``token``, ``logprob``, ``bytes`` (left out of Responses' stream events, whose schema has
    none) and ``top_logprobs``, best first."""
    return [
        {
            **_alternative(tok, entry, with_bytes),
            "top_logprobs": [_alternative(tok, alt, with_bytes) for alt in entry.top],
        }
        for entry in entries
    ]


def chat(tok: RxTokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A choice's (or a chunk's) ``logprobs`` object."""
    return {"content": content(tok, entries), "refusal": None}


def legacy(entries: Sequence[TokenLogprob], offsets: Sequence[int]) -> dict[str, Any]:
    """Legacy Completions' ``logprobs``: ``top_logprobs`` maps each alternative's text to its
    log-probability, the chosen token's included (so up to ``logprobs + 1`` keys, as OpenAI
    says); ``text_offset`` is where each token's text starts in the answer's ``text``."""
    tops: list[dict[str, float]] = []
    for entry in entries:
        top: dict[str, float] = {}
        for alt in (*entry.top, entry):
            top.setdefault(alt.text, alt.logprob)  # two tokens may print alike: the likelier one stays
        tops.append(top)
    return {
        "tokens": [entry.text for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }
