"""What the engine tests share: a tokenizer corpus, a tiny model, a stream collector, and greedy
dialogues played through a conversation (the shipped models' tests)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from rxruntime.engine import Engine
from rxruntime.events import Event
from rxruntime.models import DecodeBatch, JoinRequest, RxTModel, SamplingParams

from .conftest import tiny_config

CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada. Paris is sunny."] * 30


def make_model(seed: int = 0) -> RxTModel:
    torch.manual_seed(seed)
    return RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()


def decode_steps(model: RxTModel, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Decode ``steps`` greedy steps of rows that start at different positions: the logits of
    every step (captured from ``decode_step``), then the cache's keys and values at the positions
    each row wrote."""
    stm = model.init_stm(len(prompts), torch.Generator().manual_seed(5), std=1.0)
    batch = DecodeBatch(model, len(prompts))
    batch.join([JoinRequest(i, p, stm[i], SamplingParams(temperature=0.0), 0) for i, p in enumerate(prompts)])
    logits: list[torch.Tensor] = []
    real = model.decode_step

    def capture(*args: object) -> torch.Tensor:
        out = real(*args)  # type: ignore[arg-type]
        logits.append(out.clone())
        return out

    model.decode_step = capture  # type: ignore[assignment]
    try:
        for _ in range(steps):
            batch.step()
    finally:
        del model.decode_step
    n = len(prompts)
    k, v = batch.cache.k[:, :n].clone(), batch.cache.v[:, :n].clone()
    for row, p in enumerate(prompts):  # past what the row wrote: a torch prefill's padding (masked, never read)
        k[:, row, :, len(p) + steps :] = 0
        v[:, row, :, len(p) + steps :] = 0
    return [*logits, k, v]


Outcome = tuple[list[Event], BaseException | None]


def collect(observable: Any, timeout: float = 20.0) -> Outcome:
    """Every event of a stream and its error (None when it completed)."""
    events: list[Event] = []
    error: list[BaseException] = []
    done = threading.Event()

    def on_error(e: Exception) -> None:
        error.append(e)
        done.set()

    observable.subscribe(events.append, on_error, done.set)
    assert done.wait(timeout), "the stream did not finish"
    return events, (error[0] if error else None)


def patch(obj: Any, name: str, fn: Any) -> None:
    """Replace a model method for one test (the model is thrown away afterwards)."""
    setattr(obj, name, fn)


def in_one_prefill(engine: Engine, streams: list[Any]) -> list[Outcome]:
    """Subscribe ``streams`` while the decode thread is inside a slow step of another turn, so
    they are admitted together: one batched prefill, then shared decode steps."""
    model = engine.model
    real = model.decode_step
    stepping = threading.Event()

    def slow(*args: Any) -> Any:
        stepping.set()
        time.sleep(0.3)
        return real(*args)

    setattr(model, "decode_step", slow)  # noqa: B010 - the engine's model is thrown away afterwards
    engine.conversation("blocker").interact("Hi", max_new_tokens=2).subscribe()
    assert stepping.wait(10)
    setattr(model, "decode_step", real)  # noqa: B010
    results: list[Outcome] = [([], None) for _ in streams]
    done = [threading.Event() for _ in streams]
    for i, stream in enumerate(streams):

        def on_error(e: Exception, i: int = i) -> None:
            results[i] = (results[i][0], e)
            done[i].set()

        stream.subscribe(results[i][0].append, on_error, done[i].set)
    assert all(d.wait(30) for d in done)
    return results


def teacher_forced_logprobs(model: RxTModel, stm: torch.Tensor, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """``log_softmax`` of the model's own logits at each answer position (A, V), from one full
    causal forward over ``prompt + answer`` reading ``stm`` (L, S, D): what the decode loop's
    reported log-probabilities must equal, computed without the KV cache, the C step or the sampler."""
    ids = torch.tensor([[*prompt, *answer]], device=model.device)
    with torch.inference_mode():
        logits = model.decoder_logits(ids, stm[None].to(model.device, model.dtype))[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(answer)]


def play(
    engine: Engine,
    queries: list[str],
    seed: int = 0,
    reset_every_turn: bool = False,
    max_new_tokens: int = 32,
    timeout: float = 60,
) -> list[str]:
    """Greedy answers in one conversation whose STM starts from ``seed`` (a fixed seed keeps a
    test deterministic; a conversation opened without one seeds from its random id).
    ``reset_every_turn`` opens a fresh conversation (the same starting STM) for every query: the
    ablation that takes the memory away."""
    answers = []
    conv = engine.conversation(seed=seed)
    try:
        for query in queries:
            if reset_every_turn:
                conv.close()
                conv = engine.conversation(seed=seed)
            answers.append(conv.ask(query, temperature=0.0, max_new_tokens=max_new_tokens, timeout=timeout))
    finally:
        conv.close()
    return answers
