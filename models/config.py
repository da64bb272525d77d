"""Configuration of an RxT model: every architecture choice is a named field with a default.

A model is three components that share one embedding and one Short-Term Memory (STM):

* the generator-decoder (causal self-attention, memory cross-attention, MoE feed-forward),
* the memory encoder (bidirectional self-attention, optional memory cross-attention, dense
  SwiGLU feed-forward),
* the memory attention network that writes the STM (one of four variants, with residual gates).

Sparse Query Attention (SQA) and its relatives are not separate classes: they are settings of
the head counts. With a head split of ``num_heads`` (``head_dim = dim // num_heads``):

* MHA: ``q_heads == kv_heads == num_heads``
* GQA: ``q_heads == num_heads > kv_heads > 1``;  MQA: ``kv_heads == 1``
* SQA: ``q_heads < num_heads`` (the output projection reads ``q_heads * head_dim`` features)
* symmetric SQA (sSQA): ``q_heads == kv_heads == num_heads // 2``
* reversed SQA (RxLM): ``q_heads < kv_heads``, the query heads tiled over the key/value heads

The whole tree round-trips through ``config.json`` (``RxTConfig.save`` / ``RxTConfig.load``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

from .errors import ConfigError

MemoryAttentionVariant = Literal["simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer"]
GateType = Literal["elementwise", "linear", "static", "none"]
GateActivation = Literal["sigmoid", "tanh"]
GateSlotStatus = Literal["mean", "linear"]
RopePairing = Literal["half", "adjacent", "adjacent-split"]
FinalNorm = Literal["rms", "layer", "none"]
MemoryNormType = Literal["rmsnorm", "gated-rms", "gated-adaptive-rms", "gated-positional", "gated-layer"]
StatelessLayer = Literal["dense", "moe"]
RouterDtype = Literal["float32", "bfloat16", "float16"]
TokenizerTemplate = Literal["rxt", "rxlm", "rxlm-as-written"]
FfnActivation = Literal["silu", "gelu", "relu", "sigmoid", "tanh", "identity"]
InteractionTemplate = Literal["alpha", "beta", "chatml"]
ThinkingMode = Literal["fast", "extended"]
AttentionGate = Literal["none", "silu", "gelu", "relu", "sigmoid", "tanh", "identity"]

CONFIG_FORMAT = "rxruntime.rxt/1"


@dataclass
class DecoderConfig:
    """The generator-decoder: reads the query and the STM, writes the answer."""

    num_heads: int = 16
    """Head split: ``head_dim = dim // num_heads``."""
    self_q_heads: int = 8
    self_kv_heads: int = 8
    cross_q_heads: int = 8
    """Query heads of memory cross-attention (RoPE on queries only)."""
    cross_kv_heads: int = 8
    num_experts: int = 36
    experts_per_token: int = 6
    """Top-k routing: how many experts each token activates."""
    expert_ffn_dim: int = 384
    """Hidden width of each SwiGLU expert."""
    attention_bias: bool = False
    dropout: float = 0.0
    router_aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss the MoE router adds during training."""
    router_dtype: RouterDtype = "float32"
    """Precision of the MoE router's linear layer: ``float32``, or ``bfloat16``/``float16``
    computed as RxLM 0.3's ``router_amp`` does (the routing under ``torch.autocast`` to that
    dtype on the model's device: the router's product, softmax and top-k in reduced precision
    wherever autocast puts them), which changes which experts a token gets."""
    attention_output_bias: bool = False
    """A bias on the attention output projections only (RxLM: yes, with unbiased Q/K/V)."""
    use_moe: bool = True
    """False: every layer has one dense SwiGLU of width ``ffn_dim`` instead of experts."""
    ffn_dim: int = 0
    """Hidden width of the dense SwiGLU of every layer when ``use_moe`` is False."""
    dense_ffn_dim: int = 0
    """Hidden width of the ``dense`` stateless layers (RxLM 0.3 ``dense_layer_dim``)."""
    ffn_bias: bool = False
    """Biases in the SwiGLU (expert) projections (RxLM: yes, in experts and dense layers)."""
    attention_gate: AttentionGate = "none"
    """Gated self-attention (RxLM 0.3 ``use_gated_attention``): the heads' output times
    ``act(x W_gate)`` before the output projection; ``none`` or the activation."""
    cross_attention_gate: AttentionGate = "none"
    ffn_activation: FfnActivation = "silu"
    ffn_gated: bool = True
    """Gated (``act(x W_gate) * x W_up``, SwiGLU with SiLU) or plain (``act(x W_in)``) feed-forward
    layers and experts."""
    num_shared_experts: int = 0
    """Experts every token runs besides the routed ones (RxLM 0.3); several are mixed by a
    softmax gate over them."""
    shared_expert_ffn_dim: int = 0
    """Hidden width of each shared expert; 0 means ``expert_ffn_dim``."""
    shared_experts_scaled: bool = False
    """Scale routed outputs by ``k / (k + shared)`` and shared ones by ``shared / (k + shared)``
    (RxLM's ``moe_use_weighted_shared_experts``)."""
    expert_bias_mode: Literal["local", "global", "none"] = "none"
    """Routed expert biases: on each expert's two projections (``local``: RxLM 0.2 and legacy
    layouts), one output bias per layer added once per token (``global``: RxLM 0.3's default),
    or none."""
    shared_expert_bias_mode: Literal["local", "global", "none"] = "none"
    final_norm: FinalNorm = "rms"
    """The norm before the LM head: RMSNorm (ours), LayerNorm (RxLM ``use_head_norm``) or none."""
    lm_head_bias: bool = False
    layers_before: list[str] = field(default_factory=list)
    """Stateless layers (no memory cross-attention) before the memory layers, each ``dense`` or
    ``moe`` (RxLM 0.3 ``stateless_layers_config``)."""
    layers_after: list[str] = field(default_factory=list)
    """Stateless layers after the memory layers (RxLM 0.3 ``final_stateless_layers_config``)."""
    step_position_offset: int = 0
    """Added to the RoPE position of every token fed one at a time after the prompt. RxLM's
    ``interact`` rotates the token at index ``n`` by ``n + 1`` (it passes the sequence length
    including that token); 1 reproduces it exactly, 0 is the plain position."""


@dataclass
class EncoderConfig:
    """The memory encoder: turns ``concat(query, answer)`` into Encoded Data, one tensor a layer."""

    num_heads: int = 16
    self_q_heads: int = 8
    self_kv_heads: int = 8
    memory_cross_attention: bool = False
    """Whether the encoder reads STM(t-1) while encoding (the paper draft: yes; RxT-Alpha: no)."""
    cross_q_heads: int = 8
    cross_kv_heads: int = 8
    ffn_dim: int = 784
    """Hidden width of the dense SwiGLU feed-forward."""
    attention_bias: bool = False
    dropout: float = 0.0
    attention_output_bias: bool = False
    ffn_bias: bool = False
    ffn_activation: FfnActivation = "silu"
    ffn_gated: bool = True
    attention_gate: AttentionGate = "none"
    causal: bool = False
    """Encode with a causal mask instead of bidirectionally: an encoder made of a frozen causal
    language model's blocks then computes exactly the hidden states those blocks were trained to
    produce (``backbone_gguf``'s ``memory_read: copy`` relies on it)."""
    memory_source: Literal["stm", "fixed"] = "stm"
    """What the encoder's memory cross-attention reads: the conversation's STM(t-1), or a fixed
    memory stored with the weights (``fixed_memory``: RxLM 0.2's encoder keeps its own STM buffer,
    which the conversation never changes)."""


@dataclass
class MemoryAttentionConfig:
    """The network that writes STM(t) from STM(t-1) and the Encoded Data ED(t)."""

    variant: MemoryAttentionVariant = "self-interlayer"
    num_heads: int = 16
    q_heads: int = 8
    kv_heads: int = 8
    gate_type: GateType = "linear"
    """``elementwise``: G = sigmoid(W * (STM + U));  ``linear``: G = sigmoid(W (STM + U) + b)."""
    gate_per_slot: bool = True
    """One gate value per memory slot (from the slot's mean over ``dim``) instead of per element."""
    gate_init: float = 0.0
    """Initial bias (linear) or weight (elementwise) of every gate; 0 starts gates at 0.5."""
    rope_on_keys: bool = True
    """Rotate the Encoded Data keys in memory attention (the STM queries are never rotated)."""
    attention_bias: bool = False
    attention_output_bias: bool = False
    pre_q_heads: int | None = None
    """Query heads of the attention among memory slots (self/interlayer); None: ``q_heads``."""
    pre_kv_heads: int | None = None
    gate_activation: GateActivation = "sigmoid"
    """``sigmoid``: ``(1-G) old + G new``; ``tanh`` (RxLM's default): ``(1-G) old + (1+G) new``."""
    gate_per_layer: bool = False
    """One gate value per layer and conversation (RxLM's gates when not per slot): ``linear``
    maps the slot statuses (slots -> 1), ``elementwise``/``static`` use one scalar weight."""
    gate_slot_status: GateSlotStatus = "mean"
    """A slot's status for its gate: the mean over ``dim``, or a learned (dim -> 1) projection."""
    memory_norm: MemoryNormType = "rmsnorm"
    """The norms on memory slots: RMSNorm, or RxLM's gated norms (``rms``, ``adaptive``,
    ``positional``, ``layer``), which blend the normalised and raw slots by a learned gate."""
    memory_norm_per_dim_scale: bool = False
    """``gated-positional`` only: scale per feature instead of per slot."""
    num_groups: int = 1
    """``grouped-self-interlayer``: layers are split into this many consecutive groups, and each
    layer mixes with the mean of its own group instead of all layers."""


@dataclass
class SpecialTokens:
    """Ids of the tokens of the message template ``[BOS] [Q] query [A] answer [EOS]``."""

    pad_id: int = 0
    unk_id: int | None = 1
    bos_id: int = 2
    eos_id: int = 3
    query_id: int = 4
    answer_id: int = 5
    think_id: int | None = 6
    internal_id: int | None = None
    """``[I]``, which opens RxT-Beta's system prompt (``interaction_template: beta``)."""


@dataclass
class RxTConfig:
    """The whole Reactive Transformer. Defaults are the RxT-Alpha (Supervised) card's."""

    vocab_size: int = 20000
    dim: int = 256
    num_layers: int = 12
    """Layers of the decoder and of the encoder; the STM has one layer per component layer."""
    stm_size: int = 256
    """Memory slots per STM layer."""
    max_seq_len: int = 256
    """Longest interaction (query + answer, with template tokens)."""
    rope_base: float = 10000.0
    norm_eps: float | None = 1e-6
    """RMSNorm epsilon; None is torch's default (the dtype's machine epsilon), as RxLM uses."""
    layer_norm: bool = False
    """LayerNorm instead of RMSNorm in the decoder's and encoder's blocks (RxLM
    ``use_rms_norm=False``); memory attention's norms are set by ``memory_attention.memory_norm``."""
    rope_pairing: RopePairing = "half"
    """Which features RoPE rotates together: ``half`` pairs ``i`` with ``i + d/2`` (ours);
    ``adjacent`` pairs ``2i`` with ``2i+1`` in place (RxLM 0.3); ``adjacent-split`` pairs them
    too but writes the results as [all firsts | all seconds] (RxLM 0.2), which changes the
    function wherever only queries or only keys are rotated."""
    stm_init_std: float = 0.02
    """Standard deviation of the random normal initial STM."""
    tokenizer_template: TokenizerTemplate = "rxt"
    """How the tokenizer is read: ``rxt``: our special tokens at ids 0..6; ``rxlm``: the ids in
    ``special_tokens``, text tokenised as RxLM's transformers wrapper does (the template tokens and
    the query as one string) under transformers 4 (RxLM up to 0.3.80), which turns the byte-level
    prefix space off; ``rxlm-as-written``: the same under transformers 5 (RxLM 0.3.81 on), which
    keeps the pre-tokenizer as ``tokenizer.json`` writes it (RxLM's trainer: prefix space on)."""
    interaction_template: InteractionTemplate = "alpha"
    """The token sequences of a turn and of a system text. ``alpha``: the decoder is prompted
    with ``[BOS] [Q] query [A]`` and a system text enters memory as the interaction
    ``[BOS] [Q] text [A] [EOS]``. ``beta`` (RxLM 0.3's ``RxTBeta``): the prompt ends with the
    turn's thinking mode token instead (``[A]`` for ``fast``, ``[T]`` for ``extended``: the
    model thinks, then answers after an ``[A]`` it writes itself), and a system text enters
    memory as ``[BOS] [I] {system_prompt_title}\n\n text [EOS]``. ``chatml`` (chat models built
    on a pretrained backbone, ``backbone_gguf.py``): the prompt is
    ``<|im_start|>user\n query <|im_end|>\n<|im_start|>assistant\n`` (after ``chat_system``'s
    message, if any), the answer ends with ``<|im_end|>`` ([EOS]), and a system text enters memory
    as a ``system`` message. The memory update reads the prompt and the answer as generated in all
    three."""
    system_prompt_title: str = "SYSTEM INSTRUCTIONS"
    """The heading of a system text under the ``beta`` template (RxTBeta's ``system_prompt_title``)."""
    chat_system: str | None = None
    """``chatml`` only: a system message put before every turn's user message, as a chat model's
    own template does when a chat has none (SmolLM2-Instruct's), or None for no system message.
    It is part of the prompt, so the memory update reads it too."""
    rxlm_version: str = ""
    """The RxLM release whose numbers this config reproduces (``0.2``, ``0.3.80``, ``0.3.93``...;
    ``""`` for our own models). Informative: the fields that differ between releases (such as
    ``decoder.step_position_offset``) are set by the RxLM loader and computed from themselves."""
    eos_after_truncated_answer: bool = True
    """Whether the memory update reads an ``[EOS]`` after an answer the length limit cut off
    (ours: yes, every interaction is closed; RxLM: no, it encodes exactly the sampled tokens)."""
    answer_tokens: int | None = None
    """The cap on an answer's generated tokens when a turn sets no ``max_new_tokens`` (None: what
    fits in ``max_seq_len``). Serving only: a model whose memory was trained on short answers
    recalls better when its answers stay short (the default model: 64, docs/default-model.md)."""
    presence_penalty: float = 0.0
    """The presence penalty of turns that set none (OpenAI's meaning, in [-2, 2]). Serving only, like
    ``answer_tokens``: a small greedy model loops one sentence without it (the default model: 0.5)."""
    frequency_penalty: float = 0.0
    """The frequency penalty of turns that set none (in [-2, 2]; the default model: 0.5)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field that makes the model impossible."""
        for name in ("vocab_size", "dim", "num_layers", "stm_size", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.answer_tokens is not None:
            _positive("answer_tokens", self.answer_tokens)
        for name in SAMPLING_DEFAULTS:
            check_penalty(name, getattr(self, name))
        if self.rope_base <= 1.0:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base}")
        if self.norm_eps is not None and self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0 or null (torch's default), got {self.norm_eps}")
        _choice("rope_pairing", self.rope_pairing, RopePairing)
        _choice("tokenizer_template", self.tokenizer_template, TokenizerTemplate)
        _choice("interaction_template", self.interaction_template, InteractionTemplate)
        if self.interaction_template == "beta":
            for token in ("think_id", "internal_id"):
                if getattr(self.special_tokens, token) is None:
                    raise ConfigError(f"interaction_template='beta' needs special_tokens.{token} (its [T]/[I] token)")
        if self.chat_system is not None and not isinstance(self.chat_system, str):
            raise ConfigError(f"chat_system must be a string or null, got {type(self.chat_system).__name__}")
        if not isinstance(self.system_prompt_title, str):
            raise ConfigError(f"system_prompt_title must be a string, got {type(self.system_prompt_title).__name__}")
        if self.stm_init_std < 0:
            raise ConfigError(f"stm_init_std must be >= 0, got {self.stm_init_std}")
        d, e, m = self.decoder, self.encoder, self.memory_attention
        _heads("decoder.self", self.dim, d.num_heads, d.self_q_heads, d.self_kv_heads)
        _heads("decoder.cross", self.dim, d.num_heads, d.cross_q_heads, d.cross_kv_heads)
        _heads("encoder.self", self.dim, e.num_heads, e.self_q_heads, e.self_kv_heads)
        if e.memory_cross_attention:
            _heads("encoder.cross", self.dim, e.num_heads, e.cross_q_heads, e.cross_kv_heads)
        _heads("memory_attention", self.dim, m.num_heads, m.q_heads, m.kv_heads)
        _positive("decoder.num_experts", d.num_experts)
        _positive("decoder.expert_ffn_dim", d.expert_ffn_dim)
        _positive("encoder.ffn_dim", e.ffn_dim)
        if not d.use_moe:
            _positive("decoder.ffn_dim", d.ffn_dim)
        if "dense" in d.layers_before or "dense" in d.layers_after:
            _positive("decoder.dense_ffn_dim", d.dense_ffn_dim)
        for name, kinds in (("decoder.layers_before", d.layers_before), ("decoder.layers_after", d.layers_after)):
            for kind in kinds:
                if kind not in get_args(StatelessLayer):
                    raise ConfigError(f"{name} entries must be one of {get_args(StatelessLayer)}, got {kind!r}")
        if d.num_shared_experts < 0 or d.shared_expert_ffn_dim < 0:
            raise ConfigError("decoder.num_shared_experts and decoder.shared_expert_ffn_dim must be >= 0")
        _choice("decoder.expert_bias_mode", d.expert_bias_mode, Literal["local", "global", "none"])
        _choice("decoder.shared_expert_bias_mode", d.shared_expert_bias_mode, Literal["local", "global", "none"])
        _choice("decoder.final_norm", d.final_norm, FinalNorm)
        _choice("decoder.router_dtype", d.router_dtype, RouterDtype)
        if not isinstance(self.rxlm_version, str):
            raise ConfigError(f"rxlm_version must be a string, got {type(self.rxlm_version).__name__}")
        if d.step_position_offset < 0:
            raise ConfigError(f"decoder.step_position_offset must be >= 0, got {d.step_position_offset}")
        _choice("encoder.memory_source", e.memory_source, Literal["stm", "fixed"])
        _choice("decoder.ffn_activation", d.ffn_activation, FfnActivation)
        _choice("decoder.attention_gate", d.attention_gate, AttentionGate)
        _choice("decoder.cross_attention_gate", d.cross_attention_gate, AttentionGate)
        _choice("encoder.attention_gate", e.attention_gate, AttentionGate)
        _choice("encoder.ffn_activation", e.ffn_activation, FfnActivation)
        if m.pre_q_heads is not None or m.pre_kv_heads is not None:
            _heads(
                "memory_attention.pre",
                self.dim,
                m.num_heads,
                m.pre_q_heads or m.q_heads,
                m.pre_kv_heads or m.kv_heads,
            )
        _choice("memory_attention.gate_activation", m.gate_activation, GateActivation)
        _choice("memory_attention.gate_slot_status", m.gate_slot_status, GateSlotStatus)
        _choice("memory_attention.memory_norm", m.memory_norm, MemoryNormType)
        if m.gate_per_layer and m.gate_per_slot:
            raise ConfigError("memory_attention.gate_per_layer and gate_per_slot exclude each other")
        if m.gate_slot_status == "linear" and m.gate_type == "elementwise" and not m.gate_per_slot:
            raise ConfigError("memory_attention.gate_slot_status='linear' needs a linear or per-slot gate")
        _positive("memory_attention.num_groups", m.num_groups)
        if self.num_layers % m.num_groups:
            raise ConfigError(f"memory_attention.num_groups={m.num_groups} must divide num_layers={self.num_layers}")
        if not 1 <= d.experts_per_token <= d.num_experts:
            raise ConfigError(
                f"decoder.experts_per_token must be in [1, num_experts={d.num_experts}], got {d.experts_per_token}"
            )
        if m.variant not in get_args(MemoryAttentionVariant):
            raise ConfigError(
                f"memory_attention.variant must be one of {get_args(MemoryAttentionVariant)}, got {m.variant!r}"
            )
        if m.gate_type not in get_args(GateType):
            raise ConfigError(f"memory_attention.gate_type must be one of {get_args(GateType)}, got {m.gate_type!r}")
        for name, dropout in (("decoder.dropout", d.dropout), ("encoder.dropout", e.dropout)):
            if not 0.0 <= dropout < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {dropout}")
        ids = {k: v for k, v in dataclasses.asdict(self.special_tokens).items() if v is not None}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"special_tokens.{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if len(set(ids.values())) != len(ids):
            raise ConfigError(f"special token ids must be distinct, got {ids}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.decoder.num_heads

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RxTConfig:
        """Build from a dict, rejecting unknown fields (a typo must not silently fall back)."""
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"unsupported config format {fmt!r}; this version reads {CONFIG_FORMAT!r}")
        nested = {
            "decoder": DecoderConfig,
            "encoder": EncoderConfig,
            "memory_attention": MemoryAttentionConfig,
            "special_tokens": SpecialTokens,
        }
        kwargs: dict[str, Any] = {}
        for key, value in _checked_fields(cls, data, "").items():
            if key in nested:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} must be an object, got {type(value).__name__}")
                kwargs[key] = nested[key](**_checked_fields(nested[key], value, f"{key}."))
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> RxTConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def replace(self, **changes: Any) -> RxTConfig:
        """A copy with top-level fields changed (nested configs are replaced whole)."""
        return dataclasses.replace(self, **changes)


_T = TypeVar("_T")


PENALTY_LIMIT = 2.0
"""Presence and frequency penalties lie in [-PENALTY_LIMIT, PENALTY_LIMIT] (OpenAI's range)."""


def check_penalty(name: str, value: float) -> None:
    """ConfigError naming ``name`` unless ``value`` is a penalty in range."""
    if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
        raise ConfigError(f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 is off), got {value}")


SAMPLING_DEFAULTS = ("presence_penalty", "frequency_penalty")
"""``RxTConfig`` fields that set serving's default sampling: not the model, so no fingerprint (of
snapshots, of recipes) hashes them. (``answer_tokens`` predates this and stays hashed: snapshots and
runs made with it must keep their fingerprints.)"""


def non_default_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass's fields that differ from their defaults, nested dataclasses recursively, less
    the fields named in ``skip`` at any depth: what a fingerprint hashes, so that a release adding a
    field (whose default keeps the old behaviour) does not change the fingerprint of anything made
    before it (fingerprints skip :data:`SAMPLING_DEFAULTS`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = non_default_fields(value, skip)
            if nested:
                out[f.name] = nested
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _checked_fields(cls: type[_T], data: dict[str, Any], prefix: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + u for u in unknown)
        raise ConfigError(f"unknown config field(s): {names}; known: {', '.join(sorted(known))}")
    return data


def _choice(name: str, value: object, allowed: Any) -> None:
    if value not in get_args(allowed):
        raise ConfigError(f"{name} must be one of {get_args(allowed)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _heads(name: str, dim: int, num_heads: int, q_heads: int, kv_heads: int) -> None:
    _positive(f"{name} num_heads", num_heads)
    _positive(f"{name} q_heads", q_heads)
    _positive(f"{name} kv_heads", kv_heads)
    if dim % num_heads:
        raise ConfigError(f"{name}: dim={dim} is not divisible by num_heads={num_heads}")
    if q_heads > num_heads or kv_heads > num_heads:
        raise ConfigError(f"{name}: q_heads={q_heads} and kv_heads={kv_heads} must not exceed num_heads={num_heads}")
    if q_heads % kv_heads and kv_heads % q_heads:
        raise ConfigError(
            f"{name}: q_heads={q_heads} must be a multiple of kv_heads={kv_heads} "
            "(each key/value head serves a whole group of query heads), or divide it (reversed SQA)"
        )


# ---------------------------------------------------------------------- presets
def _alpha_mini() -> RxTConfig:
    # RxT-Alpha (Supervised) card: dim 256, 12 layers, 16-head split, symmetric SQA 8/8
    # everywhere, decoder MoE 36 experts / 6 active / SwiGLU 384, encoder SwiGLU 784 without
    # memory cross-attention, gated self/interlayer memory attention with linear per-slot gates.
    return RxTConfig()


def _micro() -> RxTConfig:
    # RxT-Alpha Micro decoder card: dim 128, 6 layers, 8-head split, self-attention sSQA 4/4,
    # memory cross-attention SQA 4 query / 2 key-value heads, MoE 12 experts / 2 active /
    # SwiGLU 256, 5k vocabulary, 256-token messages, 256 STM slots per layer. The card has no
    # encoder or memory attention; ours mirror the decoder's attention at the same scale.
    return RxTConfig(
        vocab_size=5000,
        dim=128,
        num_layers=6,
        stm_size=256,
        max_seq_len=256,
        decoder=DecoderConfig(
            num_heads=8,
            self_q_heads=4,
            self_kv_heads=4,
            cross_q_heads=4,
            cross_kv_heads=2,
            num_experts=12,
            experts_per_token=2,
            expert_ffn_dim=256,
        ),
        encoder=EncoderConfig(num_heads=8, self_q_heads=4, self_kv_heads=4, ffn_dim=384),
        memory_attention=MemoryAttentionConfig(num_heads=8, q_heads=4, kv_heads=4),
    )


def _nano() -> RxTConfig:
    # The small model (`small`, the default until issue 24): small enough that the whole
    # supervised curriculum runs on two CPU cores in minutes and the weights ship inside the
    # package (see docs/small-model.md).
    return RxTConfig(
        vocab_size=1024,
        dim=128,
        num_layers=4,
        stm_size=32,
        max_seq_len=128,
        decoder=DecoderConfig(
            num_heads=8,
            self_q_heads=4,
            self_kv_heads=4,
            cross_q_heads=4,
            cross_kv_heads=4,
            num_experts=4,
            experts_per_token=2,
            expert_ffn_dim=256,
        ),
        encoder=EncoderConfig(num_heads=8, self_q_heads=4, self_kv_heads=4, ffn_dim=256),
        # The simple variant with a per-element linear gate: slots stay distinct (no slot-to-slot
        # mixing before the write) and each feature decides from its content whether to keep or
        # overwrite, which is what lets a fact survive the turns after it (docs/small-model.md).
        memory_attention=MemoryAttentionConfig(
            variant="simple", num_heads=8, q_heads=4, kv_heads=4, gate_type="linear", gate_per_slot=False
        ),
    )


PRESETS = {"alpha-mini": _alpha_mini, "micro": _micro, "nano": _nano}


def preset(name: str) -> RxTConfig:
    """A fresh config for a named preset (``alpha-mini``, ``micro``, ``nano``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
