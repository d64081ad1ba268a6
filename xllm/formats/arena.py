"""Memory for the weights a loader repacks, on transparent huge pages.

Decode reads every weight once per token, and on 4 KiB pages the reads are slower (a TLB miss
and a page walk per page of each stream). numpy asks the kernel for huge pages
(``madvise(MADV_HUGEPAGE)``) only for arrays of 4 MiB or more, and even those begin and end on
4 KiB pages up to the first and from the last 2 MiB boundary; a model's smaller matrices, scales
and sub-block scales (most of a 1.1B model's q/k/v/o matrices) land on 4 KiB pages entirely.
Measured on the 1.1B q4_k_m shape (2 threads, AMD EPYC VM, THP mode ``madvise``): 307 of 685 MB
of the weights in huge pages gave 33.5-36.5 decode tok/s; all of them in huge pages, 42.6-46.6.

An :class:`Arena` carves every array from slabs of at least ``SLAB_BYTES``, one after the other,
which numpy allocates and advises (its ``NUMPY_MADVISE_HUGEPAGE`` setting applies); an array
that does not fit in what is left of the current slab starts a new one (of its own size if it
is larger). The arrays are views of their slab and keep it alive: a slab is freed when the last
of them is. The part of a slab nothing was carved from is never touched, so it is not resident.
"""
import threading

import numpy as np

SLAB_BYTES = 64 << 20
ALIGN = 64  # every array starts on a cache line


class Arena:
    """Allocates uninitialised arrays (as ``np.empty``) one after the other in slabs whose
    memory numpy advises for huge pages; thread-safe."""

    def __init__(self):
        self._slab = None  # the slab arrays are carved from
        self._used = 0  # bytes of it handed out
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        """A new uninitialised array of `shape` and `dtype`."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self._carve(nbytes).view(dtype).reshape(shape)

    def _carve(self, nbytes):
        """`nbytes` of the current slab (of a new one when they do not fit), cache-line
        aligned."""
        with self._lock:
            start = -(-self._used // ALIGN) * ALIGN
            if self._slab is None or start + nbytes > self._slab.size:
                size = max(SLAB_BYTES, nbytes)
                raw = np.empty(size + ALIGN, np.uint8)
                first = -raw.ctypes.data % ALIGN
                self._slab = raw[first:first + size]
                start = 0
            self._used = start + nbytes
            return self._slab[start:start + nbytes]
