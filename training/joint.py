"""Stages 1 and 2: joint encoder-decoder training with a teacher-forced memory.

The encoder reads a masked copy of the sequence and predicts the masked tokens (MLM). The decoder
reads the original sequence autoregressively, and its memory cross-attention reads the encoder's
per-layer hidden states, *detached* and with a little Gaussian noise, in place of an STM::

    H          = Encoder(mask(x))                          # (B, L, T, D), one state per layer
    memory     = sg(H) + sigma * std(sg(H)) * N(0, 1)      # sg: no gradient into the encoder
    L_joint    = a * CE(Decoder(x, memory), next tokens) + b * CE(MLMHead(H_last), masked tokens)
                 + w_aux * MoE load-balancing loss

The decoder thereby learns to pull information out of memory cross-attention from a clean, stable
signal, and encoder and decoder come to share one representation space through the shared
embedding. Stage 1 runs this on plain text, stage 2 on ``[Q] .. [A] ..`` interactions.

Reading its own turn's encoding lets the decoder copy by position (the encoder saw the whole
turn, answer included). Stage 2 can also give a share of its rows a *retrieval* pair
(``JointStage.retrieval_share``): the encoder reads a turn that states a fact, the decoder writes
the next turn, a question about it (or about a fact never stated). There the value has to be
found by content in another turn's states, which is what reading the STM asks of it later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rxruntime.models.rxt import RxTModel

from .batches import IGNORE, TokenBatch
from .mlm import MLMHead, mask_tokens
from .recipe import JointStage

FIRST_REGULAR_ID = 7
"""Ids below this are the special tokens, which are never masked or used as random replacements."""


@dataclass
class JointLoss:
    total: Tensor
    ar: float
    mlm: float
    aux: float
    ar_accuracy: float


def joint_loss(
    model: RxTModel,
    head: MLMHead,
    batch: TokenBatch,
    stage: JointStage,
    vocab_size: int,
    generator: torch.Generator,
    encoder_batch: TokenBatch | None = None,
) -> JointLoss:
    """The stage 1/2 objective on one batch (``vocab_size``: the tokenizer's, for random replacements).

    ``encoder_batch`` (same rows): what the encoder reads, when it is not ``batch`` itself.
    """
    special = model.config.special_tokens
    if special.unk_id is None:
        raise ValueError("joint pre-training masks with [UNK]: special_tokens.unk_id must be set")
    source = batch if encoder_batch is None else encoder_batch
    if source.size != batch.size:
        raise ValueError(f"encoder_batch has {source.size} rows, batch {batch.size}")
    enc_ids, mlm_labels = mask_tokens(
        source.ids, source.mask, stage.mask_prob, special.unk_id, FIRST_REGULAR_ID, vocab_size, generator
    )
    hidden = model.encode(enc_ids, source.mask)  # (B, L, T, D)
    mlm_logits = head(hidden[:, -1])
    if bool((mlm_labels != IGNORE).any()):
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE)
    else:  # nothing was masked this time (tiny batches): no MLM signal, but keep the graph
        mlm = mlm_logits.sum() * 0.0

    memory = hidden.detach()
    if stage.memory_noise > 0:
        noise = torch.randn(memory.shape, generator=generator)
        memory = memory + stage.memory_noise * memory.std() * noise
    logits = model.decoder_logits(batch.ids, memory)[:, :-1]
    ar = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)

    total = stage.ar_weight * ar + stage.mlm_weight * mlm
    aux = model.decoder.aux_loss()
    if aux is not None:
        total = total + model.config.decoder.router_aux_loss_weight * aux
    with torch.no_grad():
        real = batch.targets != IGNORE
        accuracy = (logits.argmax(-1) == batch.targets)[real].float().mean()
    return JointLoss(total, ar.item(), mlm.item(), aux.item() if aux is not None else 0.0, accuracy.item())
