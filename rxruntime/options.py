"""A turn's options, checked once where they enter (a conversation's ``interact``, the engine's door).

Every value a caller (or a transport on a client's behalf) can pass is checked by type and
range here and refused with :class:`~rxruntime.errors.InvalidOptionError` naming the field, so a
bad value never reaches the decode batch, where it would fail every row of the step. Values that
mean "no filter" are normalised: ``top_k`` at or above the vocabulary size keeps every token, so
it becomes 0 (a huge ``top_k`` such as ``2**64 - 1`` is valid and harmless).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real

from rxruntime.errors import InvalidOptionError, InvalidTokenError
from rxruntime.models.config import PENALTY_LIMIT, InteractionTemplate, ThinkingMode
from rxruntime.models.sampler import SamplingParams

OPTIONS = frozenset(
    {
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "max_new_tokens",
        "remember_partial",
        "remember",
        "thinking_mode",
        "logprobs",
    }
)
THINKING_MODES = {"alpha": ("fast",), "beta": ("fast", "extended"), "chatml": ("fast",)}  # per interaction_template
MAX_SEED = 2**63  # exclusive: seeds are int64 on the device
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs and vLLM's default max_logprobs


@dataclass(frozen=True)
class TurnOptions:
    """A turn's options, checked: what the ``generate`` operator needs."""

    params: SamplingParams
    max_new_tokens: int | None = None
    remember_partial: bool = False
    thinking_mode: ThinkingMode | None = None
    remember: bool = True  # False: the engine writes nothing; the caller memorizes what it chooses
    logprobs: int | None = None  # report log-probabilities with this many alternatives (0: the chosen token's)


def _int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidOptionError(field, f"must be an integer, got {type(value).__name__}")
    return int(value)


def _real(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidOptionError(field, f"must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidOptionError(field, f"must be finite, got {number}")
    return number


def check_seconds(field: str, value: object) -> float:
    """A positive, finite number of seconds (``InvalidOptionError`` naming ``field`` otherwise)."""
    seconds = _real(field, value)
    if seconds <= 0:
        raise InvalidOptionError(field, f"must be a positive number of seconds, got {seconds}")
    return seconds


def _penalty(field: str, value: object) -> float:
    penalty = _real(field, value)
    if not -PENALTY_LIMIT <= penalty <= PENALTY_LIMIT:
        raise InvalidOptionError(field, f"must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 is off), got {penalty}")
    return penalty


def check_options(
    default: SamplingParams,
    vocab_size: int,
    options: Mapping[str, object],
    template: InteractionTemplate = "alpha",
) -> TurnOptions:
    """``default`` with the given options replaced, every value checked; unknown names refused.

    ``template``: the model's ``interaction_template``, which says which thinking modes exist."""
    for name in options:
        if name not in OPTIONS:
            raise InvalidOptionError(str(name), f"unknown option; known: {', '.join(sorted(OPTIONS))}")
    params = default
    if options.get("temperature") is not None:
        temperature = _real("temperature", options["temperature"])
        if temperature < 0:
            raise InvalidOptionError("temperature", f"must be >= 0 (0 is greedy), got {temperature}")
        params = replace(params, temperature=temperature)
    if options.get("top_k") is not None:
        top_k = _int("top_k", options["top_k"])
        if top_k < 0:
            raise InvalidOptionError("top_k", f"must be >= 0 (0 disables it), got {top_k}")
        params = replace(params, top_k=top_k)
    if options.get("top_p") is not None:
        top_p = _real("top_p", options["top_p"])
        if not 0.0 < top_p <= 1.0:
            raise InvalidOptionError("top_p", f"must be in (0, 1] (1 disables it), got {top_p}")
        params = replace(params, top_p=top_p)
    if options.get("presence_penalty") is not None:
        params = replace(params, presence_penalty=_penalty("presence_penalty", options["presence_penalty"]))
    if options.get("frequency_penalty") is not None:
        params = replace(params, frequency_penalty=_penalty("frequency_penalty", options["frequency_penalty"]))
    if options.get("seed") is not None:
        seed = _int("seed", options["seed"])
        if not 0 <= seed < MAX_SEED:
            raise InvalidOptionError("seed", f"must be in [0, 2**63), got {seed}")
        params = replace(params, seed=seed)
    max_new_tokens = None
    if options.get("max_new_tokens") is not None:
        max_new_tokens = _int("max_new_tokens", options["max_new_tokens"])
        if max_new_tokens < 1:
            raise InvalidOptionError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    remember = options.get("remember_partial", False)
    if remember is None:
        remember = False
    if not isinstance(remember, bool):
        raise InvalidOptionError("remember_partial", f"must be true or false, got {type(remember).__name__}")
    keep = options.get("remember", True)
    if keep is None:
        keep = True
    if not isinstance(keep, bool):
        raise InvalidOptionError("remember", f"must be true or false, got {type(keep).__name__}")
    thinking = _thinking_mode(options, template)
    logprobs = check_logprobs(options.get("logprobs"))
    return TurnOptions(normalize(params, vocab_size), max_new_tokens, remember, thinking, keep, logprobs)


def check_logprobs(value: object) -> int | None:
    """``logprobs``: None (report nothing), or how many alternatives to report per token, 0 to
    ``MAX_LOGPROBS`` (0: only the chosen token's log-probability)."""
    if value is None:
        return None
    count = _int("logprobs", value)
    if not 0 <= count <= MAX_LOGPROBS:
        raise InvalidOptionError("logprobs", f"must be in [0, {MAX_LOGPROBS}] (alternatives per token), got {count}")
    return count


def _thinking_mode(options: Mapping[str, object], template: InteractionTemplate) -> ThinkingMode | None:
    mode = options.get("thinking_mode")
    if mode is None:
        return None
    modes = THINKING_MODES[template]
    if mode == "auto":  # RxTBeta's interact default: there every token is forced to [A] or [T]
        raise InvalidOptionError(
            "thinking_mode",
            "'auto' is not supported: RxLM 0.3's auto mode forces every generated token to be [A] or [T] "
            f"and never ends an answer; use one of {modes}",
        )
    if mode not in modes:
        raise InvalidOptionError(
            "thinking_mode", f"must be one of {modes} for interaction_template={template!r}, got {mode!r}"
        )
    return mode  # type: ignore[return-value]


def normalize(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """The same sampling with device-safe values: ``top_k >= vocab_size`` keeps every token (0)."""
    if not isinstance(params, SamplingParams):
        raise InvalidOptionError("params", f"must be SamplingParams, got {type(params).__name__}")
    if params.top_k >= vocab_size:
        params = replace(params, top_k=0)
    if params.seed is not None and not 0 <= params.seed < MAX_SEED:
        raise InvalidOptionError("seed", f"must be in [0, 2**63), got {params.seed}")
    return params


def check_token_ids(ids: Sequence[object], vocab_size: int, field: str = "query") -> list[int]:
    """Token ids as ints, each in ``[0, vocab_size)``; InvalidTokenError otherwise."""
    out: list[int] = []
    bad: list[object] = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= int(i) < vocab_size:
            bad.append(i)
        else:
            out.append(int(i))
    if bad:
        raise InvalidTokenError(f"{field}: token ids {bad[:5]!r} are not integers in the vocabulary [0, {vocab_size})")
    return out
