"""A small least-recently-used cache bounded by entries and/or bytes, safe from several threads.

A stage keeps what it computed for a repeated input -- the encoder a prompt's embedding and a
portrait's image condition -- so that a request repeating it skips the model. `functools.lru_cache`
bounds entries only and keys by the call's arguments; ours is bounded in bytes (a 480p condition is
10 MiB, a 720p one 23 MiB) and keyed by a content hash the caller computes, hence by hand.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    def __init__(self, max_items: int | None = None, max_bytes: int | None = None):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return (self.max_items is None or self.max_items > 0) and (self.max_bytes is None or self.max_bytes > 0)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V, nbytes: int = 0) -> None:
        """Keep `value` (the caller hands over a value nobody else changes); an entry larger than
        the whole byte bound is not kept."""
        if not self.enabled or (self.max_bytes is not None and nbytes > self.max_bytes):
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            while (self.max_items is not None and len(self._entries) > self.max_items) or \
                    (self.max_bytes is not None and self.bytes > self.max_bytes):
                _, (_, freed) = self._entries.popitem(last=False)  # the least recently used
                self.bytes -= freed

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}
