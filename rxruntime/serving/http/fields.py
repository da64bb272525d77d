"""Reading request bodies field by field: each bad value is a 400 that names its field.

Unknown fields are ignored, as OpenAI's clients send many we have no use for (``tools`` empty,
``user``, ``service_tier``...); a known field with a wrong type or value is always an error, never
silently replaced by a default. The message lists (``input``, ``items``, ``messages``) are read by
:mod:`.messages`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from rxruntime.serving.http.errors import APIError, bad_field


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
    """``temperature``, ``top_p``, ``seed`` and the answer length, as ``Conversation.interact`` options."""
    options: dict[str, Any] = {}
    temperature = opt_number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        options["temperature"] = temperature
    top_p = opt_number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        options["top_p"] = top_p
    seed = opt_int(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        options["seed"] = seed
    names = (max_tokens_field,) if isinstance(max_tokens_field, str) else max_tokens_field
    for name in names:
        limit = opt_int(body, name, 1, 1 << 20)
        if limit is not None:
            options["max_new_tokens"] = limit
    return options
