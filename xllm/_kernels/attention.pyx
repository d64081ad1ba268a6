"""Causal grouped-query attention over KV caches (semantics: ``reference.attention``).

A sequence's caches are stored in blocks of 32 rows: K transposed, [blocks, kv_dim, 32], and V
[blocks, n_kv_heads, 32, head_dim] (``reference.k_blocks`` and ``v_blocks`` build them from rows),
so that one KV head's part of a block is contiguous. A work item,
run by prange, is a tile of query rows of one sequence that read the same KV head: up to
XA_ROWBUF floats of queries (head_dim 64: 21 tokens x the 3 heads of a GQA group in prefill, the
group's heads of one token in decode), fewer when the call's cost must be shared among the
threads (``_plan``). It streams the blocks its rows need with an online softmax
(attention.h, which states the order of operations and why a row's result does not depend on
the rows it shares a call with): per block, the scores of all its rows (broadcast FMAs against the
transposed keys, no horizontal sums), the running max and sum, and the p-weighted value rows.
No [heads, M, T] score matrix exists and nothing is allocated per call but a small item list.
With a sliding window (``window`` > 0: Mistral) a row reads only the blocks that hold its last
`window` keys, so a cache may release the blocks before them.
"""
include "_common.pxi"
include "_isa.pxi"
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport parallel
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy

from xllm._kernels.layout import KV_BLOCK

cdef extern from "attention.h" nogil:
    enum: XA_BK, XA_ROWBUF
    void xllm_attend(int isa, int nr, const float **q, float **out, const int64_t *nk,
                     int64_t window, const void *kt, const void *vt, Py_ssize_t ldb, int f16,
                     int hd, float scale)
    void xllm_store_kv(const float *k, const float *v, void *kc, void *vc, Py_ssize_t kvd,
                       Py_ssize_t hd, Py_ssize_t t, int f16)

assert KV_BLOCK == XA_BK  # the caches' blocks of attention.h are layout.py's

# Instruction-set paths (set_isa, get_isa: _isa.pxi), each with the CPU features it needs: both
# give the same bits, AVX-512 in fewer instructions.
_init_isa({"avx2": (), "avx512": ("avx512",)})

cdef enum:
    MAX_HEAD_DIM = 256
    MAX_ROWS = XA_ROWBUF // 32  # rows of one item when head_dim <= 32
    MIN_TILE_ROWS = 12  # query rows of an item, at least, when rows are cut for the threads
    ITEMS_PER_THREAD = 8  # items per thread that a call aims for (dynamic schedule)


def attention(q, k_cache, v_cache, out, start_pos, n_heads, n_kv_heads, scale, window=0):
    """Causal grouped-query attention of M new queries over the cache.

    q, out: float32 [M, n_heads*head_dim] (out may be q itself); k_cache: [blocks, n_kv_heads *
    head_dim, 32] (keys stored transposed in blocks of 32), v_cache: [blocks, n_kv_heads, 32,
    head_dim], float32 or float16 (both the same), holding the first start_pos + M keys and
    values. Query row i sits at position start_pos + i and attends to keys 0 .. start_pos + i;
    query head h reads KV head h // (n_heads // n_kv_heads). head_dim may be 1..256.
    A sliding window (window > 0) limits row i to the last `window` of those keys, start_pos +
    i + 1 - window .. start_pos + i; blocks wholly before the first row's window are not read.
    Accumulation is float32 (the reference uses float64; expect ~1e-6 relative differences).
    """
    m = q.shape[0] if isinstance(q, np.ndarray) and q.ndim == 2 else 0
    attention_batch(q, None, None, (k_cache,), (v_cache,), (0, m), (start_pos,), out, n_heads,
                    n_kv_heads, scale, window)


def attention_batch(q, k_new, v_new, k_caches, v_caches, bounds, starts, out, n_heads,
                    n_kv_heads, scale, window=0):
    """``attention`` for S sequences in one call (one parallel loop over all their rows).

    Rows bounds[s] .. bounds[s+1]-1 of q and out belong to sequence s, whose caches
    k_caches[s], v_caches[s] hold starts[s] keys and values before them. If k_new and v_new
    (float32 [M, n_kv_heads*head_dim]) are given, their rows are first stored in the caches as
    keys and values starts[s] onwards (rounded to float16 for float16 caches). Each row's result
    is bitwise the same as from ``attention`` on its own sequence. `window` as for ``attention``.
    """
    # All checks run here, with the GIL held, before any nogil code. Every sum and product of
    # user-given numbers below is bounded first (comments give the bound): none can overflow.
    cdef cnp.ndarray qa = _f32(q, "q", False, 2)
    cdef cnp.ndarray oa = _f32(out, "out", True, 2)
    # tuples hold the caches alive even if the caller's lists change during the call
    k_caches = tuple(k_caches)
    v_caches = tuple(v_caches)
    # n_heads, n_kv_heads: OverflowError past Py_ssize_t, TypeError if not integers
    cdef Py_ssize_t nh = n_heads
    cdef Py_ssize_t nkv = n_kv_heads
    cdef Py_ssize_t m = qa.shape[0]  # query rows
    cdef Py_ssize_t S = len(k_caches)  # sequences
    cdef Py_ssize_t hd, s
    cdef int64_t win = window  # OverflowError past int64, TypeError if not an integer
    if win < 0:
        raise ValueError(f"window must be 0 (none) or positive, got {win}")
    if nh < 1 or nkv < 1 or nh % nkv:
        raise ValueError(f"n_heads ({nh}) must be a positive multiple of n_kv_heads ({nkv})")
    _check_out_matches(oa, qa, "q")
    hd = qa.shape[1] // nh
    if qa.shape[1] % nh or not 1 <= hd <= MAX_HEAD_DIM:
        raise ValueError(f"q has {qa.shape[1]} columns: not n_heads ({nh}) * head_dim "
                         f"(1..{MAX_HEAD_DIM})")
    cdef Py_ssize_t ldkv = nkv * hd  # <= nh * hd = q's columns: nkv divides nh
    cdef cnp.ndarray ba = _int64(bounds, "bounds")
    cdef cnp.ndarray sa = _int64(starts, "starts")
    cdef cnp.ndarray ka
    cdef cnp.ndarray va
    if len(v_caches) != S or (<object>ba).shape != (S + 1,) or (<object>sa).shape != (S,):
        raise ValueError(f"need S caches of each kind, S + 1 bounds and S starts; got "
                         f"{S}, {len(v_caches)}, {ba.size}, {sa.size}")
    # The threads read private copies of bounds and starts: what is checked below is what they
    # use, whatever happens to the caller's arrays meanwhile (another thread, or out sharing
    # their memory). One block: the copies, then the cache pointers.
    if S > PY_SSIZE_T_MAX // 64:
        raise MemoryError(f"attention_batch: {S} sequences is too many")
    cdef int64_t *bp = <int64_t *>malloc((5 * S + 1) * sizeof(int64_t) + 2 * S * sizeof(char *))
    if bp == NULL:
        raise MemoryError()
    cdef int64_t *sp = bp + S + 1
    cdef int64_t *tqs = sp + S  # rows (tokens) of a tile, per sequence
    cdef int64_t *order = tqs + S  # (cost, sequence) pairs, the costliest first
    cdef char **kp = <char **>(order + 2 * S)
    cdef char **vp = kp + S
    cdef int64_t *lst = NULL
    cdef Py_ssize_t rows, group, gh, items, rows_s, cap
    cdef bint store = k_new is not None, f16
    cdef cnp.ndarray kna, vna
    try:
        memcpy(bp, cnp.PyArray_DATA(ba), (S + 1) * sizeof(int64_t))
        memcpy(sp, cnp.PyArray_DATA(sa), S * sizeof(int64_t))
        for s in range(S + 1):  # after this, 0 <= bp[s] <= m for every s
            if bp[s] < (bp[s - 1] if s else 0) or (s == 0 and bp[0] != 0) or \
                    (s == S and bp[s] != m):
                raise ValueError(f"bounds must rise from 0 to the {m} rows of q")
        f16 = S > 0 and cnp.PyArray_Check(k_caches[0]) and \
            cnp.PyArray_TYPE(<cnp.ndarray>k_caches[0]) == cnp.NPY_FLOAT16
        if store:
            kna = _f32(k_new, "k_new", False, 2)
            vna = _f32(v_new, "v_new", False, 2)
            if (<object>kna).shape != (m, ldkv) or (<object>vna).shape != (m, ldkv):
                raise ValueError(f"k_new and v_new must be [{m}, {ldkv}]")
        for s in range(S):
            ka = _f32(k_caches[s], "k_cache", store, 3, f16)
            va = _f32(v_caches[s], "v_cache", store, 4, f16)
            if ka.shape[1] != ldkv or ka.shape[2] != XA_BK or (<object>va).shape != (
                    ka.shape[0], nkv, XA_BK, hd):
                raise ValueError(f"k_cache {(<object>ka).shape} must be [blocks, n_kv_heads*"
                                 f"head_dim = {ldkv}, {XA_BK}] and v_cache "
                                 f"{(<object>va).shape} [blocks, {nkv}, {XA_BK}, {hd}]")
            # rows_s <= m; cap fits: ka holds cap * ldkv floats, ldkv >= 1
            rows_s = bp[s + 1] - bp[s]
            cap = ka.shape[0] * XA_BK
            if not _in_range(sp[s], rows_s, cap):
                raise ValueError(f"start_pos {sp[s]} + {rows_s} rows exceeds the cache capacity "
                                 f"{cap} (or is negative)")
            if _overlap(oa, ka, False) or _overlap(oa, va, False):
                raise ValueError("out overlaps the caches")
            if store and (_overlap(ka, kna, False) or _overlap(va, vna, False)):
                raise ValueError("k_new or v_new overlaps the caches they are stored in")
            kp[s] = <char *>cnp.PyArray_DATA(ka)
            vp[s] = <char *>cnp.PyArray_DATA(va)
        # Work items: tiles of tokens x heads of one group of one sequence (see _plan)
        rows = min(<Py_ssize_t>MAX_ROWS, XA_ROWBUF // ((hd + 31) // 32 * 32))
        group = nh // nkv
        gh = min(group, rows)
        items = _plan(S, bp, sp, nkv, group, gh, max(1, rows // gh), get_num_threads(), win,
                      tqs, order)  # at most n_heads * m
        if items > PY_SSIZE_T_MAX // 48:  # (6 int64 per item)
            raise MemoryError(f"attention_batch: {items} work items is too many")
        lst = <int64_t *>malloc(6 * items * sizeof(int64_t) + 1)
        if lst == NULL:
            raise MemoryError()
        if m:
            _run(<const float *>cnp.PyArray_DATA(qa),
                 NULL if not store else <const float *>cnp.PyArray_DATA(kna),
                 NULL if not store else <const float *>cnp.PyArray_DATA(vna),
                 kp, vp, f16, S, bp, sp, <float *>cnp.PyArray_DATA(oa), nh, nkv, hd,
                 float(scale), win, lst, items, gh, tqs, order)
    finally:
        free(bp)
        free(lst)


cdef int _by_cost(const void *a, const void *b) noexcept nogil:
    """qsort order of (cost, sequence) pairs: the larger cost first, then the lower index."""
    cdef const int64_t *x = <const int64_t *>a
    cdef const int64_t *y = <const int64_t *>b
    if x[0] != y[0]:
        return -1 if x[0] > y[0] else 1
    return -1 if x[1] < y[1] else (1 if x[1] > y[1] else 0)


cdef Py_ssize_t _plan(Py_ssize_t S, const int64_t *bp, const int64_t *sp, Py_ssize_t nkv,
                      Py_ssize_t group, Py_ssize_t gh, Py_ssize_t tq_max, int threads,
                      int64_t win, int64_t *tqs, int64_t *order) noexcept:
    """Cut each sequence's rows into tiles (tqs[s] tokens each) and order the sequences
    (order: (cost, s) pairs) so that the threads finish together: an item's cost is about its
    rows times the keys they read (with a window, at most the window and the rows), every item
    costs at most about the total over ITEMS_PER_THREAD * threads (a few rows of a long prompt
    beside many decode rows are cut into several items, down to MIN_TILE_ROWS rows), and the
    costliest sequences' items come first in the dynamic schedule. Returns the number of
    items. Called once bp and sp are checked against the caches."""
    cdef Py_ssize_t s, rows_s, items = 0
    cdef double cost, total = 0.0, target, tq
    cdef Py_ssize_t min_tq = max(1, (MIN_TILE_ROWS + gh - 1) // gh)
    for s in range(S):  # in double: no product can overflow
        rows_s = bp[s + 1] - bp[s]
        cost = <double>rows_s * _keys_read(sp[s], rows_s, win)
        order[2 * s] = <int64_t>min(cost, 4e18)
        order[2 * s + 1] = s
        total += cost
    target = total / (ITEMS_PER_THREAD * max(1, threads))
    for s in range(S):
        rows_s = bp[s + 1] - bp[s]
        tq = target / max(1.0, _keys_read(sp[s], rows_s, win))
        tq = max(<double>min_tq, min(<double>tq_max, tq))
        tqs[s] = <int64_t>tq
        items += nkv * ((group + gh - 1) // gh) * ((rows_s + tqs[s] - 1) // tqs[s])
    qsort(order, S, 2 * sizeof(int64_t), _by_cost)
    return items


cdef inline double _keys_read(int64_t start, Py_ssize_t rows, int64_t win) noexcept nogil:
    """About the keys a sequence's rows read: those of its last row, and with a window the
    window plus the rows (the blocks from the first row's window to the last key)."""
    cdef double keys = <double>start + <double>rows
    if win > 0 and <double>win + <double>rows < keys:
        keys = <double>win + <double>rows
    return keys


cdef void _item(const int64_t *it, const float *qp, char **kp, char **vp, bint f16,
                const int64_t *bp, const int64_t *sp, float *op, Py_ssize_t nh, Py_ssize_t nkv,
                Py_ssize_t hd, float sc, int64_t win) noexcept nogil:
    """Work item it = (sequence, KV head, first head of the group, heads, first row, rows)."""
    cdef const float *qr[MAX_ROWS]
    cdef float *orow[MAX_ROWS]
    cdef int64_t nk[MAX_ROWS]
    cdef Py_ssize_t s = it[0]
    cdef Py_ssize_t h = it[1]
    cdef Py_ssize_t n = 0  # rows gathered
    cdef Py_ssize_t ldkv = nkv * hd
    cdef Py_ssize_t es = 2 if f16 else 4  # bytes per cache element
    cdef Py_ssize_t i, g
    cdef Py_ssize_t col
    for i in range(it[4], it[4] + it[5]):
        for g in range(it[2], it[2] + it[3]):
            col = (h * (nh // nkv) + g) * hd
            qr[n] = qp + i * nh * hd + col
            orow[n] = op + i * nh * hd + col
            nk[n] = sp[s] + i - bp[s] + 1
            n += 1
    xllm_attend(_isa, <int>n, qr, orow, nk, win, kp[s] + h * hd * XA_BK * es,
                vp[s] + h * hd * XA_BK * es, ldkv * XA_BK, f16, <int>hd, sc)


cdef void _run(const float *qp, const float *knp, const float *vnp, char **kp, char **vp,
               bint f16, Py_ssize_t S, const int64_t *bp, const int64_t *sp, float *op,
               Py_ssize_t nh, Py_ssize_t nkv, Py_ssize_t hd, float sc, int64_t win, int64_t *lst,
               Py_ssize_t items, Py_ssize_t gh, const int64_t *tqs,
               const int64_t *order) noexcept nogil:
    cdef Py_ssize_t s, i, t, g, k, tq
    cdef Py_ssize_t it = 0
    cdef Py_ssize_t ldkv = nkv * hd
    cdef Py_ssize_t group = nh // nkv
    # Rows of a GQA group share each K and V block; the costliest sequences go first, and in a
    # sequence the latest rows (the most keys).
    for k in range(S):
        s = order[2 * k + 1]
        tq = tqs[s]
        t = bp[s + 1] - bp[s]
        while t > 0:
            t -= min(tq, t)
            for i in range(nkv):
                g = 0
                while g < group:
                    lst[6 * it] = s  # the fields of a work item: see _item
                    lst[6 * it + 1] = i
                    lst[6 * it + 2] = g
                    lst[6 * it + 3] = min(gh, group - g)
                    lst[6 * it + 4] = bp[s] + t
                    lst[6 * it + 5] = min(tq, bp[s + 1] - bp[s] - t)
                    it += 1
                    g += gh
    cdef int nt = get_num_threads()
    if nt > items:
        nt = <int>items
    with parallel(num_threads=nt):  # one region: each costs microseconds
        if knp != NULL:  # store the new keys and values, then wait for all of them
            for s in prange(S, schedule="static"):
                for i in range(bp[s], bp[s + 1]):
                    xllm_store_kv(knp + i * ldkv, vnp + i * ldkv, kp[s], vp[s], ldkv, hd,
                                  sp[s] + i - bp[s], f16)
            xllm_barrier()  # Cython's prange ends with nowait
        for it in prange(items, schedule="dynamic"):
            _item(lst + 6 * it, qp, kp, vp, f16, bp, sp, op, nh, nkv, hd, sc, win)
