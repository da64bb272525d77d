"""Byte-level BPE with RxT's special tokens, the message template, streaming-safe decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from rxruntime.models import RxTokenizer, TokenizerError
from rxruntime.models.tokenizer import SPECIAL_TOKENS

CORPUS = [
    "Hi, I'm Ada and my cat is called Pixel.",
    "What is my name? Your name is Ada.",
    "The weather in Paris is sunny today.",
    "I like green tea and long walks.",
] * 20


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


def test_special_tokens_take_the_first_ids(tok: RxTokenizer) -> None:
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.vocab_size <= 300


def test_template(tok: RxTokenizer) -> None:
    q = tok.query_ids("What is my name?")
    assert q[:2] == [2, 4] and q[-1] == 5
    full = tok.interaction_ids("What is my name?", "Ada.")
    assert full[: len(q)] == q and full[-1] == 3
    assert tok.decode(full) == "What is my name? Ada."
    assert "[Q]" in tok.decode(full, skip_special=False)


def test_round_trip_of_unseen_unicode(tok: RxTokenizer) -> None:
    text = "Zoë said 你好 🐈‍⬛ — naïve café!"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["Hi, I'm Ada.", "Zoë said 你好 🐈‍⬛ — naïve café!", "  two spaces", "😀😀😀"])
def test_incremental_decoder_never_splits_characters(tok: RxTokenizer, text: str) -> None:
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 127 for c in text):  # multi-byte characters really were held back at some point
        assert "" in pieces[:-1]


def test_save_load(tok: RxTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    again = RxTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("my cat Pixel") == tok.encode("my cat Pixel")


def test_bad_files_and_wrong_special_ids(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        RxTokenizer.from_file(bad)
    plain = Tokenizer(models.BPE(unk_token="[UNK]"))
    plain.add_special_tokens(["[UNK]", "[PAD]"])
    with pytest.raises(TokenizerError, match="ids 0..6"):
        RxTokenizer(plain)


def test_incremental_decoder_holds_back_only_the_incomplete_character(tok: RxTokenizer) -> None:
    text = "ab é"
    # Feed the bytes one token at a time (the byte-level alphabet's symbol of each byte, as the
    # ByteLevel pre-tokenizer maps them): the complete text before the split character comes out
    # at once, and only the character waits for its bytes.
    ((symbols, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    found = [tok.tokenizer.token_to_id(symbol) for symbol in symbols]
    ids = [i for i in found if i is not None]
    assert len(ids) == len(text.encode())
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    assert pieces[-2] == "" and pieces[-1] == "é"
    assert "".join(pieces[:-1]) == "ab "  # nothing before the incomplete character was held back
    cut = tok.incremental_decoder()
    assert "".join(cut.push(i) for i in ids[:-1]) == "ab "
    assert cut.flush() == "\ufffd"  # stopped mid-character: the held bytes, as U+FFFD
