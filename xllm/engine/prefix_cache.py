"""PrefixCache: the KV caches of recently finished sequences, lent to new sequences that begin
with the same tokens (a shared system prompt, the earlier turns of a conversation).

A new sequence gets a copy of the longest prefix any entry shares with its prompt: the keys and
values of a row depend only on the tokens up to it, so the copy is bitwise what computing them
again would give. Entries are evicted least recently used first, to stay within a byte budget
that the caller may lower at any time (``evict``)."""
import threading
from collections import OrderedDict

from ..model.kv_cache import KVCache

MIN_REUSE = 16  # fewer shared tokens are cheaper to compute than to look up and copy


class PrefixCache:
    """Finished sequences' KV caches, keyed by identity, least recently used first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries = OrderedDict()  # id(kv) -> kv, least recently used first
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(kv.nbytes for kv in self._entries.values())

    def __len__(self):
        return len(self._entries)

    def insert(self, kv: KVCache):
        """Keep `kv` (a finished sequence's cache, given up by its owner) for later prompts.
        An entry whose tokens begin `kv`'s is dropped: `kv` covers it."""
        if kv.length < MIN_REUSE or self.max_bytes <= 0:
            kv.reset()
            return
        kv.shrink()  # a sequence reserves rows it may not have used
        tokens = kv.ids[:kv.length]
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.length <= kv.length and entry.common_prefix(tokens) == entry.length:
                    del self._entries[key]
                    entry.reset()
            self._entries[id(kv)] = kv
        self.evict(self.max_bytes)

    def lookup(self, prompt, new_cache) -> KVCache:
        """A new cache (from `new_cache()`) holding the longest prefix of `prompt` that an
        entry has, if at least MIN_REUSE tokens; None if none has one. At most
        len(prompt) - 1 rows are reused: the last prompt token must run to give logits."""
        with self._lock:
            best = None
            best_length = MIN_REUSE - 1
            for entry in self._entries.values():
                shared = min(entry.common_prefix(prompt), len(prompt) - 1)
                if shared > best_length:
                    best = entry
                    best_length = shared
            if best is None:
                return None
            self._entries.move_to_end(id(best))
            kv = new_cache()
            kv.copy_prefix(best, best_length)
        return kv

    def evict(self, max_bytes: int) -> int:
        """Drop least recently used entries until the cache holds at most `max_bytes`; returns
        the bytes freed."""
        freed = 0
        with self._lock:
            total = sum(kv.nbytes for kv in self._entries.values())
            while self._entries and total > max_bytes:
                _, kv = self._entries.popitem(last=False)
                total -= kv.nbytes
                freed += kv.nbytes
                kv.reset()
        return freed

    def clear(self):
        self.evict(0)
