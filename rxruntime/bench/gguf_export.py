"""The turn benchmark's Hugging Face Llama baseline as a GGUF file, so llama.cpp runs the same model.

A CPU user would run a Llama through llama.cpp, not transformers, so ``rxrt bench turns --baseline
llamacpp`` gives llama.cpp the very weights of :func:`rxruntime.bench.turns.build_baseline`. The
layout follows llama.cpp's own HF converter (``convert_hf_to_gguf.py``) for the ``llama`` arch:

* tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output``, float32 throughout;
* the rows of Q and K permuted per head: HF rotates the two halves of a head (``rotate_half``),
  llama.cpp's ``llama`` arch rotates adjacent pairs, so each head's rows ``[first half, second
  half]`` are interleaved (:func:`permute_qk`; :func:`unpermute_qk` undoes it);
* ``key_length`` / ``value_length`` written explicitly: this baseline's ``head_dim`` is the RxT
  decoder's, not ``hidden_size / num_attention_heads``, and llama.cpp would assume the latter;
* the MLP width zero-padded to a multiple of 32 (:func:`padded_ffn`): the baseline's width is
  picked to match RxT's active parameters and is odd (2,487 for alpha-mini), and llama.cpp's
  quantiser would leave ``ffn_down`` in f16 for want of whole 32-column q8_0 blocks. Zero rows of
  gate/up and zero columns of down add exactly nothing, so the function is unchanged (0.4% more
  bytes per token);
* a placeholder SentencePiece vocabulary of ``vocab_size`` tokens, because llama.cpp refuses a
  model without one; the benchmark feeds token ids and never tokenises text.

The q8_0 copy comes from llama.cpp's own quantiser (:func:`quantize_gguf`), so the 8-bit model is
the one ``llama-quantize`` would make.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rxruntime.models.backbone_gguf import unpermute_rope_rows

GGUF_TYPES = ("f32", "q8_0")
"""GGUF weight types the benchmark runs: the exported float32 file and llama.cpp's 8-bit copy."""
FFN_MULTIPLE = 32
"""q8_0 stores blocks of 32 along a row; the MLP width is zero-padded to a multiple of it."""


def permute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """HF's Q or K projection (``n_heads * head_dim`` rows) in llama.cpp's row order.

    Within each head, HF pairs row ``i`` with row ``i + head_dim / 2`` for RoPE; llama.cpp pairs
    rows ``2i`` and ``2i + 1``. So row ``i`` of the first half goes to ``2i``, of the second to ``2i + 1``.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of :func:`permute_qk`: llama.cpp's Q or K rows back in HF's order (the GGUF
    backbone reader's own inverse, :func:`rxruntime.models.backbone_gguf.unpermute_rope_rows`)."""
    return unpermute_rope_rows(weight, n_heads)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF ``LlamaForCausalLM`` parameter (KeyError for anything else)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    prefix, _, rest = hf_name.partition(".layers.")
    index, _, suffix = rest.partition(".")
    if prefix != "model" or not index.isdigit() or suffix not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for {hf_name!r}")
    return f"blk.{index}.{_LAYER_NAMES[suffix]}"


def rope_theta(config: Any) -> float:
    """The RoPE base of a ``LlamaConfig`` (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def padded_ffn(intermediate_size: int) -> int:
    """The MLP width written to GGUF: ``intermediate_size`` rounded up to a multiple of
    :data:`FFN_MULTIPLE`."""
    return -(-intermediate_size // FFN_MULTIPLE) * FFN_MULTIPLE


def gguf_tensors(llama: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Every weight of ``llama`` under its GGUF name as float32: Q and K rows permuted, the MLP
    zero-padded to :func:`padded_ffn` (extra rows of gate/up, extra columns of down)."""
    cfg = llama.config
    pad = padded_ffn(cfg.intermediate_size) - cfg.intermediate_size
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, tensor in llama.state_dict().items():
        weight = tensor.detach().to("cpu", torch.float32)
        if name.endswith("q_proj.weight"):
            weight = permute_qk(weight, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = permute_qk(weight, cfg.num_key_value_heads)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            weight = torch.nn.functional.pad(weight, (0, 0, 0, pad))
        elif name.endswith("down_proj.weight"):
            weight = torch.nn.functional.pad(weight, (0, pad))
        out[gguf_name(name)] = weight.contiguous().numpy()
    return out


def write_gguf(llama: Any, path: str | Path, special_ids: dict[str, int] | None = None) -> Path:
    """Write ``llama`` (an HF ``LlamaForCausalLM``) to ``path`` as a float32 GGUF llama.cpp loads.

    ``special_ids`` (``bos``, ``eos``, ``pad``, ``unk``) mark those placeholder tokens as control
    tokens; the config's ids are used when not given.
    """
    import gguf

    cfg = llama.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("write_gguf handles a Llama without biases (attention_bias/mlp_bias False)")
    if getattr(cfg, "tie_word_embeddings", False):
        raise ValueError("write_gguf expects an untied lm_head (tie_word_embeddings=False)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("rxruntime turn-benchmark baseline (random weights)")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(padded_ffn(cfg.intermediate_size))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    _add_placeholder_vocab(writer, cfg, special_ids)
    for name, array in gguf_tensors(llama).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_placeholder_vocab(writer: Any, cfg: Any, special_ids: dict[str, int] | None) -> None:
    """``vocab_size`` distinct dummy SentencePiece tokens; the special ones typed CONTROL."""
    import gguf

    ids = {
        "bos": cfg.bos_token_id,
        "eos": cfg.eos_token_id,
        "pad": cfg.pad_token_id,
        "unk": None,
        **(special_ids or {}),
    }
    types = [int(gguf.TokenType.NORMAL)] * cfg.vocab_size
    for token_id in ids.values():
        if token_id is not None:
            types[token_id] = int(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<id{i}>" for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types(types)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, token_id in ids.items():
        if token_id is not None:
            adders[key](int(token_id))
    writer.add_add_bos_token(False)


def quantize_gguf(src: str | Path, dst: str | Path, gguf_type: str = "q8_0", threads: int = 0) -> Path:
    """``src`` re-encoded as ``gguf_type`` by llama.cpp's own quantiser (``llama_model_quantize``,
    what ``llama-quantize`` runs): needs ``llama-cpp-python``."""
    from .llamacpp_runtime import import_llama_cpp

    llama_cpp = import_llama_cpp()
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    if gguf_type not in ftypes:
        raise ValueError(f"gguf_type must be one of {', '.join(ftypes)}, got {gguf_type!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) failed with code {code}")
    return Path(dst)
