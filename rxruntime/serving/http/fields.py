"""Reading request bodies field by field: each bad value is a 400 that names its field.

Every field an endpoint knows is in its table (``RESPONSES``, ``CHAT_COMPLETIONS``,
``COMPLETIONS``): it either works, or it is refused with a 400 naming it unless its value asks for
nothing we lack (``tools: []``, ``logit_bias: {}``, ``response_format: {"type": "text"}``).
A field in no table is refused too, as OpenAI does (``unknown_parameter``): nothing a client sends
is silently ignored. docs/http.md's field table is checked against these tables by a test. A known
field with a wrong type or value is always an error, never silently replaced by a default. The
message lists (``input``, ``items``, ``messages``) are read by :mod:`.messages`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from rxruntime.models.config import PENALTY_LIMIT
from rxruntime.serving.http.errors import APIError, bad_field


@dataclass(frozen=True)
class Field:
    """One request field: ``works`` (read by the route), or refused unless ``harmless(value)``."""

    works: bool
    harmless: Callable[[Any], bool] | None = None
    why: str = ""


WORKS = Field(True)


def _refused(why: str, harmless: Callable[[Any], bool] = lambda v: v is None) -> Field:
    return Field(False, harmless, why)


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _text_format(v: Any) -> bool:
    return v is None or v == {"type": "text"}


def _no_tool_choice(v: Any) -> bool:
    return v is None or v in ("none", "auto")


_TOOLS = "tools are not supported: a small RxT model has not been trained to call them"
_FORMAT = "structured output (JSON mode, schemas) is not supported; only plain text"

_COMMON: dict[str, Field] = {
    "model": WORKS,
    "stream": WORKS,
    "temperature": WORKS,
    "top_p": WORKS,
    "top_k": WORKS,  # our extension (vLLM and llama.cpp servers take it too): the k likeliest tokens
    "seed": WORKS,
    "stop": WORKS,
    "user": WORKS,
    "metadata": WORKS,
}

RESPONSES: dict[str, Field] = {
    **_COMMON,
    "input": WORKS,
    "instructions": WORKS,
    "conversation": WORKS,
    "previous_response_id": WORKS,
    "store": WORKS,
    "max_output_tokens": WORKS,
    "reasoning": WORKS,
    "safety_identifier": WORKS,
    "parallel_tool_calls": WORKS,  # no tools are ever called: either value holds
    "tools": _refused(_TOOLS, _empty),
    "tool_choice": _refused(_TOOLS, _no_tool_choice),
    "max_tool_calls": _refused(_TOOLS),
    "text": _refused(_FORMAT, lambda v: v is None or (isinstance(v, dict) and _text_format(v.get("format")))),
    "background": _refused("background responses are not supported", lambda v: v is None or v is False),
    "include": WORKS,  # only "message.output_text.logprobs" (logprobs.py refuses anything else)
    "top_logprobs": WORKS,
    "truncation": _refused("only truncation 'disabled' is supported", lambda v: v in (None, "disabled")),
    "service_tier": _refused("there is one service tier", lambda v: v in (None, "auto", "default")),
    "prompt": _refused("stored prompt templates are not supported"),
    "prompt_cache_key": _refused("the STM is the cache; there are no prompt cache keys"),
}

CHAT_COMPLETIONS: dict[str, Field] = {
    **_COMMON,
    "messages": WORKS,
    "n": WORKS,
    "max_tokens": WORKS,
    "max_completion_tokens": WORKS,
    "stream_options": WORKS,
    "reasoning_effort": WORKS,
    "safety_identifier": WORKS,
    "parallel_tool_calls": WORKS,
    "store": _refused("completions are not stored for distillation", lambda v: v is None or v is False),
    "tools": _refused(_TOOLS, _empty),
    "tool_choice": _refused(_TOOLS, _no_tool_choice),
    "functions": _refused(_TOOLS, _empty),
    "function_call": _refused(_TOOLS, _no_tool_choice),
    "response_format": _refused(_FORMAT, _text_format),
    "logprobs": WORKS,
    "top_logprobs": WORKS,
    "frequency_penalty": WORKS,
    "presence_penalty": WORKS,
    "logit_bias": _refused("logit_bias is not supported by the sampler", _empty),
    "modalities": _refused("only text is supported", lambda v: v is None or v == ["text"]),
    "audio": _refused("only text is supported"),
    "prediction": _refused("predicted outputs are not supported"),
    "web_search_options": _refused(_TOOLS),
    "service_tier": _refused("there is one service tier", lambda v: v in (None, "auto", "default")),
    "verbosity": _refused("verbosity is not supported"),
}

COMPLETIONS: dict[str, Field] = {
    **_COMMON,
    "prompt": WORKS,
    "n": WORKS,
    "max_tokens": WORKS,
    "stream_options": WORKS,
    "conversation": WORKS,  # our extension: continue a named conversation
    "echo": _refused("echoing the prompt is not supported", lambda v: v is None or v is False),
    "best_of": _refused("one answer per turn: a conversation's memory takes one", lambda v: v in (None, 1)),
    "logprobs": WORKS,
    "suffix": _refused("insertion (suffix) is not supported"),
    "frequency_penalty": WORKS,
    "presence_penalty": WORKS,
    "logit_bias": _refused("logit_bias is not supported by the sampler", _empty),
}


def check_fields(body: Mapping[str, Any], table: Mapping[str, Field]) -> None:
    """Refuse a field the endpoint does not know, or a refused field asking for what we lack."""
    for name, value in body.items():
        field = table.get(name)
        if field is None:
            raise APIError(
                400,
                f"unknown field {name!r}; see docs/http.md for the fields this endpoint reads",
                type="invalid_request_error",
                param=name,
                code="unknown_parameter",
            )
        if not field.works and not (field.harmless is not None and field.harmless(value)):
            raise APIError(
                400,
                f"{name}: {field.why}",
                type="invalid_request_error",
                param=name,
                code="unsupported_parameter",
            )


def user_of(body: Mapping[str, Any]) -> str | None:
    """``user`` / ``safety_identifier``: an end user's id, recorded with the turn's log line."""
    for name in ("user", "safety_identifier"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 512):
            raise bad_field(name, "expected a string of up to 512 characters")
    return body.get("user") or body.get("safety_identifier")


EFFORT_TO_MODE = {"none": "fast", "minimal": "fast", "low": "fast", "medium": "extended", "high": "extended"}


def thinking_mode(value: Any, name: str, template: str) -> str | None:
    """``reasoning.effort`` / ``reasoning_effort`` -> a Beta model's thinking mode.

    ``none``/``minimal``/``low`` answer directly (``fast``); ``medium``/``high`` think first
    (``extended``). A model without thinking modes (``alpha`` template) refuses any effort."""
    if value is None:
        return None
    if value not in EFFORT_TO_MODE:
        raise bad_field(name, f"expected one of {sorted(EFFORT_TO_MODE)}, got {value!r}")
    if template != "beta":
        raise APIError(
            400,
            f"{name}: this model has no thinking modes (interaction_template={template!r})",
            type="invalid_request_error",
            param=name,
            code="unsupported_parameter",
        )
    return EFFORT_TO_MODE[value]


async def json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > max_bytes:
        raise APIError(
            413, f"request body of {len(raw)} bytes exceeds {max_bytes}", type="invalid_request_error", code="too_large"
        )
    if not raw:
        raise bad_field("body", "expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_field("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_field("body", "expected a JSON object")
    return body


def opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name, f"expected a string, got {type(value).__name__}")
    return value


def opt_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_field(name, f"expected a boolean, got {type(value).__name__}")
    return value


def opt_number(body: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_field(name, f"expected a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad_field(name, f"must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def opt_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field(name, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise bad_field(name, f"must be in [{low}, {high}], got {value}")
    return value


def metadata(body: dict[str, Any], name: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_field(name, "expected an object of string keys and values")
    if len(value) > 16:
        raise bad_field(name, f"at most 16 pairs, got {len(value)}")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise bad_field(f"{name}.{key}", "keys are strings of up to 64 characters, values of up to 512")
    return dict(value)


def sampling_options(body: dict[str, Any], max_tokens_field: str | tuple[str, ...]) -> dict[str, Any]:
    """``temperature``, ``top_p``, ``top_k``, ``seed``, the penalties and the answer length, as
    ``Conversation.interact`` options. ``top_k`` (an extension: OpenAI has none) keeps the k likeliest
    tokens; 0 turns it off. The penalties are OpenAI's, in [-2, 2]: only the endpoints whose table
    lists them get this far with one."""
    options: dict[str, Any] = {}
    temperature = opt_number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        options["temperature"] = temperature
    top_p = opt_number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        options["top_p"] = top_p
    top_k = opt_int(body, "top_k", 0, 2**63 - 1)  # at or above the vocabulary: every token (normalised to 0)
    if top_k is not None:
        options["top_k"] = top_k
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = opt_number(body, penalty, -PENALTY_LIMIT, PENALTY_LIMIT)
        if value is not None:
            options[penalty] = value
    seed = opt_int(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        options["seed"] = seed
    names = (max_tokens_field,) if isinstance(max_tokens_field, str) else max_tokens_field
    for name in names:
        limit = opt_int(body, name, 1, 1 << 20)
        if limit is not None:
            options["max_new_tokens"] = min(limit, options.get("max_new_tokens", limit))
    return options
