"""A least-recently-used cache that knows each value's version and size (no TensorFlow here)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class LruCache(Generic[Value]):
    """Values by key, each with the version it was loaded at and its size in bytes.

    `get` returns the kept value while its version is current and loads it
    anew otherwise. Room is made before a load (for the size expected) and
    after it: the least recently used go until one more entry of that size
    fits `max_entries` and `max_bytes`. A value larger than `max_bytes` on its
    own is returned but not kept.
    """

    def __init__(self, max_entries: int, max_bytes: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.loads = 0
        self._entries: OrderedDict[Hashable, tuple[Hashable, Value, int]] = OrderedDict()

    def get(
        self,
        key: Hashable,
        version: Hashable,
        load: Callable[[], tuple[Value, int]],
        expected_bytes: int = 0,
    ) -> Value:
        """The value kept under `key` at `version`, else `load()`'s (value, bytes), kept."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] == version:
            self._entries.move_to_end(key)
            return entry[1]
        self._entries.pop(key, None)  # absent, or stale: its files changed
        if expected_bytes <= self.max_bytes:  # before loading: old and new not both held
            self._make_room(expected_bytes)
        value, size = load()
        self.loads += 1
        if size <= self.max_bytes:
            self._make_room(size)
            self._entries[key] = (version, value, size)
        return value

    def _make_room(self, size: int) -> None:
        """Drop the least recently used until one more entry of `size` bytes fits."""
        while self._entries and (
            len(self._entries) + 1 > self.max_entries or self.nbytes + size > self.max_bytes
        ):
            self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._entries.values())

    def keys(self) -> tuple[Hashable, ...]:
        """The keys held, least recently used first."""
        return tuple(self._entries)
