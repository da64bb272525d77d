"""Tokenizer helpers on Hugging Face ``tokenizers``: byte-level BPE with RxT's special tokens.

The special tokens always take the first ids, in this order: ``[PAD] [UNK] [BOS] [EOS] [Q] [A]
[T]`` (0..6), matching :class:`rxruntime.models.config.SpecialTokens`. One interaction is
``[BOS] [Q] query [A] answer [EOS]``; the decoder is prompted with ``[BOS] [Q] query [A]``.

Byte-level BPE has no unknown characters, but one character can span several tokens, so
streaming output goes through :class:`IncrementalDecoder`, which only releases text once its
bytes are complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import InteractionTemplate, RxTConfig, SpecialTokens, ThinkingMode
from .errors import TokenizerError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]"]


class RxTokenizer:
    """A ``tokenizers.Tokenizer`` plus the RxT message template."""

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens | None = None, as_written: bool = False) -> None:
        """``special``: the template's ids when the model's config names them (RxLM checkpoints
        do, in ``tokenizer_config``); otherwise the tokenizer must hold ours at ids 0..6.
        ``as_written`` (with ``special``): keep the file's byte-level prefix space, as RxLM's
        transformers 5 wrapper does (``tokenizer_template='rxlm-as-written'``)."""
        self.tokenizer = tokenizer
        self._bytes_cache: dict[int, bytes] = {}
        self._byte_alphabet: dict[str, int] | None = None  # byte-level BPE's symbol -> byte, built on first use
        self.interaction_template: InteractionTemplate = "alpha"
        self.system_prompt_title = "SYSTEM INSTRUCTIONS"
        self._chatml = _ChatML([], [], [])
        if tokenizer.decoder is None and _byte_level(tokenizer.pre_tokenizer):
            # A byte-level BPE without its decoder (as RxLM's TokenizerTrainer writes them) would
            # decode to its byte symbols ("Ġ" for a space); the byte-level decoder inverts them.
            tokenizer.decoder = decoders.ByteLevel()
        if special is None:
            ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
            if ids != list(range(len(SPECIAL_TOKENS))):
                raise TokenizerError(
                    f"the tokenizer must map {SPECIAL_TOKENS} to ids 0..{len(SPECIAL_TOKENS) - 1}, got {ids}"
                )
            self.special = SpecialTokens()
            self._special_ids = set(range(len(SPECIAL_TOKENS)))
            self._joined = False
            return
        named = {k: v for k, v in vars(special).items() if v is not None}
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        bad = {k: v for k, v in named.items() if not 0 <= v < size or tokenizer.id_to_token(v) is None}
        if bad:
            raise TokenizerError(f"the tokenizer has no tokens for the model's special ids {bad}")
        self.special = special
        self._joined = True
        # RxLM wraps its tokenizer in transformers' PreTrainedTokenizerFast, which turns the
        # byte-level pre-tokenizer's prefix space off unless told otherwise: do as it does, or
        # "[BOS][Q]Tell" would become [BOS] [Q] "ĠTell" instead of RxLM's "T" "ell".
        # transformers 5 (RxLM 0.3.81 on) keeps the file's setting.
        pre = tokenizer.pre_tokenizer
        if isinstance(pre, pre_tokenizers.ByteLevel) and pre.add_prefix_space and not as_written:
            pre.add_prefix_space = False
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = set(named.values()) | {i for i, tok in added.items() if tok.special}

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> RxTokenizer:
        """Train a byte-level BPE (stage 0 of the curriculum) on an iterable of texts."""
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path, special: SpecialTokens | None = None, as_written: bool = False) -> RxTokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)), special, as_written)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from exc
        except Exception as exc:  # the Rust side raises plain Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc})") from exc

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text; special tokens dropped unless ``skip_special=False``. Leading space trimmed."""
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False)).lstrip(" ")

    def token_text(self, token_id: int) -> str:
        """The raw piece of one token (for debugging; streaming uses IncrementalDecoder)."""
        return str(self.tokenizer.id_to_token(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its name), alone, for log-probability
        reports: byte-level BPE pieces map back through the byte alphabet, ``<0xNN>`` byte
        tokens to their byte, other pieces to their UTF-8 text (a word-start marker as a space)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary")
        piece = str(piece)
        if self._byte_alphabet is None:
            self._byte_alphabet = _unicode_to_bytes() if _byte_level(self.tokenizer.pre_tokenizer) else {}
        alphabet = self._byte_alphabet
        if token_id in self._special_ids:
            out = piece.encode()
        elif alphabet and all(c in alphabet for c in piece):
            out = bytes(alphabet[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out = bytes([int(piece[3:5], 16)])
        else:
            out = piece.replace("\u2581", " ").encode()
        self._bytes_cache[token_id] = out
        return out

    def token_piece(self, token_id: int) -> str:
        """One token's own text: :meth:`token_bytes` as UTF-8, U+FFFD for bytes of a character
        that the token only starts or ends."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ template
    def use_template(self, config: RxTConfig) -> None:
        """Take the model's message template (``interaction_template``, ``system_prompt_title``)."""
        if config.interaction_template == "beta":
            missing = [n for n in ("think_id", "internal_id") if getattr(self.special, n) is None]
            if missing:
                raise TokenizerError(f"interaction_template='beta' needs the tokenizer's {missing} tokens")
        self.interaction_template = config.interaction_template
        self.system_prompt_title = config.system_prompt_title
        if config.interaction_template == "chatml":
            self._chatml = _ChatML.build(self, config.chat_system)
            # [Q] and [A] stand for ordinary tokens here ("user", a newline): only the vocabulary's
            # own special tokens are dropped from decoded text.
            added = self.tokenizer.get_added_tokens_decoder()
            self._special_ids = {i for i, tok in added.items() if tok.special}

    def _tokens(self, *ids: int) -> str:
        return "".join(str(self.tokenizer.id_to_token(i)) for i in ids)

    def mode_id(self, thinking_mode: ThinkingMode | None = None) -> int:
        """The token that ends a prompt: ``[A]`` (``fast``, and always under ``alpha``) or
        ``[T]`` (``extended``, ``beta`` only; callers check modes: see rxruntime/options.py)."""
        if thinking_mode in (None, "fast"):
            return self.special.answer_id
        if thinking_mode == "extended" and self.interaction_template == "beta" and self.special.think_id is not None:
            return self.special.think_id
        raise TokenizerError(
            f"thinking_mode={thinking_mode!r} is not a mode of interaction_template={self.interaction_template!r}"
        )

    def prompt_ids(self, body: Sequence[int], thinking_mode: ThinkingMode | None = None) -> list[int]:
        """The decoder prompt around a query's own ids: ``[BOS] [Q] body`` and the mode token."""
        s = self.special
        if self.interaction_template == "chatml":
            self.mode_id(thinking_mode)  # chatml has the fast mode only
            return [*self._chatml.before_query, *body, *self._chatml.after_query]
        return [s.bos_id, s.query_id, *body, self.mode_id(thinking_mode)]

    def query_ids(self, query: str, thinking_mode: ThinkingMode | None = None) -> list[int]:
        """The decoder prompt ``[BOS] [Q] query [A]`` (``[T]`` for an ``extended`` beta turn).

        With an RxLM checkpoint's tokenizer the text is tokenised as RxLM does it: the template
        tokens and the text as one string (so the text gets no leading space of its own)."""
        s = self.special
        if self.interaction_template == "chatml":
            # "user\n" and the query as one string, as the chat template's text is tokenised
            self.mode_id(thinking_mode)
            c = self._chatml
            return [*c.system, s.bos_id, *self.encode("user\n" + query), *c.after_query]
        if self._joined:
            return [*self.encode(self._tokens(s.bos_id, s.query_id) + query), self.mode_id(thinking_mode)]
        return self.prompt_ids(self.encode(query), thinking_mode)

    def system_ids(self, text: str) -> list[int]:
        """What the memory reads for a system text (``memory_init``): under ``alpha`` the
        interaction ``[BOS] [Q] text [A] [EOS]``; under ``beta`` RxTBeta's system prompt
        ``[BOS] [I] {system_prompt_title}\n\n text [EOS]``, tokenised as one string."""
        if self.interaction_template == "alpha":
            return self.interaction_ids(text, "")
        if self.interaction_template == "chatml":
            return [self.special.bos_id, *self.encode("system\n" + text), self.special.eos_id]
        s = self.special
        assert s.internal_id is not None  # use_template checked it
        heading = self._tokens(s.bos_id, s.internal_id) + f"{self.system_prompt_title}\n\n"
        if self._joined:
            return self.encode(heading + text + self._tokens(s.eos_id))
        return [s.bos_id, s.internal_id, *self.encode(f"{self.system_prompt_title}\n\n{text}"), s.eos_id]

    def interaction_ids(self, query: str, answer: str) -> list[int]:
        """A whole interaction ``[BOS] [Q] query [A] answer [EOS]`` (what the encoder reads)."""
        if self.interaction_template == "chatml":
            return [*self.query_ids(query), *self.encode(answer), self.special.eos_id]
        if self._joined:
            s = self.special
            text = self._tokens(s.bos_id, s.query_id) + query + self._tokens(s.answer_id) + answer
            return [*self.encode(text + self._tokens(s.eos_id))]
        return self.interaction_from_ids(self.encode(query), self.encode(answer))

    def interaction_from_ids(self, query: Sequence[int], answer: Sequence[int]) -> list[int]:
        s = self.special
        if self.interaction_template == "chatml":
            return [*self.prompt_ids(query), *answer, s.eos_id]
        return [s.bos_id, s.query_id, *query, s.answer_id, *answer, s.eos_id]

    def answer_start(self, query: Sequence[int]) -> int:
        """Index of the first answer token in ``interaction_from_ids(query, answer)``."""
        return len(self.prompt_ids(query))

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class _ChatML:
    """The fixed token runs of a ChatML turn, tokenised once (``interaction_template: chatml``)::

    [<|im_start|>system\n{chat_system}<|im_end|>\n]  <|im_start|>user\n {query}
    <|im_end|>\n<|im_start|>assistant\n {answer} <|im_end|>
    """

    def __init__(self, system: list[int], before_query: list[int], after_query: list[int]) -> None:
        self.system = system
        self.before_query = before_query
        self.after_query = after_query

    @classmethod
    def build(cls, tok: RxTokenizer, chat_system: str | None) -> _ChatML:
        s = tok.special
        newline = tok.encode("\n")
        system = [] if chat_system is None else [s.bos_id, *tok.encode("system\n" + chat_system), s.eos_id, *newline]
        after = [s.eos_id, *newline, s.bos_id, *tok.encode("assistant\n")]
        if after[-1] != s.answer_id:
            raise TokenizerError(
                f"interaction_template='chatml': a prompt ends with token {after[-1]}, "
                f"special_tokens.answer_id is {s.answer_id}"
            )
        return cls(system, [*system, s.bos_id, *tok.encode("user\n")], after)


def _byte_level(pre: pre_tokenizers.PreTokenizer | None) -> bool:
    """Whether a pre-tokenizer maps text to byte symbols (ByteLevel, alone or in a Sequence)."""
    if pre is None:
        return False

    def walk(state: dict[str, object]) -> bool:
        inner = state.get("pretokenizers")
        nested = [walk(x) for x in inner if isinstance(x, dict)] if isinstance(inner, list) else []
        return state.get("type") == "ByteLevel" or any(nested)

    return walk(json.loads(pre.__getstate__()))


def _unicode_to_bytes() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the printable symbol each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    symbols = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = 256 + extra
            extra += 1
    return {chr(code): b for b, code in symbols.items()}


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text pieces, never splitting a character.

    Each ``push`` returns the new complete characters (possibly none while a multi-byte character
    is still incomplete: only that character is held back, never the text before it).
    Concatenating all pieces plus ``flush()`` equals ``decode(all ids)``; ``flush()`` is only ever
    non-empty when the ids stop in the middle of a character (it returns U+FFFD for those bytes).
    Only a short window of recent ids is decoded per push, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: RxTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids up to here have been turned into emitted text
        self._ahead = 0  # characters emitted beyond ids[prefix:read] (complete text before a held character)
        self._started = False

    def _text(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i not in self._tok._special_ids]
        return str(self._tok.tokenizer.decode(ids, skip_special_tokens=False))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = len(self._text(self._ids[self._prefix : self._read])) + self._ahead
        full = self._text(self._ids[self._prefix :])
        stable = full.rstrip("\ufffd")  # a trailing U+FFFD is an incomplete character: wait for its bytes
        piece = stable[done:]
        if len(stable) == len(full):
            self._prefix, self._read, self._ahead = self._read, len(self._ids), 0
        else:
            self._ahead += len(piece)
        return self._trim(piece)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end, as U+FFFD)."""
        done = len(self._text(self._ids[self._prefix : self._read])) + self._ahead
        full = self._text(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self._ahead = 0
        return self._trim(full[done:])

    def _trim(self, piece: str) -> str:
        # The byte-level pre-tokenizer prefixes a space; decode() strips it, so the stream does too.
        if not self._started and piece:
            piece = piece.lstrip(" ")
            self._started = bool(piece)
        return piece
