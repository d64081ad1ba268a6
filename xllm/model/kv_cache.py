"""KVCache: the keys and values of one sequence, per layer, growing on demand."""
import numpy as np

from .._kernels.layout import KV_BLOCK
from ..errors import ContextLengthError


def block_rows(n):
    """n rounded up to a whole number of KV blocks."""
    return -(-n // KV_BLOCK) * KV_BLOCK


class KVCache:
    """Per-layer keys and values of one sequence, in blocks of KV_BLOCK rows as the attention
    kernel reads them: ``k[layer]`` [capacity / KV_BLOCK, kv_dim, KV_BLOCK] (keys transposed),
    ``v[layer]`` [capacity / KV_BLOCK, n_kv_heads, KV_BLOCK, head_dim]; ``reference.k_rows`` and
    ``v_rows`` turn them back into rows.

    Capacity (a multiple of KV_BLOCK) starts small and at least doubles when it runs out
    (amortised O(1) per token, never a copy per token), up to ``max_len`` (the model's context)
    rounded up to a block, past which ``reserve`` raises ContextLengthError. Keys and values
    0..length-1 are valid; the attention kernel stores new ones in place. ``ids[:length]`` are
    the tokens they belong to (so a later prompt can reuse a prefix).
    """

    def __init__(self, num_layers, kv_dim, max_len, *, n_kv_heads=1, initial_capacity=256,
                 dtype=np.float32):
        self.num_layers = num_layers
        self.kv_dim = kv_dim
        self.max_len = max_len
        self.n_kv_heads = n_kv_heads
        self.dtype = np.dtype(dtype)
        self.initial_capacity = max(1, initial_capacity)
        self.reset()

    def check_room(self, n_new):
        """Raise ContextLengthError if n_new more rows would pass max_len."""
        need = self.length + n_new
        if need > self.max_len:
            raise ContextLengthError(
                f"the sequence would reach {need} tokens, past the model's context of "
                f"{self.max_len} ({self.length} in the cache, {n_new} new)")

    def capacity_for(self, n_new) -> int:
        """The capacity (rows) the cache would have after ``reserve(n_new)``."""
        need = self.length + n_new
        if need <= self.capacity:
            return self.capacity
        return block_rows(min(self.max_len, max(need, 2 * self.capacity,
                                                self.initial_capacity)))

    def reserve(self, n_new):
        """Make room for n_new more rows; raise ContextLengthError past max_len."""
        self.check_room(n_new)
        capacity = self.capacity_for(n_new)
        if capacity == self.capacity:
            return
        blocks_in_use = block_rows(self.length) // KV_BLOCK
        blocks = capacity // KV_BLOCK
        head_dim = self.kv_dim // self.n_kv_heads
        _grow(self.k, self.num_layers, (blocks, self.kv_dim, KV_BLOCK), blocks_in_use, self.dtype)
        _grow(self.v, self.num_layers, (blocks, self.n_kv_heads, KV_BLOCK, head_dim),
              blocks_in_use, self.dtype)
        self.ids = np.pad(self.ids[:self.length], (0, capacity - self.length))  # zeros after
        self.capacity = capacity

    def copy_prefix(self, source: "KVCache", n: int):
        """Make this (empty) cache hold the first n rows of `source`: the same keys and values,
        bit for bit, as computing them again."""
        if self.length:
            raise ValueError("copy_prefix needs an empty cache")
        if not 0 <= n <= source.length:
            raise ValueError(f"cannot copy {n} rows of a cache of {source.length}")
        self.reserve(n)
        blocks = block_rows(n) // KV_BLOCK
        for mine, theirs in zip(self.k + self.v, source.k + source.v):
            mine[:blocks] = theirs[:blocks]
        self.ids[:n] = source.ids[:n]
        self.length = n

    def shrink(self):
        """Free the capacity past the blocks in use (copying what they hold)."""
        capacity = block_rows(self.length)
        if capacity >= self.capacity:
            return
        blocks = capacity // KV_BLOCK
        self.k = [a[:blocks].copy() for a in self.k]
        self.v = [a[:blocks].copy() for a in self.v]
        self.ids = self.ids[:capacity].copy()
        self.capacity = capacity

    def truncate(self, length):
        """Forget every row from `length` on (the memory stays reserved for reuse)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length = length

    def reset(self):
        """Empty the cache and free its memory."""
        self.length = 0
        self.capacity = 0
        self.k = []  # num_layers arrays [capacity / KV_BLOCK, kv_dim, KV_BLOCK]
        self.v = []  # num_layers arrays [capacity / KV_BLOCK, n_kv_heads, KV_BLOCK, head_dim]
        self.ids = np.zeros(0, np.int64)  # [capacity] token ids of the cached rows

    def common_prefix(self, ids) -> int:
        """How many leading tokens of `ids` already have their keys and values here."""
        n = min(self.length, len(ids))
        diff = np.flatnonzero(self.ids[:n] != np.asarray(ids[:n], np.int64))
        return int(diff[0]) if diff.size else n

    @property
    def nbytes(self):
        """Bytes held by the cache arrays (capacity, not just the rows in use)."""
        return self.bytes_for(self.capacity)

    def bytes_for(self, rows) -> int:
        """Bytes of the cache arrays at a capacity of `rows` rows."""
        return 2 * self.num_layers * rows * self.kv_dim * self.dtype.itemsize


def _grow(cache, num_layers, shape, blocks_in_use, dtype):
    """Replace each layer's array of `cache` by a larger one of `shape` holding its first
    `blocks_in_use` blocks (appending the arrays of an empty cache). One layer at a time, so
    that the old array is freed before the next new one is allocated."""
    for layer in range(num_layers):
        grown = np.empty(shape, dtype)
        if layer < len(cache):
            grown[:blocks_in_use] = cache[layer][:blocks_in_use]
            cache[layer] = grown
        else:
            cache.append(grown)
