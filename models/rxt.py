"""The Reactive Transformer: decoder, encoder and memory attention around one Short-Term Memory.

One interaction (turn ``t``) runs in two phases::

    answer  = Decoder(query, STM(t-1))                 # synchronous: what the user waits for
    ED(t)   = Encoder([BOS][Q] query [A] answer [EOS])  # asynchronous: the memory update
    STM(t)  = MemoryAttention(STM(t-1), ED(t))

The STM is a tensor (B, L, S, D): for each of ``B`` conversations, ``L`` layers (one per
component layer) of ``S`` slots. Every method takes a batch of conversations, each with its
own STM; nothing in the model keeps conversation state between calls. The token embedding is
shared by decoder and encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .attention import sdpa
from .cache import KVCache
from .config import RxTConfig
from .decoder import MemoryKV, RxTDecoder
from .encoder import RxTEncoder
from .errors import TokenizerError
from .gates import ResidualGate
from .memory_attention import MemoryAttention
from .moe import MoE
from .quantize import WeightFormat
from .rope import RotaryEmbedding


class RxTModel(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # Built under torch.device("meta") to have weights loaded into it: no init draws (torch's
        # meta normal_ is a Python path that also imports torch._dynamo: seconds of a start).
        meta = torch.empty(0).is_meta
        blank = torch.empty(config.vocab_size, config.dim) if meta else None
        self.embedding = nn.Embedding(config.vocab_size, config.dim, _weight=blank)
        self.decoder = RxTDecoder(config)
        self.encoder = RxTEncoder(config)
        self.memory_attention = MemoryAttention(config)
        self._rope_signs: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._compiled_kernel: Callable[..., Tensor] | None = None
        self.fast_decode = True
        """Eval-mode ``decode_step`` takes the fused path; False runs the decoder's modules (the
        reference the fused path is tested against, and the "before" of the benchmarks)."""
        self.native_decode = True
        """Eval-mode float32 CPU steps of a few rows run the C step of :mod:`.native` when it
        builds here (same function, all cores streaming the weights); False keeps them in torch."""
        self.weight_format: WeightFormat = "fp32"
        """How the C step stores the matrices it reads ("fp32", "bf16", "int8"); set it with
        :func:`.weight_format.set_weight_format`, which also rounds the float32 weights to match."""
        self.backbone_values: Callable[[], dict[str, Tensor]] | None = None
        """A compact model's pretrained backbone as its GGUF dequantizes (float32, under the
        state-dict names), before the rounding to the dtype the model stored it in: int8 weights
        take these exact values back (a Q4_1 matrix is then read in 4 bits). Set by the loader."""
        if not meta:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases; residual outputs scaled by 1/sqrt(2L) (GPT-2)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, ResidualGate):
                continue
            if isinstance(module, nn.Linear):
                out = name.endswith("o_proj") or name.endswith("w_out")
                nn.init.normal_(module.weight, std=residual_std if out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=residual_std)
        for module in self.modules():
            if isinstance(module, ResidualGate) and module.linear is not None:
                nn.init.normal_(module.linear.weight, std=std)
                nn.init.constant_(module.linear.bias, self.config.memory_attention.gate_init)
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module._reset_tables()

    # ------------------------------------------------------------------ introspection
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component; the shared embedding counts in both decoder and encoder."""

        def count(module: nn.Module) -> int:  # released expert tables (models.native.prepare) by their shape
            released = sum(m.released_numel() for m in module.modules() if isinstance(m, MoE))
            return sum(p.numel() for p in module.parameters()) + released

        emb = count(self.embedding)
        return {
            "decoder": count(self.decoder) + emb,
            "encoder": count(self.encoder) + emb,
            "memory_attention": count(self.memory_attention),
            "total": count(self),
        }

    def active_parameter_count(self) -> int:
        """Decoder parameters used per generated token: all but the unchosen experts, one
        embedding row."""
        moes = [m for m in self.decoder.modules() if isinstance(m, MoE)]
        all_experts = sum(m.w_in.numel() + m.w_out.numel() for m in moes)  # (0 where released)
        active_experts = sum(m.expert_numel() * m.top_k for m in moes)
        dense = sum(p.numel() for p in self.decoder.parameters()) - all_experts
        return dense + active_experts + self.config.dim

    # ------------------------------------------------------------------ STM
    def init_stm(self, batch_size: int, generator: torch.Generator | None = None, std: float | None = None) -> Tensor:
        """A random normal initial STM (B, L, S, D) with ``config.stm_init_std``."""
        c = self.config
        shape = (batch_size, c.num_layers, c.stm_size, c.dim)
        stm = torch.randn(shape, generator=generator, device=generator.device if generator else self.device)
        return (stm * (c.stm_init_std if std is None else std)).to(self.device, self.dtype)

    def init_stm_from_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """An STM that has already 'read' a text (a system prompt): one memory update from random."""
        stm = self.init_stm(input_ids.shape[0], generator)
        return self.memory_update(stm, input_ids, attention_mask)

    # ------------------------------------------------------------------ decoder
    def check_ids(self, input_ids: Tensor) -> None:
        """Raise ``TokenizerError`` for ids outside the vocabulary (an embedding lookup would crash)."""
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise TokenizerError(
                f"token ids must be in [0, {self.config.vocab_size}); got min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )

    def memory_kv(self, stm: Tensor) -> MemoryKV:
        """Decoder memory cross-attention keys/values for an STM (B, L, S, D), once per turn."""
        return self.decoder.memory_kv(stm)

    def layer_memory_kv(self, m: int, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Memory layer ``m``'s entry of :meth:`memory_kv` from that layer of the STMs (B, S, D)."""
        return self.decoder.layer_memory_kv(m, memory)

    def row_memory_kv(self, stm: Tensor) -> MemoryKV:
        """:meth:`memory_kv` of one conversation's STM (L, S, D) alone, each (kv_heads, slots,
        head_dim): what a join of that conversation alone computes (a batched product may round
        otherwise), in the form ``JoinRequest.memory_kv`` takes."""
        return [(k[0], v[0]) for k, v in self.decoder.memory_kv(stm[None])]

    def decoder_logits(self, input_ids: Tensor, memory: Tensor) -> Tensor:
        """Full causal forward (B, T) -> logits (B, T, V), reading ``memory`` (B, L, S, D).

        ``memory`` is the STM at inference; in joint pre-training it is the encoder's hidden states.
        Right padding needs no mask: causal attention never lets a real token see a later pad.
        """
        self.decoder.rope.ensure(input_ids.shape[1])
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.decoder(self.embedding(input_ids), positions=positions, memory_kv=self.memory_kv(memory))
        return self.decoder.lm_head(h)

    def new_cache(self, rows: int, max_len: int | None = None) -> KVCache:
        d = self.config.decoder
        return KVCache.empty(
            len(self.decoder.layers),
            rows,
            d.self_kv_heads,
            max_len or self.config.max_seq_len,
            self.config.dim // d.num_heads,
            device=self.device,
            dtype=self.dtype,
        )

    def prefill(self, input_ids: Tensor, lengths: Tensor, memory_kv: MemoryKV, cache: KVCache) -> Tensor:
        """Run right-padded prompts (B, T) with ``lengths`` (B,) into ``cache``; logits (B, V) of each
        row's last real token. For int8 and short float32 inference on a CPU the C step runs it
        (``native.prefill``), a chunk of tokens per call, with the C step's arithmetic (int8:
        activations rounded per block of 32 too); the torch path below computes the same function
        on the rounded weights, to rounding."""
        if (  # int8, or float32 and short: elsewhere torch's batched products are faster (native.py)
            self.native_decode
            and self.weight_format in ("int8", "fp32")
            and not self.training
            and not torch.is_grad_enabled()
            and self._compiled_kernel is None
            and input_ids.device.type == "cpu"
            and int(lengths.sum()) <= native.prefill_max_tokens(self)
        ):
            prompts = [row[: int(n)].tolist() for row, n in zip(input_ids, lengths)]
            logits = native.prefill(self, prompts, memory_kv, cache)
            if logits is not None:
                return logits
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.decoder(self.embedding(input_ids), positions=positions, memory_kv=memory_kv, cache=cache)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self.decoder.lm_head(last)

    def decode_step(self, tokens: Tensor, positions: Tensor, memory_kv: MemoryKV, cache: KVCache) -> Tensor:
        """One token per row (B,) at ``positions`` (B,): writes the cache, returns logits (B, V).

        In eval mode this runs the fused single-token path (:meth:`_fast_decode_step`), which
        computes the same function as the decoder's forward with far fewer tensor operations.
        """
        if self.fast_decode and not self.training:
            return self._fast_decode_step(tokens, positions, memory_kv, cache)
        h = self.decoder(
            self.embedding(tokens[:, None]), positions=positions[:, None], memory_kv=memory_kv, cache=cache, step=True
        )
        return self.decoder.lm_head(h[:, 0])

    @torch.no_grad()
    def use_decode_layout(self) -> None:
        """Lay the decoder's weights out for one-token steps; shapes and values do not change.

        Every matrix a decode step multiplies a single row by is stored input-major (as its
        ``nn.Linear`` weight's transpose), Q/K/V of self-attention side by side, and the MoE
        experts as row tables for ``embedding_bag``. A one-row product then streams contiguous
        rows: on a 2-core CPU about twice the bandwidth of the ``nn.Linear`` layout, and decoding
        is bandwidth-bound. The parameters become views, so training, ``state_dict`` and
        checkpoints see the same tensors. :class:`DecodeBatch` calls this; idempotent and cheap
        when already done.
        """
        for layer in self.decoder.blocks:
            layer.self_attn.use_decode_layout()
            if layer.cross_attn is not None:
                layer.cross_attn.use_decode_layout()
            if isinstance(layer.ffn, MoE):
                layer.ffn.use_decode_layout()
        head = self.decoder.lm_head
        if not head.weight.t().is_contiguous():
            head.weight.data = head.weight.data.t().contiguous().t()

    def _fast_decode_step(self, tokens: Tensor, positions: Tensor, memory_kv: MemoryKV, cache: KVCache) -> Tensor:
        """:meth:`decode_step` for inference: host-side checks, then :meth:`_decode_kernel`
        (compiled when :meth:`compile_decode` was called)."""
        if self.native_decode and self._compiled_kernel is None and tokens.device.type == "cpu":
            logits = native.decode_step(self, tokens, positions, memory_kv, cache)
            if logits is not None:
                return logits
        fused = [layer.self_attn.fused_qkv() for layer in self.decoder.blocks]
        if self.decoder.rope.pairing != "half":
            sign = torch.empty(0)  # the kernel rotates with RotaryEmbedding.rotation_matrices
        else:
            sign = self._rope_sign(self.decoder.rope.head_dim, self.decoder.rope.sin.device, self.dtype)
        kernel = self._compiled_kernel or RxTModel._decode_kernel
        return kernel(self, tokens, positions, memory_kv, cache, fused, sign)

    def compile_decode(self, **options: Any) -> None:
        """Opt in to ``torch.compile`` for the decode step (``options`` go to ``torch.compile``).

        Inductor fuses the norms, RoPE and residual adds into a few C++ kernels. On a CPU the
        default also asks for a C++ wrapper and autotuned matrix products (inductor's
        ``cpp_wrapper`` and ``max_autotune``): a one-token step is mostly per-operation overhead,
        which the Python wrapper would keep. It needs a C++ compiler and takes about two minutes
        for alpha-mini, once per process and batch size. On a CPU the C step of :mod:`.native`,
        the default, is faster for a few rows (docs/benchmarks.md §5); once compiled, this
        kernel runs instead of it. Results equal the eager path within float tolerance.
        """
        if "options" not in options and "mode" not in options and self.device.type == "cpu":
            options["options"] = {"cpp_wrapper": True, "max_autotune": True}
        # The plain function, not the bound method: a deep copy of the model must not call back
        # into this one.
        self._compiled_kernel = torch.compile(RxTModel._decode_kernel, **{"dynamic": False, **options})

    def _decode_kernel(
        self,
        tokens: Tensor,
        positions: Tensor,
        memory_kv: MemoryKV,
        cache: KVCache,
        fused: list[tuple[Tensor, Tensor | None] | None],
        sign: Tensor,
    ) -> Tensor:
        """The decode step's tensor work, specialised to one token per row.

        A decode step is bound by reading the weights, and on a CPU by the per-operation overhead:
        the module path dispatches about a thousand tensor operations per step. Here, once per
        step rather than per layer: the RoPE rows, the additive self-attention mask and the cache
        write index, and RoPE as a rotation matrix. Per layer: one Q/K/V product (``fused``: the
        fused weights, or None), RoPE on queries and keys as one ``bmm``, one ``scatter_`` per cache
        tensor, output projections
        fused with the residual add (``addmm``), and the MoE's gathered dispatch
        (:meth:`MoE.decode_residual`, no host sync). Hidden states stay (B, D) throughout.
        """
        dec = self.decoder
        b = tokens.shape[0]
        dtype = self.dtype
        x = F.embedding(tokens, self.embedding.weight)  # (B, D)
        rope = dec.rope
        half = rope.head_dim // 2
        rope_positions = positions + dec.step_position_offset if dec.step_position_offset else positions
        if rope.pairing != "half":
            rotation = rope.rotation_matrices(rope_positions, dtype)  # (B, hd, hd)
        else:
            cos = rope.cos[rope_positions]
            sin = rope.sin[rope_positions]
            if cos.dtype != dtype:
                cos, sin = cos.to(dtype), sin.to(dtype)
            # RoPE as one (head_dim x head_dim) matrix per row: x @ R == x * cos + rotate_half(x) * sin,
            # so rotating all heads is one bmm (R: cos on the diagonal, signed sin half a turn away).
            rotation = torch.diag_embed(cos) + torch.diag_embed(sin * sign).roll(half, dims=-2)  # (B, hd, hd)
        bias = cache.step_bias(positions, dtype)
        scatter_index = cache.step_scatter_index(positions)
        m = 0  # memory layer index: stateless layers have no memory keys/values
        for i, layer in enumerate(dec.blocks):
            attn = layer.self_attn
            hq, hkv, hd = attn.q_heads, attn.kv_heads, attn.head_dim
            norm = layer.self_norm
            h = _norm(norm, x)
            qkv_weights = fused[i]
            if qkv_weights is None:
                qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)
            elif qkv_weights[1] is None:
                qkv = torch.mm(h, qkv_weights[0])
            else:
                qkv = torch.addmm(qkv_weights[1], h, qkv_weights[0])
            qkv = qkv.view(b, hq + 2 * hkv, hd)
            qk = qkv[:, : hq + hkv]
            qk = torch.bmm(qk, rotation)  # RoPE on queries and keys at once
            k, v = cache.write_step_scatter(i, qk[:, hq:], qkv[:, hq + hkv :], scatter_index)
            q = qk[:, :hq, None]
            if attn.q_repeat > 1:  # reversed SQA: query heads tiled over the kv heads
                q = q.repeat(1, attn.q_repeat, 1, 1)
            out = sdpa(q, k, v, mask=bias).reshape(b, attn.out_heads * hd)
            if attn.gate_proj is not None and attn.gate_act is not None:  # gated attention (RxLM 0.3)
                out = out * attn.gate_act(attn.gate_proj(h))
            x = _residual_linear(x, out, attn.o_proj)
            cross = layer.cross_attn
            if cross is not None:
                norm = layer.cross_norm
                h = _norm(norm, x)
                q = F.linear(h, cross.q_proj.weight, cross.q_proj.bias).view(b, cross.q_heads, hd)
                q = torch.bmm(q, rotation)  # queries only: memory has no position
                q = q[:, :, None]
                if cross.q_repeat > 1:
                    q = q.repeat(1, cross.q_repeat, 1, 1)
                out = sdpa(q, *memory_kv[m]).reshape(b, cross.out_heads * hd)
                m += 1
                if cross.gate_proj is not None and cross.gate_act is not None:
                    out = out * cross.gate_act(cross.gate_proj(h))
                x = _residual_linear(x, out, cross.o_proj)
            norm = layer.ffn_norm
            h = _norm(norm, x)
            ffn = layer.ffn
            x = ffn.decode_residual(x, h) if isinstance(ffn, MoE) else x + ffn(h)
        if dec.norm is not None:
            x = _norm(dec.norm, x)
        return F.linear(x, dec.lm_head.weight, dec.lm_head.bias)

    def _rope_sign(self, head_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(-1, ..., -1, 1, ..., 1): ``rotate_half(x)_i = sign_i * x_{(i + d/2) mod d}``."""
        key = (head_dim, device, dtype)
        sign = self._rope_signs.get(key)
        if sign is None:
            with torch.inference_mode(False):
                sign = torch.ones(head_dim, device=device, dtype=dtype)
                sign[: head_dim // 2] = -1
            self._rope_signs[key] = sign
        return sign

    # ------------------------------------------------------------------ memory update
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, stm: Tensor | None = None) -> Tensor:
        """Interactions (B, T) -> Encoded Data (B, L, T, D). ``stm`` is read only if the encoder
        has memory cross-attention."""
        memory_kv = None
        if self.encoder.reads_memory:
            if stm is None and self.encoder.fixed_memory is None:
                raise ValueError("this model's encoder reads STM(t-1): pass stm")
            memory = stm if stm is not None else input_ids.new_zeros((input_ids.shape[0], 1), dtype=self.dtype)
            memory_kv = self.encoder.memory_kv(memory)
        mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(self.embedding(input_ids), key_mask=mask, memory_kv=memory_kv)

    def update_memory(
        self, stm: Tensor, encoded: Tensor, encoded_mask: Tensor | None = None, gates: list[Tensor] | None = None
    ) -> Tensor:
        """STM(t-1) (B, L, S, D) and ED(t) (B, L, T, D) -> STM(t). ``gates``: see ``MemoryAttention``."""
        mask = None if encoded_mask is None else encoded_mask.bool()
        return cast(Tensor, self.memory_attention(stm, encoded, mask, gates))

    def memory_update(
        self, stm: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, gates: list[Tensor] | None = None
    ) -> Tensor:
        """The whole asynchronous phase: encode the interaction, then write the STM.

        ``gates``: if given, receives each layer's gate openness (B,), for ``memory_change``."""
        encoded = self.encode(input_ids, attention_mask, stm)
        return self.update_memory(stm, encoded, attention_mask, gates)


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A block's norm on (B, D) rows: RMSNorm as one functional call (cheaper than the module's
    dispatch in a decode step), any other norm (RxLM's LayerNorm) through its module."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return cast(Tensor, norm(x))


def _residual_linear(x: Tensor, features: Tensor, proj: nn.Linear) -> Tensor:
    """``x + proj(features)`` as one ``addmm`` (the residual add fused into the product)."""
    out = torch.addmm(x, features, proj.weight.t())
    return out if proj.bias is None else out + proj.bias


def memory_change(old: Tensor, new: Tensor, gates: list[Tensor]) -> Tensor:
    """What a memory update did, per row and layer: (B, 2, L) of ‖STM_t − STM_t−1‖ / ‖STM_t−1‖
    and the gates' openness (from ``memory_update(gates=...)``; NaN where none were recorded).

    A few reductions on tensors the update already holds, left on the device (no sync)."""
    before = old.float().flatten(2)
    change = (new.float().flatten(2) - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
    gate = torch.stack(gates, dim=1) if len(gates) == change.shape[1] else torch.full_like(change, float("nan"))
    return torch.stack([change, gate.to(change.device)], dim=1)
