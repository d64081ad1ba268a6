"""Token selection: argmax, repetition penalty, and temperature/top-k/top-p/min-p sampling.

Semantics are those of ``reference.py``; probabilities are handled in double precision, so the
chosen token agrees with the reference except when u, top_p or min_p sit within ~1e-12 of a
decision boundary.

``sample`` never sorts the vocabulary. One vectorised pass puts every token in a bucket by its
distance below the top logit, d = (max - logit) / temperature, 1/PER_NAT nat per bucket (so bucket
order is rank order), and sums exp(-d) per bucket. Every stage (top-k, top-p, min-p, the final
draw) is "find the rank where a running count or running mass crosses a target": whole buckets
are skipped by their count or mass, and only the bucket holding the crossing is gathered (a SIMD
scan) and ordered, lazily and only as far as needed (partial selection, then sort), by
(logit descending, id ascending).

The scratch buffers are module-level and grow with V only; sample and apply_repetition_penalty
run with the GIL held (they take well under a millisecond), which keeps them thread-safe.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport INFINITY, exp, log2
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport realloc
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from "vecmath.h" nogil:
    float xllm_max_f32(const float *x, Py_ssize_t n, int *has_nan)
    Py_ssize_t xllm_find_first(const float *x, Py_ssize_t n, float v)
    void xllm_bucket_weights(const float *l, Py_ssize_t n, float m, double scale, double per_nat,
                             int nb, uint16_t *bucket, double *w)
    Py_ssize_t xllm_find_u16(const uint16_t *a, Py_ssize_t n, uint16_t v, int32_t *out)

cdef enum:
    NB = 4096      # buckets; the last one holds everything >= (NB-1)/PER_NAT nats below the top
    BLOCK = 256    # logits per call of xllm_bucket_weights
    SMALL = 16     # insertion-sort threshold

cdef double PER_NAT = 64.0  # bucket width 1/64 nat: buckets hold few tokens, NB covers 64 nats
cdef double _edge[NB]       # exp(-b / PER_NAT): the weight at the upper edge of bucket b
cdef int _b
for _b in range(NB):
    _edge[_b] = exp(-_b / PER_NAT)


# ---------------- argument checks ----------------

cdef inline cnp.ndarray _logits(object a, bint write):
    """`a` as a 1-D, non-empty, native float32, C-contiguous ndarray."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"logits must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"logits must be a native float32 array, got dtype {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"logits must be 1-D, got shape {(<object>arr).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError("logits must be contiguous and aligned")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError("logits is read-only")
    if arr.shape[0] == 0:
        raise ValueError("logits is empty")
    if arr.shape[0] > 0x7FFFFFFF:
        raise ValueError("logits has more than 2**31 - 1 entries")
    return arr


cdef Py_ssize_t _argmax(const float *x, Py_ssize_t n) noexcept nogil:
    """First index of the largest value; the first NaN if any (numpy's convention)."""
    cdef int has_nan
    cdef float m = xllm_max_f32(x, n, &has_nan)
    if has_nan:
        m = <float>(0.0 / 0.0)
    return xllm_find_first(x, n, m)


def argmax(x):
    """Index of the largest value of a 1-D float32 array (the first one on ties)."""
    cdef cnp.ndarray a = _logits(x, False)
    return int(_argmax(<const float *>cnp.PyArray_DATA(a), a.shape[0]))


# ---------------- scratch ----------------

cdef uint16_t *_bucket_of = NULL   # [V] bucket of each token
cdef uint64_t *_keys = NULL        # [V] sort keys of the buckets gathered so far (see _key)
cdef int32_t *_found = NULL        # [V] token ids of the bucket being gathered
cdef uint8_t *_seen = NULL         # [V] marks for apply_repetition_penalty, kept all-zero
cdef Py_ssize_t _cap = 0
cdef int _cnt[NB]                  # tokens per bucket
cdef double _mass[NB]              # sum of exp(-d) per bucket
cdef int _start[NB]                # offset of each gathered bucket in _keys, -1 if not gathered
cdef Py_ssize_t _used = 0          # keys in use
cdef int _nsorted[NB]              # leading keys of each bucket already in final order


cdef int _reserve(Py_ssize_t v) except -1:
    """Grow the scratch buffers to hold v tokens."""
    global _bucket_of, _keys, _seen, _found, _cap
    if v <= _cap:
        return 0
    cdef void *p1 = realloc(_bucket_of, v * sizeof(uint16_t))
    if p1 != NULL:
        _bucket_of = <uint16_t *>p1
    cdef void *p2 = realloc(_keys, v * sizeof(uint64_t))
    if p2 != NULL:
        _keys = <uint64_t *>p2
    cdef void *p3 = realloc(_seen, v)
    if p3 != NULL:
        _seen = <uint8_t *>p3
    cdef void *p4 = realloc(_found, v * sizeof(int32_t))
    if p4 != NULL:
        _found = <int32_t *>p4
    if p1 == NULL or p2 == NULL or p3 == NULL or p4 == NULL:
        raise MemoryError()
    memset(_seen + _cap, 0, v - _cap)
    _cap = v
    return 0


# ---------------- sorting uint64 keys ascending ----------------

cdef inline uint64_t _key(float logit, Py_ssize_t i) noexcept nogil:
    """Key sorting ascending as (logit descending, id ascending)."""
    cdef float f = logit + <float>0.0  # -0.0 -> +0.0: equal logits must tie
    cdef uint32_t u
    memcpy(&u, &f, 4)
    # map float bits to an unsigned order (flip all bits of negatives, the sign bit of others),
    # branch-free, then invert it for descending
    u = u ^ (<uint32_t>(<int32_t>u >> 31) | <uint32_t>0x80000000)
    return ((<uint64_t>(~u)) << 32) | <uint64_t>i


cdef inline void _swap(uint64_t *a, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef uint64_t t = a[i]
    a[i] = a[j]
    a[j] = t


cdef void _insertion_sort(uint64_t *a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint64_t t
    for i in range(1, n):
        t = a[i]
        j = i
        while j > 0 and a[j - 1] > t:
            a[j] = a[j - 1]
            j -= 1
        a[j] = t


cdef void _heapsort(uint64_t *a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t start, end, root, child
    start = n // 2
    end = n
    while end > 1:
        if start > 0:
            start -= 1
        else:
            end -= 1
            _swap(a, 0, end)
        root = start
        while 2 * root + 1 < end:
            child = 2 * root + 1
            if child + 1 < end and a[child] < a[child + 1]:
                child += 1
            if a[root] < a[child]:
                _swap(a, root, child)
                root = child
            else:
                break


cdef Py_ssize_t _partition(uint64_t *a, Py_ssize_t n) noexcept nogil:
    """Hoare partition around the median of three (moved to a[0]); returns p in [1, n-1] with
    a[:p] <= a[p:]."""
    cdef Py_ssize_t mid = n // 2, i, j
    # median of a[0], a[mid], a[n-1] into a[0]
    if a[mid] < a[0]:
        _swap(a, mid, 0)
    if a[n - 1] < a[mid]:
        _swap(a, n - 1, mid)
        if a[mid] < a[0]:
            _swap(a, mid, 0)
    _swap(a, 0, mid)
    cdef uint64_t pivot = a[0]
    i = -1
    j = n
    while True:
        i += 1
        while a[i] < pivot:
            i += 1
        j -= 1
        while a[j] > pivot:
            j -= 1
        if i >= j:
            return j + 1
        _swap(a, i, j)


cdef void _sort(uint64_t *a, Py_ssize_t n, int depth) noexcept nogil:
    """Introsort: quicksort, heapsort past `depth` levels, insertion sort for short runs."""
    cdef Py_ssize_t p
    while n > SMALL:
        if depth <= 0:
            _heapsort(a, n)
            return
        depth -= 1
        p = _partition(a, n)
        if p < n - p:  # recurse into the smaller side
            _sort(a, p, depth)
            a += p
            n -= p
        else:
            _sort(a + p, n - p, depth)
            n = p
    _insertion_sort(a, n)


cdef void _select_sorted(uint64_t *a, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Put the k smallest of a[:n] in a[:k], sorted (quickselect, then sort)."""
    cdef uint64_t *b = a
    cdef Py_ssize_t m = n, kk = k, p
    cdef int depth = 2 * <int>log2(<double>n + 1.0) + 2
    while m > SMALL and kk > 0 and kk < m:
        if depth <= 0:
            break
        depth -= 1
        p = _partition(b, m)
        if kk < p:
            m = p
        else:  # b[:p] all belong to the k smallest
            b += p
            m -= p
            kk -= p
    if m > SMALL and kk > 0 and kk < m:  # bad pivots: fall back to sorting the rest
        _sort(b, m, 2 * <int>log2(<double>m + 1.0) + 2)
    elif m <= SMALL:
        _insertion_sort(b, m)
    _sort(a, k, 2 * <int>log2(<double>k + 1.0) + 2)


cdef inline Py_ssize_t _id(int b, Py_ssize_t j) noexcept nogil:
    """Token id at rank j within bucket b (after _ensure(c, b, j + 1))."""
    return <Py_ssize_t>(_keys[_start[b] + j] & <uint64_t>0xFFFFFFFF)


# ---------------- sample ----------------

cdef struct Ctx:
    const float *l
    Py_ssize_t v
    double top      # the largest logit
    double inv_t    # 1 / temperature


cdef void _gather(const Ctx *c, int b) noexcept nogil:
    """Collect the sort keys of bucket b (a vectorised scan of _bucket_of) into _keys."""
    global _used
    cdef Py_ssize_t n = xllm_find_u16(_bucket_of, c.v, <uint16_t>b, _found), j
    cdef uint64_t *out = _keys + _used
    for j in range(n):
        out[j] = _key(c.l[_found[j]], _found[j])
    _start[b] = <int>_used
    _nsorted[b] = 0
    _used += n


cdef inline void _ensure(const Ctx *c, int b, Py_ssize_t r) noexcept nogil:
    """Make the first r keys of bucket b final: the r smallest of the bucket, sorted. Grows
    geometrically so walking a bucket one rank at a time costs O(n log n) in total."""
    if _start[b] < 0:
        _gather(c, b)
    cdef Py_ssize_t ns = _nsorted[b], n = _cnt[b], want
    if r <= ns:
        return
    cdef uint64_t *seg = _keys + _start[b] + ns
    want = r
    if want < 2 * ns:
        want = 2 * ns
    if want < 64:
        want = 64
    if 2 * (want - ns) >= n - ns:
        want = n
    if want >= n:
        _sort(seg, n - ns, 2 * <int>log2(<double>(n - ns) + 1.0) + 2)
        _nsorted[b] = <int>n
    else:
        _select_sorted(seg, n - ns, want - ns)
        _nsorted[b] = <int>want


cdef inline double _w(const Ctx *c, int b, Py_ssize_t j) noexcept nogil:
    """exp(-d) of the token at rank j of bucket b (unnormalised probability; the top has 1)."""
    return exp(-((c.top - <double>c.l[_id(b, j)]) * c.inv_t))


cdef double _prefix_mass(const Ctx *c, Py_ssize_t k) noexcept nogil:
    """Mass of the k highest-ranked tokens."""
    cdef Py_ssize_t done = 0, j
    cdef double mass = 0.0
    cdef int b
    for b in range(NB):
        if done + _cnt[b] <= k:
            mass += _mass[b]
            done += _cnt[b]
            if done == k:
                return mass
        else:
            _ensure(c, b, k - done)
            for j in range(k - done):
                mass += _w(c, b, j)
            return mass
    return mass


cdef Py_ssize_t _id_at_rank(const Ctx *c, Py_ssize_t k) noexcept nogil:
    """Token id of rank k (0-based)."""
    cdef Py_ssize_t done = 0
    cdef int b
    for b in range(NB):
        if done + _cnt[b] > k:
            _ensure(c, b, k - done + 1)
            return _id(b, k - done)
        done += _cnt[b]
    return -1  # unreachable for k < V


cdef Py_ssize_t _top_p_count(const Ctx *c, Py_ssize_t limit, double target,
                             double *kept_mass) noexcept nogil:
    """Number of leading ranks (among `limit`) whose preceding mass is < target."""
    cdef Py_ssize_t kept = 0, n, j
    cdef double cum = 0.0
    cdef int b
    for b in range(NB):
        if kept >= limit:
            break
        n = _cnt[b]
        if n > limit - kept:
            n = limit - kept
        if n == _cnt[b] and cum + _mass[b] < target:
            cum += _mass[b]  # the whole bucket, and the rank after it, are kept
            kept += n
            continue
        for j in range(n):
            if not (cum < target):
                kept_mass[0] = cum
                return kept
            _ensure(c, b, j + 1)
            cum += _w(c, b, j)
            kept += 1
    kept_mass[0] = cum
    return kept


cdef Py_ssize_t _min_p_count(const Ctx *c, Py_ssize_t limit, double min_p,
                             double *kept_mass) noexcept nogil:
    """Number of leading ranks (among `limit`) with exp(-d) >= min_p."""
    cdef Py_ssize_t kept = 0, n, j
    cdef double cum = 0.0, w
    cdef int b
    for b in range(NB):
        if kept >= limit:
            break
        n = _cnt[b]
        if n > limit - kept:
            n = limit - kept
        # bucket b holds d < (b+1)/PER_NAT: if even that bound passes (with margin), all pass
        if n == _cnt[b] and b < NB - 1 and _edge[b + 1] > min_p * (1.0 + 1e-9):
            cum += _mass[b]
            kept += n
            continue
        for j in range(n):
            _ensure(c, b, j + 1)
            w = _w(c, b, j)
            if not (w >= min_p):
                kept_mass[0] = cum
                return kept
            cum += w
            kept += 1
    kept_mass[0] = cum
    return kept


cdef Py_ssize_t _draw(const Ctx *c, Py_ssize_t limit, double target) noexcept nogil:
    """Id of the first rank (among `limit`) at which the running mass exceeds target; the last
    candidate if rounding leaves it unreached."""
    cdef Py_ssize_t done = 0, n, j
    cdef double cum = 0.0
    cdef int b
    for b in range(NB):
        if done >= limit:
            break
        n = _cnt[b]
        if n > limit - done:
            n = limit - done
        if n == _cnt[b] and cum + _mass[b] <= target:
            cum += _mass[b]
            done += n
            continue
        for j in range(n):
            _ensure(c, b, j + 1)
            cum += _w(c, b, j)
            if cum > target:
                return _id(b, j)
            done += 1
    return _id_at_rank(c, limit - 1)


cdef Py_ssize_t _sample(Ctx *c, Py_ssize_t k, double tp, double mp, double u) noexcept nogil:
    """The token drawn from the k top-ranked tokens after top_p (tp), min_p (mp), with u."""
    global _used
    cdef double ww[BLOCK]
    cdef double mass, kept_mass
    cdef Py_ssize_t i0 = 0, v = c.v
    cdef int n, j, b
    # one pass: bucket, count and mass of every token; buckets are gathered later, on demand
    memset(_cnt, 0, sizeof(_cnt))
    memset(_mass, 0, sizeof(_mass))
    memset(_start, 0xFF, sizeof(_start))
    _used = 0
    while i0 < v:
        n = <int>(v - i0 if v - i0 < BLOCK else BLOCK)
        xllm_bucket_weights(c.l + i0, n, <float>c.top, c.inv_t * PER_NAT, PER_NAT, NB,
                            _bucket_of + i0, ww)
        for j in range(n):
            b = _bucket_of[i0 + j]
            _cnt[b] += 1
            _mass[b] += ww[j]
        i0 += BLOCK
    for b in range(NB):  # weights were relative to each bucket's upper edge
        _mass[b] *= _edge[b]

    mass = _prefix_mass(c, k)
    if tp < 1.0:
        k = _top_p_count(c, k, tp * mass, &kept_mass)
        if k < 1:  # top_p <= 0: keep the top token, whose weight is exp(0)
            k = 1
            kept_mass = 1.0
        mass = kept_mass
    if mp > 0.0:
        k = _min_p_count(c, k, mp, &kept_mass)
        if k < 1:  # min_p > 1
            k = 1
            kept_mass = 1.0
        mass = kept_mass
    return _draw(c, k, u * mass)


def sample(logits, temperature, top_k, top_p, min_p, u):
    """Draw a token from logits[V] with uniform number u in [0, 1).

    temperature <= 0 is greedy. Otherwise, in this order: divide by temperature; keep the top_k
    largest (top_k <= 0: all); keep the shortest prefix, by descending probability, whose
    probability mass reaches top_p; keep tokens whose probability is >= min_p times the largest;
    renormalise and return the first candidate (descending order, ties by lower id) at which the
    cumulative probability exceeds u. logits is not modified. ValueError if (for temperature > 0)
    logits holds NaN or +inf or is all -inf.
    """
    cdef cnp.ndarray a = _logits(logits, False)
    cdef const float *l = <const float *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t v = a.shape[0]
    cdef double t = float(temperature), tp = float(top_p), mp = float(min_p), uu = float(u)
    cdef Py_ssize_t k = v
    if not t > 0:
        if t != t:
            raise ValueError("temperature is NaN")
        return int(_argmax(l, v))
    if top_k > 0 and top_k < v:
        k = top_k
    cdef int has_nan
    cdef float top = xllm_max_f32(l, v, &has_nan)
    if has_nan or not (-INFINITY < top < INFINITY):
        raise ValueError("logits must not hold NaN or +inf, and must not all be -inf")
    if k == 1:  # only the top token survives
        return int(_argmax(l, v))
    _reserve(v)

    cdef Ctx c
    c.l = l
    c.v = v
    c.top = top
    c.inv_t = 1.0 / t
    # The GIL stays held: the module-level scratch must not be shared by concurrent calls.
    return int(_sample(&c, k, tp, mp, uu))


# ---------------- repetition penalty ----------------

def apply_repetition_penalty(logits, token_ids, penalty):
    """In place, once per distinct id in token_ids: logit / penalty if > 0 else logit * penalty.

    token_ids: integer array (or sequence) of ids in [0, V); IndexError otherwise, before any
    change. The arithmetic is float32, as in the reference.
    """
    cdef cnp.ndarray la = _logits(logits, True)
    cdef cnp.ndarray ids = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
    if ids.size == 0:
        return
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must hold integers, got dtype {ids.dtype}")
    if cnp.PyArray_TYPE(ids) != cnp.NPY_INT64 or ids.ndim != 1 \
            or not cnp.PyArray_IS_C_CONTIGUOUS(ids) or not cnp.PyArray_ISNOTSWAPPED(ids) \
            or not cnp.PyArray_ISALIGNED(ids):
        if ids.dtype.kind == "u" and ids.dtype.itemsize == 8 and ids.max() > 0x7FFFFFFFFFFFFFFF:
            raise IndexError(f"token id {ids.max()} is out of range for {la.shape[0]} logits")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ids)
    cdef Py_ssize_t n = ids.shape[0], v = la.shape[0], i
    for i in range(n):
        if ip[i] < 0 or ip[i] >= v:
            raise IndexError(f"token id {ip[i]} is out of range for {v} logits")
    _reserve(v)
    cdef float *lp = <float *>cnp.PyArray_DATA(la)
    cdef float pen = float(penalty), x
    cdef int64_t t
    # mark each id on first sight so repeats are penalised once, then clear the marks
    for i in range(n):
        t = ip[i]
        if not _seen[t]:
            _seen[t] = 1
            x = lp[t]
            lp[t] = x / pen if x > 0 else x * pen
    for i in range(n):
        _seen[ip[i]] = 0
