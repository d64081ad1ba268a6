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
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

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
    filled. Query row i sits at position start_pos + i and attends to keys 0 .. start_pos + i;
    query head h reads KV head h // (n_heads // n_kv_heads). head_dim may be 1..256.
    Accumulation is float32 (the reference uses float64; expect ~1e-6 relative differences).
    """
    m = q.shape[0] if isinstance(q, np.ndarray) and q.ndim == 2 else 0
    attention_batch(q, None, None, (k_cache,), (v_cache,), (0, m), (start_pos,), out, n_heads,
                    n_kv_heads, scale)


def attention_batch(q, k_new, v_new, k_caches, v_caches, bounds, starts, out, n_heads,
                    n_kv_heads, scale):
    """``attention`` for S sequences in one call (one parallel loop over all their rows).

    Rows bounds[s] .. bounds[s+1]-1 of q and out belong to sequence s, whose caches
    k_caches[s], v_caches[s] hold starts[s] rows before them. If k_new and v_new (float32
    [M, n_kv_heads*head_dim]) are given, their rows are first stored in the caches from row
    starts[s] on (rounded to float16 for float16 caches). Each row's result is the same as from
    ``attention`` on its own sequence.
    """
    cdef cnp.ndarray qa = _f32(q, "q", False, 2), oa = _f32(out, "out", True, 2)
    cdef Py_ssize_t nh = n_heads, nkv = n_kv_heads, m = qa.shape[0], hd, s, i, S = len(k_caches)
    if nh < 1 or nkv < 1 or nh % nkv:
        raise ValueError(f"n_heads ({nh}) must be a positive multiple of n_kv_heads ({nkv})")
    _check_out(oa, qa, "q")
    hd = qa.shape[1] // nh
    if qa.shape[1] % nh or not 1 <= hd <= MAX_HEAD_DIM:
        raise ValueError(f"q has {qa.shape[1]} columns: not n_heads ({nh}) * head_dim "
                         f"(1..{MAX_HEAD_DIM})")
    cdef Py_ssize_t ldkv = nkv * hd
    cdef cnp.ndarray ba = _int64(bounds, "bounds"), sa = _int64(starts, "starts"), ka, va
    if len(v_caches) != S or (<object>ba).shape != (S + 1,) or (<object>sa).shape != (S,):
        raise ValueError(f"need S caches of each kind, S + 1 bounds and S starts; got "
                         f"{S}, {len(v_caches)}, {ba.size}, {sa.size}")
    cdef const int64_t *bp = <const int64_t *>cnp.PyArray_DATA(ba)
    cdef const int64_t *sp = <const int64_t *>cnp.PyArray_DATA(sa)
    if bp[0] != 0 or bp[S] != m or np.any(np.diff(ba) < 0):
        raise ValueError(f"bounds must rise from 0 to the {m} rows of q")
    cdef bint store = k_new is not None, f16 = S > 0 and \
        isinstance(k_caches[0], np.ndarray) and k_caches[0].dtype == np.float16
    cdef cnp.ndarray kna, vna
    if store:
        kna, vna = _f32(k_new, "k_new", False, 2), _f32(v_new, "v_new", False, 2)
        if (<object>kna).shape != (m, ldkv) or (<object>vna).shape != (m, ldkv):
            raise ValueError(f"k_new and v_new must be [{m}, {ldkv}]")
    cdef float sc = float(scale)
    cdef Py_ssize_t es = 2 if f16 else 4
    cdef char **kp = <char **>malloc(2 * S * sizeof(char *) + 1)
    cdef char **vp = kp + S
    cdef int32_t *seq = <int32_t *>malloc(m * sizeof(int32_t) + 1)
    try:
        if kp == NULL or seq == NULL:
            raise MemoryError()
        for s in range(S):
            ka = _f32(k_caches[s], "k_cache", store, 2, f16)
            va = _f32(v_caches[s], "v_cache", store, 2, f16)
            if ka.shape[1] != ldkv or (<object>va).shape != (<object>ka).shape:
                raise ValueError(f"k_cache {(<object>ka).shape} and v_cache {(<object>va).shape} "
                                 f"must both be [capacity, n_kv_heads*head_dim = {ldkv}]")
            if sp[s] < 0 or sp[s] + bp[s + 1] - bp[s] > ka.shape[0]:
                raise ValueError(f"start_pos {sp[s]} + {bp[s + 1] - bp[s]} rows exceeds the "
                                 f"cache capacity {ka.shape[0]}")
            if _overlap(oa, ka, False) or _overlap(oa, va, False):
                raise ValueError("out overlaps the caches")
            kp[s], vp[s] = <char *>cnp.PyArray_DATA(ka), <char *>cnp.PyArray_DATA(va)
        if m:
            _run(<const float *>cnp.PyArray_DATA(qa),
                 NULL if not store else <const float *>cnp.PyArray_DATA(kna),
                 NULL if not store else <const float *>cnp.PyArray_DATA(vna),
                 kp, vp, f16, S, bp, sp, seq, <float *>cnp.PyArray_DATA(oa), m, nh, nkv, hd, sc)
    finally:
        free(kp)
        free(seq)


cdef void _run(const float *qp, const float *knp, const float *vnp, char **kp, char **vp,
               bint f16, Py_ssize_t S, const int64_t *bp, const int64_t *sp, int32_t *seq,
               float *op, Py_ssize_t m, Py_ssize_t nh, Py_ssize_t nkv, Py_ssize_t hd,
               float sc) noexcept nogil:
    cdef Py_ssize_t s, i, r, it, ldkv = nkv * hd, ldq = nh * hd, es = 2 if f16 else 4
    for s in range(S):  # store the new rows, and note which sequence each row belongs to
        for i in range(bp[s], bp[s + 1]):
            seq[i] = <int32_t>s
            r = sp[s] + i - bp[s]
            if knp == NULL:
                continue
            if f16:
                xllm_to_f16(knp + i * ldkv, <uint16_t *>kp[s] + r * ldkv, ldkv)
                xllm_to_f16(vnp + i * ldkv, <uint16_t *>vp[s] + r * ldkv, ldkv)
            else:
                memcpy(<float *>kp[s] + r * ldkv, knp + i * ldkv, ldkv * 4)
                memcpy(<float *>vp[s] + r * ldkv, vnp + i * ldkv, ldkv * 4)
    cdef Py_ssize_t group = nh // nkv
    cdef int nt = get_num_threads()
    # A work item is (row, a run of gq query heads sharing one KV head). Split each group into
    # nsplit runs of at most MAXG heads, and further while there are fewer items than threads.
    cdef Py_ssize_t nsplit = 1
    while group % nsplit or group // nsplit > MAXG or \
            (m * nkv * nsplit < nt and nsplit < group):
        nsplit += 1
    cdef Py_ssize_t gq = group // nsplit, runs = nh // gq, items = m * runs, kvo
    if nt > items:
        nt = <int>items
    # Items go run-major (all rows of one run, then the next), so neighbouring items share KV.
    # Causal rows differ in length, hence the dynamic schedule.
    for it in prange(items, nogil=True, num_threads=nt, schedule="dynamic"):
        r = it // m
        i = it % m
        s = seq[i]
        kvo = (r * gq // group) * hd * es
        _attend(qp + i * ldq + r * gq * hd, kp[s] + kvo, vp[s] + kvo, f16, ldkv, <int>hd,
                <int>gq, sp[s] + i - bp[s] + 1, sc, op + i * ldq + r * gq * hd)
