"""Stage 3: self-supervised pre-training of memory attention (the memory *write*).

There is no ground truth for what the STM should hold, so the label is a proxy: a weighted mean
of the old memory and the new Encoded Data. Over the turns ``t = 0, 1, ...`` of a dialogue::

    w_t      = 0.9                                   at t = 0 (the STM is still random noise)
               max(w_min, 0.5 - 0.05 * t)            afterwards (new data matters less and less)
    w_t     <- clip(w_t + U(-j, j), 0, 1)            random variation, j = 0.15
    ED_t    = Encoder(I_t)                           # (B, L, T, D), the encoder is frozen here
    label_t = (1 - w_t) * STM_{t-1} + w_t * pool(ED_t) (+ noise)
    STM_t   = MemAttn(STM_{t-1} + noise, ED_t)
    loss    = mean_t  -cos(STM_t, label_t)           # cosine per slot over D, averaged

**Pooling choice.** The STM has ``S`` slots, ED has ``T`` tokens. ``pool`` is the mean of ED over
the real (non-pad) tokens, broadcast to every slot: ``pool(ED)_{l,s} = sum_t m_t ED_{l,t} /
sum_t m_t``. Slots have no positions (the architecture forbids slot-specific positional
information), so any per-slot split of the tokens would be a label no permutation-equivariant
network could fit; the mean is the one target every slot can reach. The per-slot diversity of
the label comes from the ``(1 - w) * STM_{t-1}`` term. The STM passed to the next turn is
detached (one turn's graph at a time): stage 3 only has to make the write coherent, stage 4 then
trains through whole dialogues.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from rxruntime.models.rxt import RxTModel

from .batches import TokenBatch
from .recipe import MemoryPretrainStage


def label_weight(turn: int, stage: MemoryPretrainStage, rng: random.Random | None = None) -> float:
    """``w_t``, the share of new Encoded Data in the pseudo-label, with optional random jitter."""
    w = stage.first_weight if turn == 0 else max(stage.weight_min, stage.weight_start - stage.weight_step * turn)
    if rng is not None and stage.weight_jitter > 0:
        w += rng.uniform(-stage.weight_jitter, stage.weight_jitter)
    return min(1.0, max(0.0, w))


def pool_encoded(encoded: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ED (B, L, T, D) over real tokens -> (B, L, 1, D), ready to broadcast over slots."""
    if mask is None:
        return encoded.mean(dim=2, keepdim=True)
    m = mask.to(encoded.dtype)[:, None, :, None]
    return (encoded * m).sum(dim=2, keepdim=True) / m.sum(dim=2, keepdim=True).clamp_min(1.0)


def attend_encoded(stm: Tensor, encoded: Tensor, mask: Tensor | None, sharpness: float) -> Tensor:
    """Slot-wise soft nearest tokens: slot ``s`` gets ``sum_t softmax_t(k * cos(STM_s, ED_t)) ED_t``.

    Parameter-free and slot-permutation equivariant, like the network it supervises.
    """
    scores = sharpness * torch.einsum("blsd,bltd->blst", F.normalize(stm, dim=-1), F.normalize(encoded, dim=-1))
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return torch.einsum("blst,bltd->blsd", scores.softmax(dim=-1), encoded)


def _unit_rms(x: Tensor) -> Tensor:
    return x / x.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()


def pseudo_label(
    stm: Tensor, encoded: Tensor, mask: Tensor | None, weight: float, pool: str = "mean", sharpness: float = 10.0
) -> Tensor:
    """``(1 - w) * STM + w * pool(ED)``, shape (B, L, S, D), both terms at unit RMS per slot.

    The random initial STM and the encoder's states live at different scales; normalising both
    makes ``w`` the share each really contributes to the label's direction (the loss is a cosine).
    """
    new = pool_encoded(encoded, mask) if pool == "mean" else attend_encoded(stm, encoded, mask, sharpness)
    return (1.0 - weight) * _unit_rms(stm) + weight * _unit_rms(new).expand_as(stm)


def _noisy(x: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    if scale <= 0:
        return x
    return x + scale * x.std() * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def memory_pretrain_loss(
    model: RxTModel,
    turns: list[TokenBatch],
    stage: MemoryPretrainStage,
    rng: random.Random,
    generator: torch.Generator,
) -> tuple[Tensor, list[float]]:
    """Mean negative cosine similarity over the turns of a batch of dialogues (and each turn's value)."""
    stm = model.init_stm(turns[0].size, generator=generator)
    total = torch.zeros(())
    per_turn = []
    for t, batch in enumerate(turns):
        with torch.no_grad():
            encoded = model.encode(batch.ids, batch.mask, stm)
        weight = label_weight(t, stage, rng)
        label = pseudo_label(stm, encoded, batch.mask, weight, stage.label_pool, stage.pool_sharpness)
        label = _noisy(label, stage.noise, generator)
        new = model.update_memory(_noisy(stm, stage.noise, generator), encoded, batch.mask)
        loss = -F.cosine_similarity(new, label, dim=-1).mean()
        total = total + loss
        per_turn.append(loss.item())
        stm = new.detach()
    return total / len(turns), per_turn
