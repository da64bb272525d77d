"""Large memories (RxT-Beta's STM is 88 MB in bf16, 176 MB in float32): compact storage, writes
that stall no other conversation, eviction by bytes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import torch

from rxruntime import Engine, InvalidOptionError
from rxruntime.conversation import ConversationState
from rxruntime.models import RxTModel, RxTokenizer
from rxruntime.stores import InMemoryStore, RedisStore, SQLiteStore, STMStore, open_store, persist

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["Hi, I'm Ada and my cat is called Pixel. What is my name? Your name is Ada."] * 30


@pytest.fixture(scope="module")
def tok() -> RxTokenizer:
    return RxTokenizer.train(CORPUS, vocab_size=300)


def make_model() -> RxTModel:
    torch.manual_seed(0)
    return RxTModel(tiny_config(vocab_size=300, max_seq_len=48)).eval()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def bf16_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[STMStore]:
    if request.param == "memory":
        s: STMStore = open_store("memory://?stm_dtype=bfloat16")
    elif request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/stm.db?stm_dtype=bfloat16")
    else:
        s = RedisStore(client=fakeredis.FakeRedis(), stm_dtype="bfloat16")
    yield s
    s.close()


def test_a_bfloat16_store_keeps_half_the_bytes_and_reads_back_what_it_rounded(bf16_store: STMStore) -> None:
    config = tiny_config()
    stm = torch.randn(config.num_layers, config.stm_size, config.dim)
    persist(bf16_store, config, "a", 1, stm, 1)
    got = bf16_store.get("a")
    assert got is not None and got.stm.dtype == torch.bfloat16
    assert torch.equal(got.stm, stm.to(torch.bfloat16))
    got.check_fits(config)  # a bf16 snapshot restores on a float32 model
    full = ConversationState("a", 1, 1, stm, got.config_fingerprint).to_bytes()
    assert len(got.to_bytes()) < 0.6 * len(full)


def test_store_urls_take_the_stm_dtype(tmp_path: Path) -> None:
    assert open_store("memory://").stm_dtype == torch.float32
    sqlite = open_store(f"sqlite:///{tmp_path}/x.db?stm_dtype=bfloat16")
    assert isinstance(sqlite, SQLiteStore) and sqlite.path == f"{tmp_path}/x.db" and sqlite.stm_dtype == torch.bfloat16
    assert SQLiteStore(tmp_path / "y.db", stm_dtype=torch.float32).stm_dtype == torch.float32
    for bad in ("memory://?stm_dtype=float16", "sqlite:///z.db?stm_dtype=bfloat16&stm_dtype=float32"):
        with pytest.raises(InvalidOptionError, match="stm_dtype"):
            open_store(bad)
    with pytest.raises(InvalidOptionError, match="stm_dtype"):
        InMemoryStore(stm_dtype="int8")


def test_an_engine_resumes_from_a_bfloat16_store(tok: RxTokenizer, tmp_path: Path) -> None:
    model = make_model()
    url = f"sqlite:///{tmp_path}/stm.db?stm_dtype=bfloat16"
    with Engine(model, tok, store=open_store(url)) as eng:
        conv = eng.conversation("ada")
        conv.ask("Hi, I'm Ada.", max_new_tokens=4, wait_for_memory=True)
        live = conv.export_state().stm
    with Engine(model, tok, store=open_store(url)) as eng:
        resumed = eng.conversation("ada")
        state = resumed.export_state()
        assert state.stm_version == 1 and state.stm.dtype == torch.float32
        assert torch.equal(state.stm, live.to(torch.bfloat16).float())
        resumed.ask("What is my name?", max_new_tokens=4, wait_for_memory=True)
        assert resumed.stm_version == 2


class BlockingStore(InMemoryStore):
    """Holds the write of one conversation until released: a write that takes as long as it likes."""

    def __init__(self, blocked: str) -> None:
        super().__init__()
        self.blocked = blocked
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[str] = []

    def put(self, state: ConversationState) -> None:
        if state.conversation_id == self.blocked:
            self.entered.set()
            self.release.wait()
        super().put(state)
        self.written.append(state.conversation_id)


def test_a_slow_store_write_does_not_stall_another_conversations_turns(tok: RxTokenizer) -> None:
    store = BlockingStore("big")
    with Engine(make_model(), tok, store=store) as eng:
        try:
            big = eng.conversation("big")
            big.ask("Hi, I'm Ada.", max_new_tokens=3)
            assert store.entered.wait(60)  # big's memory is computed; its write is held in the store
            other = eng.conversation("other")
            # two turns: the second starts only once the first's memory update has committed
            other.ask("Hi", max_new_tokens=3, timeout=60)
            other.ask("Again", max_new_tokens=3, timeout=60, wait_for_memory=True)
            assert other.stm_version == 2 and store.written == ["other", "other"]
            assert not store.release.is_set() and big.stm_version == 0  # big is still being written
            assert eng.stats()["memory_backlog"] == 1  # the held write counts as owed work
        finally:
            store.release.set()
        assert big.wait_for_memory(60) and big.stm_version == 1
        stored = store.get("big")
        assert stored is not None and stored.stm_version == 1


def test_idle_memories_are_evicted_by_bytes(tok: RxTokenizer, tmp_path: Path) -> None:
    model = make_model()
    config = model.config
    d = config.decoder
    # a resident conversation holds its STM and the memory keys/values its update made for the next turn
    kv_bytes = config.num_layers * 2 * d.cross_kv_heads * config.stm_size * (config.dim // d.num_heads) * 4
    stm_bytes = config.num_layers * config.stm_size * config.dim * 4 + kv_bytes
    store = SQLiteStore(tmp_path / "stm.db")
    with Engine(model, tok, store=store, max_resident=None, max_resident_bytes=int(2.5 * stm_bytes)) as eng:
        convs = [eng.conversation(f"c{i}") for i in range(5)]
        for conv in convs:
            conv.ask("Hi", max_new_tokens=3, wait_for_memory=True)
        stats = eng.stats()
        assert stats["resident_conversations"] == 2 and stats["resident_bytes"] == 2 * stm_bytes
        assert eng.open_conversations == 5
        for conv in convs:  # the evicted ones resume from the store, their memory intact
            stored = store.get(conv.id)
            assert stored is not None and torch.equal(conv.export_state().stm, stored.stm)
        assert eng.stats()["resident_bytes"] <= 2.5 * stm_bytes
    with Engine(model, tok, store=SQLiteStore(tmp_path / "b.db"), max_resident_bytes=stm_bytes // 4) as eng:
        conv = eng.conversation("small-budget")
        conv.ask("Hi", max_new_tokens=3, wait_for_memory=True)
        assert eng.stats()["resident_conversations"] == 0  # idle and over any budget: evicted
        conv.ask("Again", max_new_tokens=3, wait_for_memory=True)  # read back for its turn
        assert conv.stm_version == 2


@pytest.mark.parametrize(("name", "value"), [("max_resident_bytes", -1), ("store_writers", 0)])
def test_bad_residency_options_are_refused(tok: RxTokenizer, name: str, value: int) -> None:
    with pytest.raises(InvalidOptionError, match=name):
        Engine(make_model(), tok, store=InMemoryStore(), **{name: value})  # type: ignore[arg-type]


BETA_CASES = [
    ROOT / "tests" / "fixtures" / "rxlm" / version / case
    for version in ("0.3.80", "0.3.93")
    for case in ("beta_published_fast", "beta_published_extended")
]


@pytest.mark.parametrize("case", BETA_CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_bfloat16_stored_stm_keeps_the_next_turns_answers(case: Path) -> None:
    """What storing the STM in bf16 does to the answers (docs/scaling.md), on RxLM-written
    models with RxT-Beta's options: each turn's logits from the rounded STM within 5e-3 of the
    float32 ones with the same argmax everywhere, and three turns whose STM is rounded after every
    memory update (a bf16 store between turns) give RxLM's own greedy tokens."""
    from safetensors.torch import load_file

    from rxruntime.models import SamplingParams, generate
    from rxruntime.models.checkpoint import load_pretrained

    exp = load_file(case / "expected.safetensors")
    meta = json.loads((case / "expected.json").read_text())
    model, _ = load_pretrained(case, load_tokenizer=False, rxlm_version=case.parent.name)
    eos = model.config.special_tokens.eos_id
    stored = exp["turns_init_stm"].to(torch.bfloat16)[None]
    for i in (1, 2, 3):
        before = exp["turns_init_stm"] if i == 1 else exp[f"turn{i - 1}_stm"]
        ids = exp[f"turn{i}_update_ids"]
        with torch.no_grad():
            exact = model.decoder_logits(ids, before[None])
            rounded = model.decoder_logits(ids, before.to(torch.bfloat16).float()[None])
        assert (exact - rounded).abs().max().item() < 5e-3
        assert torch.equal(exact.argmax(-1), rounded.argmax(-1))
        query = exp[f"turn{i}_query_ids"][0].tolist()
        budget = meta["max_seq_len"] - len(query)
        (answer,) = generate(model, stored.float(), [query], SamplingParams(temperature=0.0), max_new_tokens=budget)
        expected = exp[f"turn{i}_answer_ids"].tolist()
        assert answer + ([eos] if len(answer) < budget else []) == expected, f"turn {i}"
        with torch.no_grad():
            stored = model.memory_update(stored.float(), torch.tensor([query + expected])).to(torch.bfloat16)


@pytest.mark.parametrize(("cap", "batches"), [(32, [1, 2]), (1, [1, 1, 1])])
def test_memory_updates_are_batched_at_most_max_memory_batch_at_a_time(
    tok: RxTokenizer, cap: int, batches: list[int]
) -> None:
    """A memory update's activations grow with its batch (RxT-Beta: ~0.2 GB per conversation), so
    ``max_memory_batch`` bounds it; the updates queued behind a running one wait their turn."""
    model = make_model()
    real = model.memory_update
    sizes: list[int] = []
    entered, release = threading.Event(), threading.Event()

    def memory_update(stm: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, gates: object = None):  # type: ignore[no-untyped-def]
        sizes.append(stm.shape[0])
        entered.set()
        release.wait()
        return real(stm, ids, mask, gates)  # type: ignore[arg-type]

    model.memory_update = memory_update  # type: ignore[method-assign,assignment]
    with Engine(model, tok, max_memory_batch=cap) as eng:
        try:
            first = eng.conversation("m0", memory_init="Hi, I'm Ada.")
            assert entered.wait(60)  # the first update runs (held); the next two queue behind it
            rest = [eng.conversation(f"m{i}", memory_init="Hi, I'm Ada.") for i in (1, 2)]
            assert eng.stats()["memory_backlog"] == 2
        finally:
            release.set()
        assert all(c.wait_for_memory(60) for c in [first, *rest])
    assert sizes == batches
