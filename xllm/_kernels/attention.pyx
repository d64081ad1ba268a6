"""Causal grouped-query attention over a KV cache (semantics: ``reference.attention``).

A work item, run by prange, is one query row and up to MAXG query heads that share a KV head
(so K and V are read once for the whole run). An item streams its keys in blocks of BK with an
online softmax: per head, keep the running max m, the running sum l of exp(s - m) and the
output accumulator acc (head_dim floats on the stack); when a block raises the max, l and acc are
rescaled by exp(m_old - m_new). So no [heads, M, T] score matrix exists and decode allocates
nothing. The q.k dots and the p.V sums are AVX2 loops in vecmath.h.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport INFINITY, expf

from xllm._kernels._cpu cimport get_num_threads

cnp.import_array()

cdef extern from "vecmath.h" nogil:
    float xllm_max_f32(const float *x, Py_ssize_t n, int *has_nan)
    float xllm_exp_shift(const float *x, float shift, float *out, Py_ssize_t n)
    void xllm_scale_f32(float *x, float a, Py_ssize_t n)
    void xllm_dots(const float *q, const float *k, Py_ssize_t ldk, int hd, int n, float *s)
    void xllm_accum_pv(float *acc, const float *p, const float *v, Py_ssize_t ldv, int hd, int n)
    void xllm_prefetch_rows(const float *p, Py_ssize_t ld, int n, int hd)

cdef enum:
    BK = 32        # keys per block: its K and V rows stay in L1 for all heads of a run
    MAX_HEAD_DIM = 256
    PREFETCH = 4   # blocks ahead to prefetch
    MAXG = 8       # query heads per work item (they share one KV head)


cdef void _attend(const float *q, const float *k, const float *v, Py_ssize_t ld, int hd, int gq,
                  Py_ssize_t n_keys, float scale, float *out) noexcept nogil:
    """For the gq consecutive query heads at q (and out), all reading the same KV head:
    out[g] = softmax(scale * q[g].K^T) V over the first n_keys rows of k and v (row stride ld).

    Doing the heads of a GQA group together means each block of K and V comes from memory once
    and is reused from cache by all of them.
    """
    cdef float qs[MAXG * MAX_HEAD_DIM]
    cdef float acc[MAXG * MAX_HEAD_DIM]
    cdef float s[MAXG * BK]
    cdef float m[MAXG]
    cdef float l[MAXG]
    cdef float bm, c
    cdef int has_nan, n, na, d, g
    cdef Py_ssize_t b0, ahead
    for g in range(gq):
        m[g] = -INFINITY
        l[g] = 0.0
    for d in range(gq * hd):
        qs[d] = q[d] * scale
        acc[d] = 0.0
    b0 = 0
    while b0 < n_keys:
        n = <int>(n_keys - b0 if n_keys - b0 < BK else BK)
        ahead = b0 + PREFETCH * BK  # fetch a later block while this one is computed
        if ahead < n_keys:
            na = <int>(n_keys - ahead if n_keys - ahead < BK else BK)
            xllm_prefetch_rows(k + ahead * ld, ld, na, hd)
            xllm_prefetch_rows(v + ahead * ld, ld, na, hd)
        for g in range(gq):
            xllm_dots(qs + g * hd, k + b0 * ld, ld, hd, n, s + g * BK)
        for g in range(gq):
            bm = xllm_max_f32(s + g * BK, n, &has_nan)
            if bm > m[g]:
                if m[g] > -INFINITY:  # rescale what was accumulated under the old max
                    c = expf(m[g] - bm)
                    l[g] = l[g] * c
                    xllm_scale_f32(acc + g * hd, c, hd)
                m[g] = bm
            l[g] = l[g] + xllm_exp_shift(s + g * BK, m[g], s + g * BK, n)
            xllm_accum_pv(acc + g * hd, s + g * BK, v + b0 * ld, ld, hd, n)
        b0 = b0 + BK
    for g in range(gq):
        c = 1.0 / l[g]
        for d in range(hd):
            out[g * hd + d] = acc[g * hd + d] * c


cdef inline cnp.ndarray _f32_2d(object a, str name, bint write):
    """`a` as a 2-D float32, native-order, aligned, C-contiguous ndarray (TypeError/ValueError)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must be a native float32 array, got dtype {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {(<object>arr).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    return arr


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b):
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


def attention(q, k_cache, v_cache, out, start_pos, n_heads, n_kv_heads, scale):
    """Causal grouped-query attention of M new queries over the cache.

    q, out: float32 [M, n_heads*head_dim] (out may be q itself); k_cache, v_cache: float32
    [capacity, n_kv_heads*head_dim] whose first start_pos + M rows are filled. Query row i sits at
    position start_pos + i and attends to keys 0 .. start_pos + i; query head h reads KV head
    h // (n_heads // n_kv_heads). head_dim may be 1..256. Accumulation is float32 (the reference
    uses float64; expect ~1e-6 relative differences).
    """
    cdef cnp.ndarray qa = _f32_2d(q, "q", False)
    cdef cnp.ndarray ka = _f32_2d(k_cache, "k_cache", False)
    cdef cnp.ndarray va = _f32_2d(v_cache, "v_cache", False)
    cdef cnp.ndarray oa = _f32_2d(out, "out", True)
    cdef Py_ssize_t nh = n_heads, nkv = n_kv_heads, sp = start_pos
    if nh < 1 or nkv < 1 or nh % nkv:
        raise ValueError(f"n_heads ({nh}) must be a positive multiple of n_kv_heads ({nkv})")
    if (<object>oa).shape != (<object>qa).shape:
        raise ValueError(f"out shape {(<object>oa).shape} != q shape {(<object>qa).shape}")
    if qa.shape[1] % nh:
        raise ValueError(f"q has {qa.shape[1]} columns, not a multiple of n_heads ({nh})")
    cdef Py_ssize_t hd = qa.shape[1] // nh
    if hd < 1 or hd > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {hd} is outside 1..{MAX_HEAD_DIM}")
    if ka.shape[1] != nkv * hd or (<object>va).shape != (<object>ka).shape:
        raise ValueError(f"k_cache {(<object>ka).shape} and v_cache {(<object>va).shape} must both be "
                         f"[capacity, n_kv_heads*head_dim = {nkv * hd}]")
    cdef Py_ssize_t m = qa.shape[0]
    if sp < 0 or sp + m > ka.shape[0]:
        raise ValueError(f"start_pos {sp} + {m} rows exceeds the cache capacity {ka.shape[0]}")
    if (_overlap(oa, qa) and cnp.PyArray_DATA(oa) != cnp.PyArray_DATA(qa)) \
            or _overlap(oa, ka) or _overlap(oa, va):
        raise ValueError("out overlaps the caches, or overlaps q without being q")
    cdef float sc = float(scale)
    if m == 0:
        return
    cdef const float *qp = <const float *>cnp.PyArray_DATA(qa)
    cdef const float *kp = <const float *>cnp.PyArray_DATA(ka)
    cdef const float *vp = <const float *>cnp.PyArray_DATA(va)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef Py_ssize_t group = nh // nkv, ldq = nh * hd, ldkv = nkv * hd
    cdef int nt = get_num_threads()
    # A work item is (row, a run of gq query heads sharing one KV head). Split each group into
    # nsplit runs of at most MAXG heads, and further while there are fewer items than threads.
    cdef Py_ssize_t nsplit = 1
    while group % nsplit or group // nsplit > MAXG or \
            (m * nkv * nsplit < nt and nsplit < group):
        nsplit += 1
    cdef Py_ssize_t gq = group // nsplit, runs = nh // gq
    cdef Py_ssize_t items = m * runs, it, i, r
    if nt > items:
        nt = <int>items
    # Items go run-major (all rows of one run, then the next), so neighbouring items share KV.
    if m == 1:  # decode: every item costs the same
        for it in prange(items, nogil=True, num_threads=nt, schedule="static"):
            _attend(qp + it * gq * hd, kp + (it * gq // group) * hd, vp + (it * gq // group) * hd,
                    ldkv, <int>hd, <int>gq, sp + 1, sc, op + it * gq * hd)
    else:  # causal rows differ in length
        for it in prange(items, nogil=True, num_threads=nt, schedule="dynamic"):
            r = it // m
            i = it % m
            _attend(qp + i * ldq + r * gq * hd, kp + (r * gq // group) * hd,
                    vp + (r * gq // group) * hd, ldkv, <int>hd, <int>gq, sp + i + 1, sc,
                    op + i * ldq + r * gq * hd)
