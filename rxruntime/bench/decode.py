"""Generated tokens per second through ``DecodeBatch.step`` (``decode_step`` + the sampler).

This is the number the CPU fast path is judged by: one conversation (or a few), a prompt of a
typical query's length, then ``steps`` timed steps, each read back on the host as a streaming
user would. Medians over repeats, because the machines this runs on are shared.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rxruntime.models import ConfigError, DecodeBatch, JoinRequest, RxTModel, SamplingParams
from rxruntime.models.quantize import WeightFormat, check_format
from rxruntime.models.weight_format import default_format, set_weight_format

DEFAULT_WEIGHTS = "default"
"""``--weights default``: the engine's own choice for the device (:func:`default_weights`)."""

ROWWISE = "int8-rowwise"
"""``--weights int8-rowwise``: int8 weights through the C step as it ran before its multi-row
kernel (``native.set_rows_per_pass(model, 1)``: one activation row per pass, one (row, expert)
pair at a time), so that a benchmark can put the two int8 steps side by side in one run."""


@dataclass
class DecodeResult:
    """Tokens per second of each repeat and their median (all rows of the batch counted)."""

    tokens_per_s: float
    best_tokens_per_s: float
    """The fastest run: on a shared machine, the closest to the unloaded speed."""
    runs: list[float]
    batch_size: int
    steps: int
    load_average: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(
    model: RxTModel,
    *,
    steps: int = 64,
    repeats: int = 5,
    batch_size: int = 1,
    prompt_len: int = 34,
    params: SamplingParams | None = None,
    seed: int = 0,
    batch: DecodeBatch | None = None,
) -> DecodeResult:
    """Median generated tokens/s over ``repeats`` runs of ``steps`` decode steps.

    Each run joins ``batch_size`` fresh conversations (prompt of ``prompt_len`` random ids, a
    random STM), takes one untimed step, then times ``steps`` steps including the host read of
    every step's tokens. Pass ``batch`` to reuse a decode batch (and its layout choice).
    """
    cfg = model.config
    if prompt_len + steps + 2 > cfg.max_seq_len:
        raise ConfigError(f"prompt_len + steps must fit the {cfg.max_seq_len}-token interaction")
    params = params or SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(seed)
    batch = batch or DecodeBatch(model, batch_size)
    device = model.device
    runs = []
    for r in range(repeats):
        stm = model.init_stm(batch_size, gen)
        prompts = [torch.randint(7, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(batch_size)]
        keys = [("bench", r, i) for i in range(batch_size)]
        batch.join([JoinRequest(k, p, stm[i], params, seed + i) for i, (k, p) in enumerate(zip(keys, prompts))])
        batch.step().tolist()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            batch.step().tolist()
        runs.append(steps * batch_size / (time.perf_counter() - start))
        for k in keys:
            batch.leave(k)
    return DecodeResult(
        tokens_per_s=statistics.median(runs),
        best_tokens_per_s=max(runs),
        runs=runs,
        batch_size=batch_size,
        steps=steps,
        load_average=list(os.getloadavg()),
    )


def c_step_note(model: RxTModel) -> str:
    """Whether decode steps ran the C step of ``models/native.py``, for the JSON's config."""
    from rxruntime.models import native

    reason = native.not_used_reason(model)
    return f"used for steps of up to {native.max_rows(model)} rows" if reason is None else f"not used: {reason}"


def default_weights(model: RxTModel) -> WeightFormat:
    """The weight format :func:`rxruntime.load` gives ``model`` when not told: int8
    (:data:`rxruntime.DEFAULT_CPU_WEIGHTS`) where the C step runs a float32 CPU model, float32
    elsewhere. The benchmarks default to it so they measure what ``rxrt chat`` and ``serve`` run."""
    from rxruntime import DEFAULT_CPU_WEIGHTS

    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "fp32"
    return default_format(model, DEFAULT_CPU_WEIGHTS)


def apply_weights(model: RxTModel, requested: str | None) -> str:
    """Store ``model``'s matrices as ``requested`` (None or ``"default"``: :func:`default_weights`;
    :data:`ROWWISE`: int8 through the row-by-row C step) and return the format it now has (or
    :data:`ROWWISE`). ConfigError for an unknown format, or a compact one on a model the formats
    do not apply to (not float32 on the CPU)."""
    from rxruntime.models import native

    if requested == ROWWISE:
        apply_weights(model, "int8")
        native.set_rows_per_pass(model, 1)
        return ROWWISE
    if requested in (None, DEFAULT_WEIGHTS):
        fmt = default_weights(model)
    else:
        try:
            fmt = check_format(requested)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if fmt != "fp32" and (model.device.type != "cpu" or model.dtype != torch.float32):
            raise ConfigError(f"--weights {fmt} is for float32 models on the CPU (got {model.device.type})")
    set_weight_format(model, fmt)
    return fmt


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` of ``turns`` and ``throughput``: what the model computes in (a CUDA choice)."""


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: None or ``"default"`` is :func:`rxruntime.load`'s choice (bfloat16 on CUDA,
    float32 elsewhere); ``float32``, ``bfloat16`` and ``float16`` are taken on CUDA. On the CPU
    only float32 is: its compact formats are ``--weights bf16|int8`` (the C step reads them), and
    a half-precision torch model there is not what the runtime serves. ConfigError otherwise."""
    if requested in (None, DEFAULT_WEIGHTS):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = DTYPES.get(str(requested))
    if dtype is None:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} or {DEFAULT_WEIGHTS}, got {requested!r}")
    if dtype != torch.float32 and device.type != "cuda":
        raise ConfigError(
            f"--dtype {requested} is for CUDA; on the {device.type} the model computes in float32 "
            "(its weights in bf16 or int8: --weights bf16|int8)"
        )
    return dtype


def kernel_label(model: RxTModel) -> str:
    """Which decode step a one-row step of ``model`` runs, in words: the C step or torch."""
    from rxruntime.models import native

    if model._compiled_kernel is not None:
        return "torch.compile'd step"
    reason = native.not_used_reason(model)
    if reason is not None:
        return "torch step"
    rowwise = model.weight_format == "int8" and native.rows_per_pass(model) == 1  # before the multi-row kernel
    return f"C step (up to {native.max_rows(model)} rows{', row by row' if rowwise else ''})"


def weights_line(weights: str, model: RxTModel) -> str:
    """The report line every benchmark prints: which weights and which decode step it measured."""
    return f"weights {weights}, decode: {kernel_label(model)}"
