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

    With a sliding ``window`` (the model's: a position attends to itself and the window - 1
    before it), blocks whose rows no later position can see are released: when the capacity
    runs out, ``reserve`` first drops the whole blocks before position length - window + 1
    (moving the blocks still needed to the front; each drop frees at least a block, so the
    copies stay amortised O(1) per token), and grows only if that is not enough. ``offset``
    (a multiple of KV_BLOCK, 0 without a window) is then the first position the arrays hold:
    block i of ``k[layer]`` and ``v[layer]`` holds positions offset + i * KV_BLOCK onwards, and
    ``capacity`` counts rows from ``offset``. The capacity never passes the window plus
    ``chunk_rows`` (the most rows one forward pass adds, the model's chunk) plus a block, however
    many rows ``reserve`` is asked for: a windowed cache makes room for a chunk at a time, by
    releasing blocks. Positions before ``offset`` keep their ``ids``.
    """

    def __init__(self, num_layers, kv_dim, max_len, *, n_kv_heads=1, initial_capacity=256,
                 dtype=np.float32, window=None, chunk_rows=512):
        self.num_layers = num_layers
        self.kv_dim = kv_dim
        self.max_len = max_len
        self.n_kv_heads = n_kv_heads
        self.dtype = np.dtype(dtype)
        self.initial_capacity = max(1, initial_capacity)
        if window is not None and window < 1:
            raise ValueError(f"window must be None or positive, got {window!r}")
        self.window = window
        self.chunk_rows = chunk_rows
        self.reset()

    def check_room(self, n_new):
        """Raise ContextLengthError if n_new more rows would pass max_len."""
        need = self.length + n_new
        if need > self.max_len:
            raise ContextLengthError(
                f"the sequence would reach {need} tokens, past the model's context of "
                f"{self.max_len} ({self.length} in the cache, {n_new} new)")

    def first_needed(self) -> int:
        """The first position that a position from ``length`` on can attend to, rounded down to
        a block: everything before it may be released (0 without a window)."""
        if self.window is None or self.length < self.window:
            return 0
        first = self.length - self.window + 1
        return first - first % KV_BLOCK

    def capacity_for(self, n_new) -> int:
        """The capacity (rows) the cache would have after ``reserve(n_new)``."""
        need = self.length + n_new - self.offset
        if need <= self.capacity:
            return self.capacity
        need = self.length + n_new - self.first_needed()  # after dropping the blocks out of use
        if need <= self.capacity:
            return self.capacity
        room = self.max_len - self.first_needed()
        if self.window is not None:  # what a chunk needs at most: see the class comment
            room = min(room, self.window + KV_BLOCK + self.chunk_rows)
        return block_rows(min(room, max(need, 2 * self.capacity, self.initial_capacity)))

    def reserve(self, n_new):
        """Make room for n_new more rows (with a window: for min(n_new, chunk_rows) more rows,
        releasing the blocks out of the window first); raise ContextLengthError past
        max_len."""
        self.check_room(n_new)
        if self.length + n_new - self.offset <= self.capacity:
            return
        self._drop_front(self.first_needed() - self.offset)
        capacity = self.capacity_for(n_new)
        if capacity == self.capacity:
            return
        blocks_in_use = block_rows(self.length - self.offset) // KV_BLOCK
        blocks = capacity // KV_BLOCK
        head_dim = self.kv_dim // self.n_kv_heads
        _grow(self.k, self.num_layers, (blocks, self.kv_dim, KV_BLOCK), blocks_in_use, self.dtype)
        _grow(self.v, self.num_layers, (blocks, self.n_kv_heads, KV_BLOCK, head_dim),
              blocks_in_use, self.dtype)
        self.capacity = capacity
        self._cover_ids()

    def _drop_front(self, rows):
        """Release the first `rows` rows (whole blocks) of the arrays: the blocks after them
        move to the front, in steps that never overlap, and ``offset`` advances."""
        if rows <= 0:
            return
        dropped = rows // KV_BLOCK
        kept = block_rows(self.length - self.offset) // KV_BLOCK - dropped
        for array in self.k + self.v:
            for first in range(0, kept, dropped):
                n = min(dropped, kept - first)
                array[first:first + n] = array[first + dropped:first + dropped + n]
        self.offset += rows
        self._cover_ids()

    def _cover_ids(self):
        """Make ``ids`` cover every position the arrays can hold (zeros past length)."""
        end = self.offset + self.capacity
        if self.ids.size < end:
            kept = self.ids[:self.length]
            self.ids = np.pad(kept, (0, end - kept.size))  # zeros after

    def usable(self, n) -> int:
        """n if the sequence can continue from its first n rows here (n <= length), else 0: with
        a window, position n must still see the window - 1 rows before it."""
        if self.offset == 0 or n - self.window + 1 >= self.offset:
            return n
        return 0

    def copy_prefix(self, source: "KVCache", n: int):
        """Make this (empty) cache hold the first n rows of `source`: the same keys and values,
        bit for bit, as computing them again. If `source` released rows that a sequence
        continuing from n would need (a window), or released any and this cache has another
        window (or none: the engine's caches), nothing is copied: ``length`` stays 0."""
        if self.length:
            raise ValueError("copy_prefix needs an empty cache")
        if not 0 <= n <= source.length:
            raise ValueError(f"cannot copy {n} rows of a cache of {source.length}")
        n = source.usable(n)
        if n == 0 or (source.offset and self.window != source.window):
            return
        self.offset = source.offset
        self.length = source.offset  # (for a moment: none of its rows yet)
        self.reserve(n - self.offset)
        blocks = block_rows(n - self.offset) // KV_BLOCK
        for mine, theirs in zip(self.k + self.v, source.k + source.v):
            mine[:blocks] = theirs[:blocks]
        self.ids[:n] = source.ids[:n]
        self.length = n

    def shrink(self):
        """Free the capacity past the blocks in use (copying what they hold)."""
        capacity = block_rows(self.length - self.offset)
        if capacity >= self.capacity:
            return
        blocks = capacity // KV_BLOCK
        self.k = [a[:blocks].copy() for a in self.k]
        self.v = [a[:blocks].copy() for a in self.v]
        self.ids = self.ids[:self.offset + capacity].copy()
        self.capacity = capacity

    def truncate(self, length):
        """Forget every row from `length` on (the memory stays reserved for reuse). With a
        window, a cache that released rows position `length` needs forgets them all (length
        0; see ``usable``)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        length = self.usable(length)
        if length == 0 and self.offset:
            self.ids = self.ids[:self.capacity].copy()  # positions from 0 again
            self.offset = 0
        self.length = length

    def reset(self):
        """Empty the cache and free its memory."""
        self.length = 0
        self.offset = 0
        self.capacity = 0
        self.k = []  # num_layers arrays [capacity / KV_BLOCK, kv_dim, KV_BLOCK]
        self.v = []  # num_layers arrays [capacity / KV_BLOCK, n_kv_heads, KV_BLOCK, head_dim]
        self.ids = np.zeros(0, np.int64)  # [capacity] token ids of the cached rows

    def common_prefix(self, ids) -> int:
        """How many leading tokens of `ids` already have their keys and values here (0 if a
        window released rows that continuing after them would need: see ``usable``)."""
        n = min(self.length, len(ids))
        diff = np.flatnonzero(self.ids[:n] != np.asarray(ids[:n], np.int64))
        return self.usable(int(diff[0]) if diff.size else n)

    @property
    def nbytes(self):
        """Bytes held by the cache arrays (capacity, not just the rows in use; with a window,
        not the rows released)."""
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
