"""The inference worker's cache: least recently used out first, by count and bytes, never stale."""

from __future__ import annotations

import pytest

from service.worker.cache import LruCache


def loader(loaded: list, value: str, size: int = 1):
    def load():
        loaded.append(value)
        return value, size

    return load


def test_the_least_recently_used_entry_goes_first_past_the_count():
    cache: LruCache[str] = LruCache(max_entries=2, max_bytes=100)
    loaded: list[str] = []
    cache.get("a", 1, loader(loaded, "A"))
    cache.get("b", 1, loader(loaded, "B"))
    assert cache.get("a", 1, loader(loaded, "A again")) == "A"  # a hit: a is now the newest
    cache.get("c", 1, loader(loaded, "C"))

    assert cache.keys() == ("a", "c")  # b was the least recently used
    assert loaded == ["A", "B", "C"] and cache.loads == 3
    assert cache.get("b", 1, loader(loaded, "B2")) == "B2"
    assert cache.keys() == ("c", "b")


def test_a_new_version_is_loaded_anew_and_replaces_the_stale_entry():
    cache: LruCache[str] = LruCache(max_entries=4, max_bytes=100)
    loaded: list[str] = []
    cache.get("model", ("inode 1", 10), loader(loaded, "old"))

    assert cache.get("model", ("inode 2", 11), loader(loaded, "new")) == "new"
    assert cache.get("model", ("inode 2", 11), loader(loaded, "unused")) == "new"
    assert cache.keys() == ("model",) and loaded == ["old", "new"]


def test_bytes_bound_evicts_before_loading_and_an_oversized_value_is_not_kept():
    cache: LruCache[str] = LruCache(max_entries=10, max_bytes=100)
    loaded: list[str] = []
    cache.get("a", 1, loader(loaded, "A", 40), expected_bytes=40)
    cache.get("b", 1, loader(loaded, "B", 40), expected_bytes=40)
    seen_when_loading = []

    def load_c():
        seen_when_loading.append(cache.keys())
        return "C", 50

    cache.get("c", 1, load_c, expected_bytes=50)
    assert seen_when_loading == [("b",)]  # room was made before the load
    assert cache.keys() == ("b", "c") and cache.nbytes == 90

    assert cache.get("huge", 1, loader(loaded, "H", 101), expected_bytes=101) == "H"
    assert cache.keys() == ("b", "c")  # kept: the huge one would not fit beside nothing either


def test_a_size_known_only_after_loading_still_keeps_the_bound():
    cache: LruCache[str] = LruCache(max_entries=10, max_bytes=100)
    cache.get("a", 1, loader([], "A", 60))
    cache.get("b", 1, loader([], "B", 60))  # expected 0: room made once its size is known
    assert cache.keys() == ("b",) and cache.nbytes == 60


def test_at_least_one_entry():
    with pytest.raises(ValueError, match="max_entries must be at least 1, got 0"):
        LruCache(max_entries=0, max_bytes=1)
