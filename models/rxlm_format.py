"""RxLM checkpoints as they are: map an ``RxTAlpha`` / ``RxTBeta`` directory onto our model.

RxLM's ``save_pretrained`` writes ``config.json`` with ``decoder_config``, ``encoder_config``,
``memory_attention_config``, ``memory_attention_variant`` and ``tokenizer_config``, holding only
the arguments its author passed: every other option is the default of the constructor of the
RxLM version that wrote it. This module turns that into an :class:`RxTConfig` whose named fields
say what RxLM builds (:func:`rxlm_config`) and renames (and, where the layouts differ, reshapes)
the weights (:func:`rxlm_weights`). What RxLM computes differently from our defaults is a config
field, never a hidden branch: RoPE pairing, biases, norm epsilon, gate kinds, memory norms...

Two RxLM versions are known, and config.json does not say which one wrote it:

* ``0.2`` (0.2.x): RoPE pairs adjacent features and writes them back split; the encoder's memory
  cross-attention reads the encoder's own STM buffer (a constant of the checkpoint); MoE experts
  are separate modules with biases; ``interlayer`` builds interlayer memory attention.
* ``0.3`` (0.3.x): RoPE pairs adjacent features in place; the encoder never reads memory; MoE
  experts are stacked tensors (``w1``/``w2``) with a global output bias and a shared expert by
  default; stateless decoder layers; ``interlayer`` builds *self*-interlayer memory attention.

:func:`detect_version` decides from what only 0.3 writes (its MoE tensors, stateless layers,
options 0.2 does not have) and from the encoder's own STM buffer (see there). Within a line,
releases differ too (0.3.91 stopped shifting decode steps by one position; 0.3.81 on tokenise
under transformers 5): the numbers are those of the newest release known unless
``rxlm_version`` (or ``RXRT_RXLM_VERSION``) names another (:func:`resolve_release`).
Options rxruntime does not compute (linear or hybrid
attention, NoPE, an MoE encoder...) raise :class:`UnsupportedRxLMOption` naming the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .config import DecoderConfig, EncoderConfig, MemoryAttentionConfig, RxTConfig, SpecialTokens
from .errors import ConfigError

RXLM_KEYS = ("decoder_config", "encoder_config", "memory_attention_config")
VERSION_ENV = "RXRT_RXLM_VERSION"


class UnsupportedRxLMOption(ConfigError):
    """An RxLM option rxruntime does not compute; the message names the field and its value."""


def is_rxlm_config(data: Mapping[str, Any]) -> bool:
    """Whether a parsed config.json is RxLM's (``RxTAlpha``/``RxTBeta``)."""
    return all(isinstance(data.get(k), dict) for k in RXLM_KEYS)


def rxlm_component_kind(data: Mapping[str, Any]) -> str | None:
    """What a config.json of one RxLM component alone holds (``None`` if it is not one).

    RxLM publishes the decoder, the encoder, the memory attention and the MLM head of a model
    in repositories of their own, for training stages; such a config.json has one component's
    constructor options at its top instead of ``decoder_config``/``encoder_config``/... .
    """
    keys = set(data)
    if is_rxlm_config(data) or "embed_dim" not in keys or "dim" in keys:
        return None  # ours has "dim"
    if keys & {"residual_gate_type", "norm_type", "use_gated_residual", "interlayer_att_type"}:
        return "memory attention"
    if "att_heads" not in keys:
        return "MLM head"
    if data.get("use_moe") or data.get("stateless_layers_config"):
        return "decoder"
    if data.get("skip_memory_cross_attention"):
        return "encoder"
    return "decoder or encoder"


# ---------------------------------------------------------------------- version
# Component options that only RxLM 0.3 accepts (0.2's constructors reject unknown keywords), less
# the two that 0.2.38-0.2.45 also saved (``stateless_layers_config``, ``dense_layer_dim``).
_V03_COMPONENT_KEYS = {
    "num_shared_experts", "shared_expert_dim", "final_stateless_layers_config",
    "attn_layer_types", "use_nope", "head_norm_type", "router_amp", "router_dtype",
    "use_vectorized_moe", "vectorized_moe_from_legacy", "moe_grouped_gemm", "moe_bias_mode",
    "moe_shared_experts_bias_mode", "moe_use_weighted_shared_experts", "use_gated_attention",
    "use_attention_output_bias", "legacy_stm_in_encoder", "rope_base", "linear_attn_mode",
}  # fmt: skip
_V03_WEIGHT = re.compile(r"\.ff\.(w1|w2|global_bias|shared_expert\.|shared_w1)|final_stateless_layers\.")
# Stateless layers: 0.2.38-0.2.45 build them as ClassicTransformerLayer (feed-forward norm
# ``norm2``), 0.3 as a ReactiveTransformerLayer without cross-attention (``norm3``).
_V02_STATELESS = re.compile(r"decoder\.model\.stateless_layers\.\d+\.norm2\.")
_V03_STATELESS = re.compile(r"decoder\.model\.stateless_layers\.\d+\.norm3\.")

ENCODER_STM = "encoder.model.stm.memory"

NEWEST = {"0.2": 45, "0.3": 93}
"""The newest patch release of each RxLM line rxruntime knows (0.2.45, 0.3.93)."""
STEP_SHIFT_DROPPED = 91
"""From RxLM 0.3.91 on, ``interact`` feeds a decode step's token at its own index; before, at
index + 1 (``decoder.step_position_offset`` 1). Read in the published wheels: 0.3.90's
``interact`` passes ``current_positions = len(ids)``, 0.3.91's ``len(ids) - 1``."""


def parse_release(value: str, source: str = "rxlm_version") -> tuple[str, str]:
    """``(format, release)`` for an RxLM version option: ``"0.3"`` or ``"0.3.93"`` ->
    ``("0.3", "0.3.93")``, ``"0.3.80"`` -> ``("0.3", "0.3.80")``, ``"0.2"`` -> ``("0.2", "0.2.45")``.

    A bare line means its newest release. Anything else, or a release newer than rxruntime
    knows, is an :class:`UnsupportedRxLMOption` naming ``source``.
    """
    m = re.fullmatch(r"0\.(2|3)(?:\.(\d+))?", str(value).strip())
    known = ", ".join(f"{line}.x up to {line}.{patch}" for line, patch in NEWEST.items())
    if m is None:
        raise UnsupportedRxLMOption(f"{source}={value!r}: not an RxLM version rxruntime computes ({known})")
    line = f"0.{m.group(1)}"
    patch = NEWEST[line] if m.group(2) is None else int(m.group(2))
    if patch > NEWEST[line]:
        raise UnsupportedRxLMOption(f"{source}={value!r}: newer than the RxLM releases rxruntime knows ({known})")
    return line, f"{line}.{patch}"


def _patch(release: str) -> int:
    return int(release.rpartition(".")[2])


def step_position_offset(release: str) -> int:
    """RxLM's RoPE shift of decode-step tokens in ``release`` (see :data:`STEP_SHIFT_DROPPED`)."""
    return 0 if release.startswith("0.3.") and _patch(release) >= STEP_SHIFT_DROPPED else 1


def resolve_release(
    data: Mapping[str, Any],
    weight_names: list[str] | None = None,
    encoder_stm: Tensor | None = None,
    rxlm_version: str | None = None,
) -> tuple[str, str]:
    """``(format, release)`` of an RxLM checkpoint: ``rxlm_version`` when given, else
    ``RXRT_RXLM_VERSION``, else the format :func:`detect_version` finds with its line's newest
    release (the directory does not say which release will run it; the newest is the default)."""
    if rxlm_version:
        return parse_release(rxlm_version)
    forced = os.environ.get(VERSION_ENV)
    if forced:
        try:
            return parse_release(forced, VERSION_ENV)
        except UnsupportedRxLMOption as exc:
            raise ConfigError(str(exc)) from exc
    line = detect_version(data, weight_names, encoder_stm)
    return parse_release(line)


def detect_version(
    data: Mapping[str, Any], weight_names: list[str] | None = None, encoder_stm: Tensor | None = None
) -> str:
    """``"0.2"`` or ``"0.3"``: which RxLM line wrote this checkpoint (see the module docstring).

    In order: options or tensors only 0.3 has; the stateless layers' norm names (0.2.38-0.2.45
    saved stateless layers too, built otherwise); then the encoder's own STM buffer, which 0.2
    always builds, initialises with std 0.02 and never changes (its conversation STM is another
    buffer), while 0.3 builds it only for an encoder with memory cross-attention and initialises
    it with std 1. ``RXRT_RXLM_VERSION`` (any 0.2/0.3 version) overrides all of this.
    """
    forced = os.environ.get(VERSION_ENV)
    if forced:
        try:
            return parse_release(forced, VERSION_ENV)[0]
        except UnsupportedRxLMOption as exc:
            raise ConfigError(str(exc)) from exc
    for key in ("decoder_config", "encoder_config", "memory_attention_config"):
        if _V03_COMPONENT_KEYS & set(data.get(key) or {}):
            return "0.3"
    if data.get("memory_attention_variant") == "grouped-self-interlayer":
        return "0.3"
    if weight_names is None:
        return "0.2"
    if any(_V03_WEIGHT.search(n) or _V03_STATELESS.match(n) for n in weight_names):
        return "0.3"
    if any(_V02_STATELESS.match(n) for n in weight_names):
        return "0.2"
    if data.get("memory_attention_variant") == "interlayer" and any(
        ".interlayer_gate_layers." in n for n in weight_names
    ):
        return "0.3"  # 0.3 builds self-interlayer attention (with these gates) for 'interlayer'
    if ENCODER_STM not in weight_names:
        return "0.3"
    if encoder_stm is not None and encoder_stm.numel() > 1 and float(encoder_stm.float().std()) > 0.2:
        return "0.3"
    return "0.2"


# ---------------------------------------------------------------------- defaults
# The constructor defaults of each version, for the options this mapping reads.
_COMPONENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "0.2": {
        "num_layers": 12, "vocab_size": 20000, "embed_dim": 512, "ff_dim": 1536, "att_heads": 16, "seq_len": 1024,
        "stm_size": 1024, "use_gated": True, "ff_activation": "swish", "use_rms_norm": True, "att_groups": 1,
        "use_moe": False, "num_experts": 1, "moe_top_k": 1, "self_att_type": "gqa", "cross_att_type": "mqa",
        "att_query_groups": None, "cross_att_groups": None, "cross_att_query_groups": None,
        "use_head_norm": False, "skip_memory_cross_attention": False, "stateless_layers_config": None,
        "dense_layer_dim": 1536,
    },
    "0.3": {
        "num_layers": 12, "vocab_size": 20000, "embed_dim": 512, "ff_dim": 1536, "att_heads": 16, "seq_len": 1024,
        "stm_size": 1024, "use_gated": True, "ff_activation": "swish", "use_rms_norm": True, "att_groups": 1,
        "use_moe": False, "num_experts": 1, "num_shared_experts": 1, "shared_expert_dim": None, "moe_top_k": 1,
        "self_att_type": "sqa", "cross_att_type": "sqa", "att_query_groups": None, "cross_att_groups": None,
        "cross_att_query_groups": None, "use_head_norm": False, "skip_memory_cross_attention": False,
        "stateless_layers_config": None, "final_stateless_layers_config": None, "dense_layer_dim": 1536,
        "use_nope": False, "head_norm_type": "layer_norm", "router_amp": False, "router_dtype": "float32",
        "use_vectorized_moe": True, "vectorized_moe_from_legacy": False, "moe_bias_mode": "global",
        "moe_shared_experts_bias_mode": "local", "moe_use_weighted_shared_experts": False,
        "use_gated_attention": False, "use_gated_cross_attention": None, "gated_attention_activation": "sigmoid",
        "use_attention_output_bias": True,
        "legacy_stm_in_encoder": False, "rope_base": 10000,
    },
}  # fmt: skip
_MEMORY_DEFAULTS: dict[str, Any] = {
    "num_layers": 12, "num_groups": 1, "embed_dim": 512, "att_heads": 16, "seq_len": 1024, "stm_size": 1024,
    "att_groups": 1, "att_type": "sqa", "att_query_groups": None, "interlayer_att_groups": 1,
    "interlayer_att_type": "sqa", "interlayer_att_query_groups": None, "norm_type": "classic-rms",
    "norm_per_dim_scale": False, "use_gated_residual": False, "residual_per_slot_gate": True,
    "residual_gate_type": "static", "residual_gate_slot_status_type": "mean", "use_tanh_residual_gate": True,
    "rope_base": 10000,
}  # fmt: skip
_MEMORY_NORMS = {
    "classic-rms": "rmsnorm",
    "rms": "gated-rms",
    "adaptive": "gated-adaptive-rms",
    "positional": "gated-positional",
    "layer": "gated-layer",
}
_BIAS_MODES = {"local": "local", "global": "global", "off": "none"}


class _Options:
    """One RxLM component's options with its version's defaults; ``get`` names the field on error."""

    def __init__(self, section: str, data: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
        self.section = section
        self.data = dict(data)
        self.defaults = defaults

    def get(self, key: str) -> Any:
        value = self.data.get(key, self.defaults.get(key))
        return self.defaults.get(key) if value is None and key in self.defaults else value

    def refuse(self, key: str, reason: str) -> UnsupportedRxLMOption:
        return UnsupportedRxLMOption(f"config.json {self.section}.{key}={self.get(key)!r}: {reason}")

    def require(self, key: str, allowed: tuple[Any, ...], reason: str) -> Any:
        value = self.get(key)
        if value not in allowed:
            raise self.refuse(key, reason)
        return value


def _heads(o: _Options, kind_key: str, groups: int, query_groups: int | None) -> tuple[int, int]:
    """(query heads, key/value heads) of one RxLM attention (its head split is ``att_heads``)."""
    heads = int(o.get("att_heads"))
    kind = o.get(kind_key)
    if kind == "mha":
        return heads, heads
    if kind == "gqa":
        return heads, int(groups)
    if kind == "mqa":
        return heads, 1
    if kind == "sqa":
        if query_groups is None:
            raise o.refuse(kind_key, "sqa needs att_query_groups (RxLM cannot build it without)")
        return int(query_groups), int(groups)  # fewer query than kv heads: reversed SQA
    raise o.refuse(kind_key, "only mha, gqa, mqa and sqa attention are supported (not experimental/linear kinds)")


_ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid",
                "tanh": "tanh", "linear": "identity"}  # fmt: skip


def _ffn(o: _Options) -> dict[str, Any]:
    """The feed-forward fields of one component: activation, gated, biases."""
    act = o.require("ff_activation", tuple(_ACTIVATIONS), "unknown feed-forward activation")
    return {"ffn_activation": _ACTIVATIONS[act], "ffn_gated": bool(o.get("use_gated")), "ffn_bias": True}


def _gates(o: _Options, version: str) -> tuple[str, str]:
    """(self-attention gate, cross-attention gate): ``none`` or the activation (RxLM 0.3)."""
    if version == "0.2":
        return "none", "none"
    act = _ACTIVATIONS.get(str(o.get("gated_attention_activation") or "sigmoid"))
    if act is None:
        raise o.refuse("gated_attention_activation", "unknown activation")
    own = bool(o.get("use_gated_attention"))
    cross = o.get("use_gated_cross_attention")
    cross = own if cross is None else bool(cross)
    return (act if own else "none"), (act if cross else "none")


# Every option an RxLM constructor takes, by config.json section: what rxruntime computes from
# it (read below) and what does not change inference (dropouts, attention/MoE kernel choices,
# initial values of saved parameters, training statistics, debugging, and the linear-attention
# options, which only hybrid self-attention reads and that is refused). Anything else is refused
# naming the field: an option nobody has mapped could change the numbers.
_COMPONENT_COMPUTED = {
    "num_layers", "vocab_size", "embed_dim", "ff_dim", "att_heads", "seq_len", "stm_size", "use_gated",
    "ff_activation", "use_rms_norm", "att_groups", "use_moe", "num_experts", "num_shared_experts",
    "shared_expert_dim", "moe_top_k", "self_att_type", "cross_att_type", "att_query_groups", "cross_att_groups",
    "cross_att_query_groups", "use_head_norm", "skip_memory_cross_attention", "stateless_layers_config",
    "final_stateless_layers_config", "dense_layer_dim", "use_nope", "head_norm_type", "router_amp",
    "router_dtype", "use_vectorized_moe", "moe_bias_mode", "moe_shared_experts_bias_mode",
    "moe_use_weighted_shared_experts", "use_gated_attention", "gated_attention_activation",
    "use_gated_cross_attention", "use_attention_output_bias", "rope_base",
}  # fmt: skip
_COMPONENT_INERT = {
    "use_flash_attention", "ff_dropout", "att_dropout", "init_identity_norm", "moe_grouped_gemm",
    "moe_use_cutlass_grouped_gemm", "vectorized_moe_from_legacy", "legacy_stm_in_encoder", "att_experts",
    "att_query_experts", "attn_layer_types", "stateless_attn_layer_types", "final_stateless_attn_layer_types",
    "linear_attn_mode", "linear_attn_expand_k", "linear_attn_expand_v", "linear_attn_use_short_conv",
    "linear_attn_conv_size", "linear_attn_use_gate", "linear_attn_norm_eps", "linear_attn_heads",
}  # fmt: skip
_MEMORY_COMPUTED = {
    "num_layers", "num_groups", "embed_dim", "att_heads", "seq_len", "stm_size", "att_groups", "att_type",
    "att_query_groups", "interlayer_att_groups", "interlayer_att_type", "interlayer_att_query_groups", "norm_type",
    "norm_per_dim_scale", "use_gated_residual", "residual_per_slot_gate", "residual_gate_type",
    "residual_gate_slot_status_type", "use_tanh_residual_gate", "rope_base",
}  # fmt: skip
_MEMORY_INERT = {
    "use_flash_attention", "att_dropout", "interlayer_att_dropout", "att_experts", "att_query_experts",
    "interlayer_att_experts", "interlayer_att_query_experts", "norm_init_gate", "residual_gate_init", "norm_decay",
    "debug_mode", "debug_interval",
}  # fmt: skip
_TOP_LEVEL = {
    "decoder_config", "encoder_config", "memory_attention_config", "memory_attention_variant", "tokenizer_config",
    "tokenizer", "system_prompt_title",
}  # fmt: skip
_ROUTER_DTYPES = ("float32", "bfloat16", "float16")


def _known_keys(data: Mapping[str, Any]) -> None:
    """Refuse, naming it, any config.json field no RxLM version rxruntime knows writes."""
    for key in data:
        if key not in _TOP_LEVEL:
            raise UnsupportedRxLMOption(f"config.json {key}: not an RxLM option rxruntime knows")
    for section, known in (
        ("decoder_config", _COMPONENT_COMPUTED | _COMPONENT_INERT),
        ("encoder_config", _COMPONENT_COMPUTED | _COMPONENT_INERT),
        ("memory_attention_config", _MEMORY_COMPUTED | _MEMORY_INERT),
    ):
        for key in data[section]:
            if key not in known:
                raise UnsupportedRxLMOption(
                    f"config.json {section}.{key}={data[section][key]!r}: not an RxLM option rxruntime knows"
                )


def _router_dtype(o: _Options) -> str:
    """The router's precision: ``router_dtype`` under ``router_amp`` (RxLM autocasts the router
    to it), float32 otherwise (RxLM ignores ``router_dtype`` without ``router_amp``)."""
    dtype = o.require("router_dtype", _ROUTER_DTYPES, "must be one of " + ", ".join(_ROUTER_DTYPES))
    if not o.get("router_amp") or dtype == "float32":
        return "float32"
    if o.get("moe_use_weighted_shared_experts") and o.get("num_shared_experts"):
        # RxLM scales the reduced-precision routing weights before mixing; not mirrored.
        raise o.refuse("moe_use_weighted_shared_experts", f"not supported with router_dtype={dtype!r}")
    return str(dtype)


def _component_checks(o: _Options, version: str) -> None:
    if version == "0.3":
        o.require("self_att_type", ("mha", "gqa", "mqa", "sqa"), "hybrid/linear attention layers are not supported")
        o.require("use_nope", (False,), "attention without RoPE is not supported")


def rxlm_config(
    data: Mapping[str, Any], version: str, weight_names: list[str] | None = None, release: str | None = None
) -> RxTConfig:
    """Our config for an RxLM config.json written by RxLM ``version`` (``"0.2"``/``"0.3"``), with
    the numbers of RxLM ``release`` (default: the line's newest, see :func:`parse_release`);
    ``weight_names`` settle what the config leaves open (RxTBeta 0.2 saves no variant)."""
    _known_keys(data)
    line, release = parse_release(release or version)
    if line != version:
        raise UnsupportedRxLMOption(f"rxlm_version={release!r} is not of the RxLM {version} format")
    self_interlayer_weights = any(".interlayer_gate_layers." in n for n in weight_names or [])
    defaults = _COMPONENT_DEFAULTS[version]
    # RxTBeta's tokenizer_config names its thinking/tool tokens; its default variant differs.
    beta = "think_token_id" in (data.get("tokenizer_config") or {})
    dec = _Options("decoder_config", data["decoder_config"], defaults)
    enc = _Options("encoder_config", data["encoder_config"], defaults)
    mem = _Options("memory_attention_config", data["memory_attention_config"], _MEMORY_DEFAULTS)
    for o in (dec, enc):
        _component_checks(o, version)
    if bool(dec.get("use_rms_norm")) != bool(enc.get("use_rms_norm")):
        raise enc.refuse("use_rms_norm", "must equal decoder_config.use_rms_norm")
    enc.require("use_moe", (False,), "a mixture-of-experts encoder is not supported")

    layers = int(dec.get("num_layers"))
    dim = int(dec.get("embed_dim"))
    for o in (enc, mem):
        for key, value in (("num_layers", layers), ("embed_dim", dim), ("stm_size", dec.get("stm_size"))):
            if o.get(key) != value:
                raise o.refuse(key, f"must equal decoder_config.{key}={value!r}")
    if enc.get("vocab_size") != dec.get("vocab_size"):
        raise enc.refuse("vocab_size", f"must equal decoder_config.vocab_size={dec.get('vocab_size')!r}")
    rope_base = float(dec.get("rope_base") or 10000) if version == "0.3" else 10000.0
    for o in (enc, mem):
        if version == "0.3" and float(o.get("rope_base") or 10000) != rope_base:
            raise o.refuse("rope_base", f"must equal decoder_config.rope_base={rope_base:g}")

    # --------------------------------------------------------------- decoder
    q_self, kv_self = _heads(dec, "self_att_type", dec.get("att_groups"), dec.get("att_query_groups"))
    cross_groups = dec.get("att_groups") if version == "0.2" else (dec.get("cross_att_groups") or dec.get("att_groups"))
    q_cross, kv_cross = _heads(
        dec, "cross_att_type", cross_groups, dec.get("cross_att_query_groups") or dec.get("att_query_groups")
    )
    if dec.get("skip_memory_cross_attention"):
        raise dec.refuse("skip_memory_cross_attention", "a decoder without memory cross-attention is not an RxT")
    use_moe = bool(dec.get("use_moe"))
    ff_dim = int(dec.get("ff_dim"))
    out_bias = True if version == "0.2" else bool(dec.get("use_attention_output_bias"))
    final_norm = "none"
    if dec.get("use_head_norm"):
        head_norm = "layer_norm" if version == "0.2" else dec.get("head_norm_type")
        final_norm = {"layer_norm": "layer", "rms_norm": "rms"}.get(str(head_norm), "")
        if not final_norm:
            raise dec.refuse("head_norm_type", "must be layer_norm or rms_norm")
    moe: dict[str, Any] = {"expert_bias_mode": "local"}
    # 0.2.38-0.2.45 build stateless layers before the memory layers too (never after them)
    before = list(dec.get("stateless_layers_config") or [])
    after = list(dec.get("final_stateless_layers_config") or []) if version == "0.3" else []
    for key, kinds in (("stateless_layers_config", before), ("final_stateless_layers_config", after)):
        if any(k not in ("dense", "moe") for k in kinds):
            raise dec.refuse(key, "entries must be 'dense' or 'moe'")
    router_dtype = "float32"
    if version == "0.3":
        router_dtype = _router_dtype(dec) if use_moe else "float32"
        if use_moe:
            shared = int(dec.get("num_shared_experts") or 0)
            vectorized = bool(dec.get("use_vectorized_moe"))
            moe = {
                "expert_bias_mode": _BIAS_MODES[str(dec.get("moe_bias_mode"))] if vectorized else "local",
                "num_shared_experts": shared,
                "shared_expert_ffn_dim": int(dec.get("shared_expert_dim") or 0) if vectorized else 0,
                "shared_expert_bias_mode": (
                    _BIAS_MODES[str(dec.get("moe_shared_experts_bias_mode"))] if vectorized else "local"
                ),
                "shared_experts_scaled": bool(dec.get("moe_use_weighted_shared_experts")) and vectorized,
            }
    decoder = DecoderConfig(
        num_heads=int(dec.get("att_heads")),
        self_q_heads=q_self,
        self_kv_heads=kv_self,
        cross_q_heads=q_cross,
        cross_kv_heads=kv_cross,
        num_experts=int(dec.get("num_experts")) if use_moe else 1,
        experts_per_token=int(dec.get("moe_top_k")) if use_moe else 1,
        expert_ffn_dim=ff_dim,
        attention_bias=False,
        attention_output_bias=out_bias,
        use_moe=use_moe,
        ffn_dim=ff_dim,
        dense_ffn_dim=int(dec.get("dense_layer_dim") or 0) if "dense" in before + after else 0,
        **_ffn(dec),
        final_norm=final_norm,  # type: ignore[arg-type]
        lm_head_bias=True,
        layers_before=before,
        layers_after=after,
        step_position_offset=step_position_offset(release),
        router_dtype=router_dtype,  # type: ignore[arg-type]
        attention_gate=_gates(dec, version)[0],  # type: ignore[arg-type]
        cross_attention_gate=_gates(dec, version)[1],  # type: ignore[arg-type]
        **moe,
    )

    # --------------------------------------------------------------- encoder
    q_enc, kv_enc = _heads(enc, "self_att_type", enc.get("att_groups"), enc.get("att_query_groups"))
    reads_memory = version == "0.2" and not enc.get("skip_memory_cross_attention")
    q_ec, kv_ec = q_enc, kv_enc
    if reads_memory:
        q_ec, kv_ec = _heads(
            enc,
            "cross_att_type",
            enc.get("att_groups"),
            enc.get("cross_att_query_groups") or enc.get("att_query_groups"),
        )
    encoder = EncoderConfig(
        num_heads=int(enc.get("att_heads")),
        self_q_heads=q_enc,
        self_kv_heads=kv_enc,
        memory_cross_attention=reads_memory,
        cross_q_heads=q_ec,
        cross_kv_heads=kv_ec,
        ffn_dim=int(enc.get("ff_dim")),
        attention_bias=False,
        attention_output_bias=True if version == "0.2" else bool(enc.get("use_attention_output_bias")),
        **_ffn(enc),
        memory_source="fixed",
        attention_gate=_gates(enc, version)[0],  # type: ignore[arg-type]
    )

    # --------------------------------------------------------------- memory attention
    # RxTAlpha's constructor only tells some names apart; any other name builds its fallback.
    # RxTBeta (0.2) saves no variant: it always builds self-interlayer, as its interlayer gates show.
    variant_name = data.get("memory_attention_variant") or (
        "self-interlayer" if beta or self_interlayer_weights else "interlayer"
    )
    if version == "0.2":
        variant = "interlayer" if variant_name == "interlayer" else "self-interlayer"
    else:  # 0.3 builds self-interlayer for anything but grouped-self-interlayer (its 'if' chain)
        variant = "grouped-self-interlayer" if variant_name == "grouped-self-interlayer" else "self-interlayer"
    q_mem, kv_mem = _heads(mem, "att_type", mem.get("att_groups"), mem.get("att_query_groups"))
    q_pre, kv_pre = _heads(
        mem, "interlayer_att_type", mem.get("interlayer_att_groups"), mem.get("interlayer_att_query_groups")
    )
    norm_type = mem.require("norm_type", tuple(_MEMORY_NORMS), "unknown memory norm type")
    gated = bool(mem.get("use_gated_residual"))
    gate_type = mem.require("residual_gate_type", ("static", "elementwise", "linear"), "unknown gate type")
    per_slot = bool(mem.get("residual_per_slot_gate"))
    memory = MemoryAttentionConfig(
        variant=variant,  # type: ignore[arg-type]
        num_heads=int(mem.get("att_heads")),
        q_heads=q_mem,
        kv_heads=kv_mem,
        pre_q_heads=q_pre,
        pre_kv_heads=kv_pre,
        gate_type=gate_type if gated else "none",
        gate_per_slot=per_slot,
        gate_per_layer=not per_slot,
        gate_activation="tanh" if mem.get("use_tanh_residual_gate") else "sigmoid",
        gate_slot_status=mem.require("residual_gate_slot_status_type", ("mean", "linear"), "unknown slot status"),
        rope_on_keys=True,
        attention_bias=False,
        attention_output_bias=True,
        memory_norm=_MEMORY_NORMS[norm_type],  # type: ignore[arg-type]
        memory_norm_per_dim_scale=bool(mem.get("norm_per_dim_scale")),
        num_groups=int(mem.get("num_groups")) if variant == "grouped-self-interlayer" else 1,
    )

    tok = data.get("tokenizer_config") or {}
    try:
        special = SpecialTokens(
            pad_id=int(tok["pad_token_id"]),
            unk_id=None,
            bos_id=int(tok["bos_token_id"]),
            eos_id=int(tok["eos_token_id"]),
            query_id=int(tok["query_token_id"]),
            answer_id=int(tok["answer_token_id"]),
            think_id=int(tok["think_token_id"]) if tok.get("think_token_id") is not None else None,
            internal_id=int(tok["internal_token_id"]) if tok.get("internal_token_id") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config.json tokenizer_config lacks a special token id ({exc})") from exc
    seq_len = max(int(dec.get("seq_len")), int(enc.get("seq_len")), int(mem.get("seq_len")))
    return RxTConfig(
        vocab_size=int(dec.get("vocab_size")),
        dim=dim,
        num_layers=layers,
        stm_size=int(dec.get("stm_size")),
        max_seq_len=seq_len,
        rope_base=rope_base,
        norm_eps=None,
        layer_norm=not dec.get("use_rms_norm"),
        rope_pairing="adjacent-split" if version == "0.2" else "adjacent",
        stm_init_std=1.0,  # share_components resets RxLM's STM with a standard normal
        eos_after_truncated_answer=False,
        # RxLM 0.3.81 on require transformers 5, whose wrapper keeps tokenizer.json's prefix space
        tokenizer_template="rxlm-as-written" if _patch(release) >= 81 and version == "0.3" else "rxlm",
        # RxTBeta 0.3 has its own query and system-prompt template (0.2's RxTBeta uses RxTAlpha's)
        interaction_template="beta" if beta and version == "0.3" else "alpha",
        rxlm_version=release,
        system_prompt_title=str(data.get("system_prompt_title") or "SYSTEM INSTRUCTIONS"),
        decoder=decoder,
        encoder=encoder,
        memory_attention=memory,
        special_tokens=special,
    )


# ---------------------------------------------------------------------- weights
def _swap_halves(t: Tensor, dim: int = 0) -> Tensor:
    """RxLM's GLU projection is ``[linear; gate]``, ours ``[gate; up]``: swap the two halves."""
    first, second = t.chunk(2, dim=dim)
    return torch.cat([second, first], dim=dim).contiguous()


_ATTENTION = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "out_proj": "o_proj",
    "gate_proj": "gate_proj",
}
_LAYER_NORMS = {"norm1": "self_norm", "norm2": "cross_norm", "norm3": "ffn_norm", "stm_norm": "stm_norm"}
_MEMORY_MODULES = {
    "attention_layers": "attention",
    "memory_norm_layers": "memory_norm",
    "memory_input_norm_layers": "input_norm",
    "residual_gate_layers": "gate",
    "mean_attention_layers": "pre_attention",
    "mean_memory_norm_layers": "pre_norm",
    "mean_residual_gate_layers": "pre_gate",
    "interlayer_gate_layers": "mix_gate",
}


def _ignored(name: str) -> bool:
    """RxLM buffers that are not weights: RoPE tables, the conversation STM copies."""
    return ".rope." in name or name in ("decoder.model.stm.memory", "memory_attention.model.stm.memory")


def rxlm_weights(
    tensors: Mapping[str, Tensor], config: RxTConfig, *, consume: bool = False
) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict from RxLM's tensors, and the RxLM names that map to nothing we know.

    Names our model expects but this does not produce surface as missing in the caller's check.
    ``consume`` (``tensors`` a dict): remove each tensor from it once mapped, so that a tensor
    re-laid out (the MoE experts: nearly all of RxT-Beta's 5.9 GB) is never held twice.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    d = config.decoder
    n_before = len(d.layers_before)
    experts: dict[tuple[str, int], dict[str, Tensor]] = {}
    gated = d.ffn_gated

    # The embedding is shared: RxLM's share_components gives the decoder the encoder's.
    for name in ("encoder.model.embedding.weight", "decoder.model.embedding.weight"):
        if name in tensors:
            out["embedding.weight"] = tensors[name]
            break

    def layer_weights(rest: str, t: Tensor, ours: str) -> bool:
        part, _, tail = rest.partition(".")
        if part in ("attention", "memory_cross_attention"):
            proj, _, kind = tail.partition(".")
            if proj not in _ATTENTION:
                return False
            which = "self_attn" if part == "attention" else "cross_attn"
            out[f"{ours}.{which}.{_ATTENTION[proj]}.{kind}"] = t
            return True
        if part in _LAYER_NORMS:
            out[f"{ours}.{_LAYER_NORMS[part]}.{tail}"] = t
            return True
        if part == "ff":
            return ffn_weights(tail, t, f"{ours}.ffn")
        return False

    def glu(tail: str, t: Tensor, ours: str) -> bool:
        """A GatedFeedForward (``fc1.linear.*``, ``fc2.*``) or a FeedForward (``fc1.*``, ``fc2.*``)."""
        if tail.startswith("fc1.linear."):
            out[f"{ours}.w_in.{tail.rsplit('.', 1)[1]}"] = _swap_halves(t)
            return True
        if tail.startswith("fc1."):
            out[f"{ours}.w_in.{tail.rsplit('.', 1)[1]}"] = t
            return True
        if tail.startswith("fc2."):
            out[f"{ours}.w_out.{tail.rsplit('.', 1)[1]}"] = t
            return True
        return False

    def ffn_weights(tail: str, t: Tensor, ours: str) -> bool:
        if tail == "router.gate.weight":
            out[f"{ours}.router.weight"] = t
            return True
        m = re.fullmatch(r"experts\.(\d+)\.(.+)", tail)
        if m:
            experts.setdefault((ours, int(m.group(1))), {})[m.group(2)] = t
            return True
        if tail == "w1":  # (E, dim, 2H) input-major, [linear; gate] (or (E, dim, H) not gated)
            w = t.transpose(1, 2)
            out[f"{ours}.w_in"] = _swap_halves(w, dim=1) if gated else w.contiguous()
            return True
        if tail == "w2":  # (E, H, dim)
            out[f"{ours}.w_out"] = t.transpose(1, 2).contiguous()
            return True
        if tail == "b1":
            out[f"{ours}.b_in"] = _swap_halves(t, dim=1) if gated else t
            return True
        if tail == "b2":
            out[f"{ours}.b_out"] = t
            return True
        if tail == "global_bias":
            out[f"{ours}.global_bias"] = t
            return True
        if tail.startswith("shared_expert."):
            return glu(tail.removeprefix("shared_expert."), t, f"{ours}.shared_experts.0")
        m = re.fullmatch(r"shared_experts\.(\d+)\.(.+)", tail)
        if m:
            return glu(m.group(2), t, f"{ours}.shared_experts.{m.group(1)}")
        if tail in ("shared_w1", "shared_w2", "shared_b1", "shared_b2"):
            for s in range(t.shape[0]):
                base = f"{ours}.shared_experts.{s}"
                if tail == "shared_w1":
                    out[f"{base}.w_in.weight"] = _swap_halves(t[s].t()) if gated else t[s].t().contiguous()
                elif tail == "shared_w2":
                    out[f"{base}.w_out.weight"] = t[s].t().contiguous()
                elif tail == "shared_b1":
                    out[f"{base}.w_in.bias"] = _swap_halves(t[s]) if gated else t[s]
                else:
                    out[f"{base}.w_out.bias"] = t[s]
            return True
        if tail == "shared_expert_gate.weight":
            out[f"{ours}.shared_gate.weight"] = t
            return True
        if tail == "shared_experts_bias":
            out[f"{ours}.shared_bias"] = t
            return True
        return glu(tail, t, ours)

    def gate_weights(rest: str, t: Tensor, ours: str) -> bool:
        if rest == "gate":
            out[f"{ours}.weight"] = t
        elif rest.startswith("gate."):
            out[f"{ours}.linear.{rest.removeprefix('gate.')}"] = t
        elif rest.startswith("slot_status."):
            out[f"{ours}.status.{rest.removeprefix('slot_status.')}"] = t
        else:
            return False
        return True

    vectorized = any(re.search(r"\.ff\.w1$", n) for n in tensors)
    if consume and not isinstance(tensors, dict):
        raise TypeError("consume=True needs a dict of tensors")
    for name in list(tensors):
        t = tensors.pop(name) if consume else tensors[name]  # type: ignore[attr-defined]
        if _ignored(name) or name.endswith("embedding.weight"):
            continue
        ok = False
        m = re.fullmatch(r"decoder\.model\.(stateless_layers|layers|final_stateless_layers)\.(\d+)\.(.+)", name)
        if m:
            index = (
                int(m.group(2))
                + {
                    "stateless_layers": 0,
                    "layers": n_before,
                    "final_stateless_layers": n_before + config.num_layers,
                }[m.group(1)]
            )
            rest = m.group(3)
            if vectorized and re.match(r"ff\.experts\.", rest):
                continue  # legacy copies kept beside the stacked experts RxLM computes with
            if m.group(1) != "layers" and rest.startswith("norm2."):
                rest = "norm3." + rest.removeprefix("norm2.")  # 0.2's stateless layers: norm2 is the ffn norm
            ok = layer_weights(rest, t, f"decoder.layers.{index}")
        elif name.startswith("decoder.model.head."):
            out[f"decoder.lm_head.{name.rsplit('.', 1)[1]}"] = t
            ok = True
        elif name.startswith("decoder.model.head_norm."):
            out[f"decoder.norm.{name.rsplit('.', 1)[1]}"] = t
            ok = True
        elif (m := re.fullmatch(r"encoder\.model\.layers\.(\d+)\.(.+)", name)) is not None:
            if (
                m.group(2).startswith(("memory_cross_attention.", "norm2.", "stm_norm."))
                and not config.encoder.memory_cross_attention
            ):
                continue  # RxLM 0.3's encoder never runs its memory cross-attention
            ok = layer_weights(m.group(2), t, f"encoder.layers.{m.group(1)}")
        elif name == "encoder.model.stm.memory":
            if config.encoder.memory_cross_attention:
                out["encoder.fixed_memory"] = t[:, 0] if t.dim() == 4 else t
            continue
        elif (m := re.fullmatch(r"memory_attention\.model\.(\w+)\.(\d+)\.(.+)", name)) is not None:
            module, number, rest = m.groups()
            ours = _MEMORY_MODULES.get(module)
            if ours is not None:
                base = f"memory_attention.{ours}.{number}"
                if "gate" in module:
                    ok = gate_weights(rest, t, base)
                elif "attention" in module:
                    proj, _, kind = rest.partition(".")
                    if proj in _ATTENTION:
                        out[f"{base}.{_ATTENTION[proj]}.{kind}"] = t
                        ok = True
                else:
                    out[f"{base}.{rest}"] = t
                    ok = True
        elif name.startswith("memory_attention.model.mean_stm_norm."):
            out[f"memory_attention.mean_norm.{name.removeprefix('memory_attention.model.mean_stm_norm.')}"] = t
            ok = True
        if not ok:
            unknown.append(name)

    for (ours, e), parts in sorted(experts.items()):
        for key, t in parts.items():
            slot = {"fc1.linear.weight": "w_in", "fc1.linear.bias": "b_in", "fc1.weight": "w_in", "fc1.bias": "b_in",
                    "fc2.weight": "w_out", "fc2.bias": "b_out"}  # fmt: skip
            if key not in slot:
                unknown.append(f"{ours}.experts.{e}.{key}")
                continue
            out.setdefault(f"{ours}.{slot[key]}#{e}", _swap_halves(t) if key.startswith("fc1.linear") else t)
    stacked: dict[str, list[tuple[int, Tensor]]] = {}
    for key in [k for k in out if "#" in k]:
        base, expert = key.split("#")
        stacked.setdefault(base, []).append((int(expert), out.pop(key)))
    for base, items in stacked.items():
        items.sort(key=lambda it: it[0])
        if [e for e, _ in items] != list(range(len(items))):
            unknown.append(f"{base} (experts {[e for e, _ in items]} are not 0..n-1)")
            continue
        out[base] = torch.stack([t for _, t in items])
    return out, unknown
