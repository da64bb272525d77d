"""Stage 4: supervised memory-aware training, the whole event-driven cycle over dialogues.

For a batch of dialogues with turns ``I_0 .. I_{N-1}``::

    STM_{-1} = random normal (the blank memory a conversation starts with)
    for t in 0 .. N-1:
        loss_t  = CE(Decoder(I_t, STM_{t-1}), next tokens of I_t)     # the answer's tokens
        STM_t   = MemAttn(STM_{t-1}, Encoder(I_t))                    # write turn t
    loss = sum_t loss_t

Gradients flow back through every memory write, so an answer at turn ``t`` teaches the encoder and
memory attention what they should have stored turns earlier. Components are unfrozen gradually,
because a freshly combined system would otherwise let an untrained write corrupt a trained read:
the decoder trains from the first step, memory attention from ``unfreeze_memory_attention``, the
encoder (with the shared embedding) from ``unfreeze_encoder``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rxruntime.models.rxt import RxTModel

from .batches import IGNORE, TokenBatch
from .recipe import MemoryAwareStage

GROUPS = ("decoder", "memory_attention", "encoder")


def trainable_groups(step: int, stage: MemoryAwareStage) -> tuple[str, ...]:
    """The components that train at ``step``: always the decoder, then memory attention, then encoder."""
    groups = ["decoder"]
    if step >= stage.unfreeze_memory_attention:
        groups.append("memory_attention")
    if step >= stage.unfreeze_encoder:
        groups.append("encoder")
    return tuple(groups)


def set_trainable(model: RxTModel, groups: tuple[str, ...]) -> None:
    """``requires_grad`` per component; the shared embedding moves with the encoder."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown component group(s) {sorted(unknown)}; known: {GROUPS}")
    modules: dict[str, list[nn.Module]] = {
        "decoder": [model.decoder],
        "memory_attention": [model.memory_attention],
        "encoder": [model.encoder, model.embedding],
    }
    for name, parts in modules.items():
        for module in parts:
            module.requires_grad_(name in groups)


def memory_aware_loss(
    model: RxTModel, turns: list[TokenBatch], present: Tensor, generator: torch.Generator
) -> tuple[Tensor, list[float], float]:
    """Summed per-turn losses over a batch of dialogues, each turn's loss, and answer token accuracy.

    ``present`` (turns, B) marks which dialogues have turn ``t`` (shorter ones are padded).
    """
    stm = model.init_stm(turns[0].size, generator=generator)
    total = torch.zeros(())
    per_turn: list[float] = []
    correct = counted = 0
    aux_weight = model.config.decoder.router_aux_loss_weight
    for t, batch in enumerate(turns):
        targets = batch.targets.masked_fill(~present[t][:, None], IGNORE)
        logits = model.decoder_logits(batch.ids, stm)[:, :-1]
        if bool((targets != IGNORE).any()):
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            aux = model.decoder.aux_loss()
            total = total + loss + (aux_weight * aux if aux is not None else 0.0)
            per_turn.append(loss.item())
            with torch.no_grad():
                real = targets != IGNORE
                correct += int((logits.argmax(-1) == targets)[real].sum())
                counted += int(real.sum())
        if t + 1 < len(turns):
            stm = model.memory_update(stm, batch.ids, batch.mask)
    return total, per_turn, correct / max(1, counted)
