"""The Chat Completions history cache: prefix keys, longest-prefix lookup, pending and failed entries, LRU."""

from __future__ import annotations

import torch

from rxruntime.serving.http.history_cache import HistoryCache, extend_key, prefix_keys

PAIRS = [("My name is Julia.", "Nice to meet you, Julia."), ("What is 3 plus 5?", "3 plus 5 is 8.")]


def test_prefix_keys_name_exactly_the_turns_so_far() -> None:
    keys = prefix_keys("Be brief.", PAIRS)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert prefix_keys("Be brief.", PAIRS[:1]) == keys[:2]  # a key depends only on the turns before it
    assert keys[2] == extend_key(keys[1], *PAIRS[1])
    assert prefix_keys(" Be brief.\n", [(f" {u}", f"{a} ") for u, a in PAIRS]) == keys  # ends ignored
    assert prefix_keys(None, PAIRS)[2] != keys[2]  # another system text, another memory
    assert prefix_keys("Be brief.", PAIRS[::-1])[2] != keys[2]  # order matters
    swapped = [(PAIRS[0][1], PAIRS[0][0])]
    assert prefix_keys("Be brief.", swapped)[1] != keys[1]  # so does who said what


def test_longest_cached_prefix_wins() -> None:
    cache = HistoryCache(8)
    keys = prefix_keys(None, PAIRS)
    assert cache.longest(keys) is None
    cache.put(keys[0], torch.zeros(1))
    cache.put(keys[1], torch.ones(1))
    found = cache.longest(keys)
    assert found is not None and found[0] == 1 and torch.equal(found[1].result(), torch.ones(1))  # type: ignore[arg-type]


def test_a_pending_entry_is_found_and_a_failed_one_disappears() -> None:
    cache = HistoryCache(8)
    keys = prefix_keys(None, PAIRS)
    pending = cache.reserve(keys[2])
    found = cache.longest(keys)
    assert found is not None and found[1] is pending and not pending.done()
    pending.set_result(None)  # the answer's memory update failed
    assert cache.longest(keys) is None and len(cache) == 0


def test_least_recently_used_entries_go_first() -> None:
    cache = HistoryCache(2)
    a, b, c = (prefix_keys(t, [])[0] for t in ("a", "b", "c"))
    cache.put(a, torch.zeros(1))
    cache.put(b, torch.zeros(1))
    assert cache.longest([a]) is not None  # touching a makes b the oldest
    cache.put(c, torch.zeros(1))
    assert cache.longest([b]) is None and cache.longest([a]) is not None and cache.longest([c]) is not None
    off = HistoryCache(0)
    off.put(a, torch.zeros(1))
    assert off.longest([a]) is None
