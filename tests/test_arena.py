"""xllm.formats.arena: the loaders' weight arrays, carved one after the other from huge-page
slabs."""
import threading

import numpy as np

from xllm.formats import arena as A


def _span(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def test_arrays_are_aligned_disjoint_and_hold_their_values():
    arena = A.Arena()
    shapes = [((3, 5), np.float16), ((7,), np.uint8), ((2, 3, 4), np.int8), ((1000,), np.float32),
              ((0, 16), np.float16), ((4, 4), np.float32)]
    arrays = [arena.empty(s, d) for s, d in shapes]
    for a, (shape, dtype) in zip(arrays, shapes):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.flags.writeable and a.__array_interface__["data"][0] % A.ALIGN == 0
    for i, a in enumerate(arrays):
        a[...] = i + 1
    for i, a in enumerate(arrays):
        assert (a == i + 1).all()  # no array wrote into another
    spans = sorted(_span(a) for a in arrays if a.nbytes)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    # they share one slab, which they keep alive
    bases = {id(a.base.base if a.base.base is not None else a.base) for a in arrays}
    assert len(bases) == 1


def test_a_new_slab_when_an_array_does_not_fit():
    arena = A.Arena()
    first = arena.empty((A.SLAB_BYTES - 100,), np.uint8)
    second = arena.empty((200,), np.uint8)  # does not fit in what is left
    big = arena.empty((A.SLAB_BYTES + 1,), np.uint8)  # larger than a slab: a slab of its size
    assert first.base is not second.base and big.base is not second.base
    big[-1] = 7
    assert big[-1] == 7 and big.size == A.SLAB_BYTES + 1


def test_threads_get_disjoint_arrays():
    arena = A.Arena()
    out = []
    lock = threading.Lock()

    def take():
        mine = [arena.empty((1000,), np.uint8) for _ in range(200)]
        with lock:
            out.extend(mine)
    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted(_span(a) for a in out)
    assert len(spans) == 800
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
