"""Causal grouped-query attention over a KV cache (semantics: ``reference.attention``).

A work item, run by prange, is one query row and up to MAXG query heads that share a KV head
(so K and V are read once for the whole run). An item streams its keys in blocks of BK with an
online softmax: per head, keep the running max m, the running sum l of exp(s - m) and the
output accumulator acc (head_dim floats on the stack); when a block raises the max, l and acc are
rescaled by exp(m_old - m_new). So no [heads, M, T] score matrix exists and decode allocates
nothing. The q.k dots and the p.V sums are AVX2 loops in vecmath.h.
"""
include "_common.pxi"
import os

from libc.math cimport expf

from xllm._kernels._cpu import features

# AVX-512 inner loops where the CPU has them (XLLM_ISA=avx2 forces the AVX2 ones)
cdef bint _avx512 = features()["avx512"] and os.environ.get("XLLM_ISA", "").lower() != "avx2"

cdef enum:
    BK = 32        # keys per block: its K and V rows stay in L1 for all heads of a run
    MAX_HEAD_DIM = 256
    PREFETCH = 4   # blocks ahead to prefetch
    MAXG = 8       # query heads per work item (they share one KV head)


cdef void _attend(const float *q, const void *k0, const void *v0, bint f16, Py_ssize_t ld,
                  int hd, int gq, Py_ssize_t n_keys, float scale, float *out) noexcept nogil:
    """For the gq consecutive query heads at q (and out), all reading the same KV head:
    out[g] = softmax(scale * q[g].K^T) V over the first n_keys rows of k and v (row stride ld;
    float32, or float16 when f16: each block of BK rows is then widened once into kb/vb).

    Doing the heads of a GQA group together means each block of K and V comes from memory once
    and is reused from cache by all of them.
    """
    cdef float qs[MAXG * MAX_HEAD_DIM]
    cdef float acc[MAXG * MAX_HEAD_DIM]
    cdef float s[MAXG * BK]
    cdef float m[MAXG]
    cdef float l[MAXG]
    cdef float kb[BK * MAX_HEAD_DIM]
    cdef float vb[BK * MAX_HEAD_DIM]
    cdef float bm, c
    cdef int has_nan, n, na, d, g
    cdef Py_ssize_t b0 = 0, ahead, es = 2 if f16 else 4, ldb = hd if f16 else ld
    cdef const float *k
    cdef const float *v
    cdef bint wide = _avx512 and hd % 64 == 0  # the AVX-512 loops
    for g in range(gq):
        m[g] = -INFINITY
        l[g] = 0.0
    for d in range(gq * hd):
        qs[d] = q[d] * scale
        acc[d] = 0.0
    while b0 < n_keys:
        n = <int>min(n_keys - b0, <Py_ssize_t>BK)
        ahead = b0 + PREFETCH * BK  # fetch a later block while this one is computed
        if ahead < n_keys:
            na = <int>min(n_keys - ahead, <Py_ssize_t>BK)
            xllm_prefetch_rows(<const float *>(<const char *>k0 + ahead * ld * es), ld * es // 4,
                               na, hd * es // 4)
            xllm_prefetch_rows(<const float *>(<const char *>v0 + ahead * ld * es), ld * es // 4,
                               na, hd * es // 4)
        if f16:
            xllm_f16_rows(<const uint16_t *>k0 + b0 * ld, ld, n, hd, kb)
            xllm_f16_rows(<const uint16_t *>v0 + b0 * ld, ld, n, hd, vb)
            k, v = kb, vb
        else:
            k, v = <const float *>k0 + b0 * ld, <const float *>v0 + b0 * ld
        for g in range(gq):
            if wide:
                xllm_dots16(qs + g * hd, k, ldb, hd, n, s + g * BK)
            else:
                xllm_dots(qs + g * hd, k, ldb, hd, n, s + g * BK)
        for g in range(gq):
            bm = xllm_max_f32(s + g * BK, n, &has_nan)
            if bm > m[g]:  # rescale what was accumulated under the old max (from -inf: by 0)
                c = expf(m[g] - bm)
                l[g] = l[g] * c
                for d in range(g * hd, g * hd + hd):
                    acc[d] *= c
                m[g] = bm
            l[g] = l[g] + xllm_exp_shift(s + g * BK, m[g], s + g * BK, n)
            if wide:
                xllm_accum_pv16(acc + g * hd, s + g * BK, v, ldb, hd, n)
            else:
                xllm_accum_pv(acc + g * hd, s + g * BK, v, ldb, hd, n)
        b0 += BK
    for g in range(gq):
        c = 1.0 / l[g]
        for d in range(hd):
            out[g * hd + d] = acc[g * hd + d] * c


def attention(q, k_cache, v_cache, out, start_pos, n_heads, n_kv_heads, scale):
    """Causal grouped-query attention of M new queries over the cache.

    q, out: float32 [M, n_heads*head_dim] (out may be q itself); k_cache, v_cache: float32 or
    float16 (both the same) [capacity, n_kv_heads*head_dim] whose first start_pos + M rows are
    filled. Query row i sits at
    position start_pos + i and attends to keys 0 .. start_pos + i; query head h reads KV head
    h // (n_heads // n_kv_heads). head_dim may be 1..256. Accumulation is float32 (the reference
    uses float64; expect ~1e-6 relative differences).
    """
    cdef cnp.ndarray qa = _f32(q, "q", False, 2), oa = _f32(out, "out", True, 2)
    cdef bint f16 = isinstance(k_cache, np.ndarray) and k_cache.dtype == np.float16
    cdef cnp.ndarray ka = _f32(k_cache, "k_cache", False, 2, f16)
    cdef cnp.ndarray va = _f32(v_cache, "v_cache", False, 2, f16)
    cdef Py_ssize_t nh = n_heads, nkv = n_kv_heads, sp = start_pos, m = qa.shape[0], hd
    if nh < 1 or nkv < 1 or nh % nkv:
        raise ValueError(f"n_heads ({nh}) must be a positive multiple of n_kv_heads ({nkv})")
    _check_out(oa, qa, "q")
    hd = qa.shape[1] // nh
    if qa.shape[1] % nh or not 1 <= hd <= MAX_HEAD_DIM:
        raise ValueError(f"q has {qa.shape[1]} columns: not n_heads ({nh}) * head_dim "
                         f"(1..{MAX_HEAD_DIM})")
    if ka.shape[1] != nkv * hd or (<object>va).shape != (<object>ka).shape:
        raise ValueError(f"k_cache {(<object>ka).shape} and v_cache {(<object>va).shape} must both be "
                         f"[capacity, n_kv_heads*head_dim = {nkv * hd}]")
    if sp < 0 or sp + m > ka.shape[0]:
        raise ValueError(f"start_pos {sp} + {m} rows exceeds the cache capacity {ka.shape[0]}")
    if _overlap(oa, ka, False) or _overlap(oa, va, False):
        raise ValueError("out overlaps the caches")
    cdef float sc = float(scale)
    if m == 0:
        return
    cdef const float *qp = <const float *>cnp.PyArray_DATA(qa)
    cdef const char *kp = <const char *>cnp.PyArray_DATA(ka)
    cdef const char *vp = <const char *>cnp.PyArray_DATA(va)
    cdef Py_ssize_t es = 2 if f16 else 4
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
    # Causal rows differ in length, hence the dynamic schedule.
    for it in prange(items, nogil=True, num_threads=nt, schedule="dynamic"):
        r = it // m
        i = it % m
        _attend(qp + i * ldq + r * gq * hd, kp + (r * gq // group) * hd * es,
                vp + (r * gq // group) * hd * es, f16, ldkv, <int>hd, <int>gq, sp + i + 1, sc,
                op + i * ldq + r * gq * hd)
