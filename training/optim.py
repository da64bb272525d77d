"""AdamW, the learning-rate schedule, and the per-step seeds that make every run repeatable.

Every source of randomness in a training step (which data, which tokens get masked, memory
noise, the initial STM) is drawn from generators seeded by ``step_seed(seed, stage, step)``, a
pure function. A run interrupted after step ``i`` and resumed therefore sees exactly the batches
and noise an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import random

import torch
from torch import Tensor, nn

from .recipe import Optim


def step_seed(seed: int, stage: str, step: int) -> int:
    """A 63-bit seed for one step of one stage (SHA-256, so it is stable across Python versions)."""
    digest = hashlib.sha256(f"rxruntime/{seed}/{stage}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_generators(seed: int, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    """The Python RNG (data) and torch generator (masks, noise) of one step; also reseeds torch's
    global RNG for anything that uses it implicitly (dropout)."""
    s = step_seed(seed, stage, step)
    torch.manual_seed(s)
    return random.Random(s), torch.Generator().manual_seed(s)


def lr_at(step: int, o: Optim) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if o.warmup and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    span = max(1, o.steps - o.warmup)
    progress = min(1.0, (step - o.warmup) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params: list[nn.Parameter], o: Optim) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales, biases and gates' biases are exempt)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95), foreach=False)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, step: int, o: Optim) -> float:
    """Backward, clip, step at the scheduled learning rate; returns the gradient norm before clipping."""
    lr = lr_at(step, o)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip) if params else torch.tensor(0.0)
    optimizer.step()
    return float(norm)
