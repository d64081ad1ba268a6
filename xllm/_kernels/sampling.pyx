"""Token selection: argmax, repetition penalty, and temperature/top-k/top-p/min-p sampling.

Semantics are those of ``reference.py``, in double precision: the chosen token agrees with the
reference unless u, top_p or min_p sit within ~1e-9 of a decision boundary.

``sample`` never sorts the vocabulary. One pass gives every token its weight exp(-d), d = (max -
logit) / temperature, and its bucket floor(d * PER_NAT) (bucket order is rank order); counts and
masses per bucket bound the buckets holding the top-k, top-p, min-p and draw boundaries. Only
those are gathered, as keys ordering by (logit descending, id ascending); each stage is a
weighted quickselect on them, rerun on the whole vocabulary if rounding put a boundary past
them. The scratch buffers are module-level and grow with V only; they are used with the GIL
held (well under a millisecond), which keeps them thread-safe."""
include "_common.pxi"
from libc.math cimport log
from libc.stdlib cimport realloc
from libc.string cimport memcpy, memset

cdef extern from "sampling.h" nogil:
    void xllm_weights(const float *l, Py_ssize_t n, double top, double inv_t, double per_nat,
                      int nb, uint16_t *bucket, double *w, Py_ssize_t *cnt, double *mass)
    Py_ssize_t xllm_find_u16(const uint16_t *a, Py_ssize_t n, uint16_t lo, uint16_t hi,
                             int32_t *out)

cdef enum:
    NB = 4096    # buckets of 1/PER_NAT nat; the last holds everything >= (NB-1)/PER_NAT down
cdef double PER_NAT = 64.0  # buckets per nat of distance below the top logit
cdef double EPS = 1e-9  # slack for bucket sums vs rank-order sums
cdef uint64_t ID = 0xFFFFFFFF            # the id bits of a key


cdef cnp.ndarray _logits(object a, bint write):
    cdef cnp.ndarray arr = _f32(a, "logits", write, 1)
    if not 0 < arr.shape[0] <= 0x7FFFFFFF:
        raise ValueError(f"logits must hold 1 to 2**31 - 1 values, got {arr.shape[0]}")
    return arr


cdef Py_ssize_t _argmax(const float *x, Py_ssize_t n) noexcept nogil:
    """First index of the largest value; the first NaN if any (numpy's convention)."""
    cdef int has_nan
    cdef float m = xllm_max_f32(x, n, &has_nan)
    return xllm_find_first(x, n, <float>(0.0 / 0.0) if has_nan else m)


def argmax(x):
    """Index of the largest value of a 1-D float32 array (the first one on ties)."""
    cdef cnp.ndarray a = _logits(x, False)
    return int(_argmax(<const float *>cnp.PyArray_DATA(a), a.shape[0]))


# ---------------- scratch ----------------

cdef uint16_t *_bucket = NULL  # [V] bucket of each token
cdef int32_t *_ids = NULL      # [V] ids of the gathered tokens (candidates)
cdef float *_lc = NULL         # [V] their logits
cdef double *_w = NULL         # [V] their exp(-d) (the top token has 1)
cdef uint64_t *_keys = NULL    # [V] their keys (see _key)
cdef uint8_t *_seen = NULL     # [V] marks for apply_repetition_penalty, kept all-zero
cdef Py_ssize_t _cap = 0
cdef Py_ssize_t _cc[NB]        # tokens in buckets 0..b
cdef double _cm[NB]            # mass of buckets 0..b
cdef uint64_t _rng = 0x9E3779B97F4A7C15  # xorshift state for quickselect pivots


cdef int _reserve(Py_ssize_t v) except -1:
    """Grow the scratch buffers to hold v tokens: one block of 27 bytes per token, carved up."""
    global _keys, _w, _ids, _lc, _bucket, _seen, _cap
    if v <= _cap:
        return 0
    cdef char *p = <char *>realloc(_keys, v * 27)
    if p == NULL:
        raise MemoryError()
    _keys = <uint64_t *>p
    _w = <double *>(p + 8 * v)
    _ids = <int32_t *>(p + 16 * v)
    _lc = <float *>(p + 20 * v)
    _bucket = <uint16_t *>(p + 24 * v)
    _seen = <uint8_t *>(p + 26 * v)
    memset(_seen, 0, v)
    _cap = v
    return 0


# ---------------- weighted selection on keys ----------------

cdef inline uint64_t _key(float logit, Py_ssize_t i) noexcept nogil:
    """Key sorting ascending as (logit descending, i ascending); i indexes the candidates, which
    are gathered in id order."""
    cdef float f = logit + <float>0.0  # -0.0 -> +0.0: equal logits must tie
    cdef uint32_t u
    memcpy(&u, &f, 4)
    # float bits to an unsigned order (flip all bits of negatives, the sign bit of others), inverted
    u = u ^ (<uint32_t>(<int32_t>u >> 31) | <uint32_t>0x80000000)
    return ((<uint64_t>(~u)) << 32) | <uint64_t>i


cdef inline double _wt(uint64_t key, bint unit) noexcept nogil:
    return 1.0 if unit else _w[key & ID]


cdef inline bint _crossed(double s, double target, bint strict) noexcept nogil:
    return s > target if strict else s >= target


cdef Py_ssize_t _select(uint64_t *a, Py_ssize_t n, double target, bint strict, bint unit,
                        double *cum) noexcept nogil:
    """The first rank r whose running weight (over ranks 0..r; weight 1 if unit, else _w)
    exceeds (strict) or reaches target; a[:n] is permuted so that a[:r+1] holds ranks 0..r, and
    *cum gets their weight. -1 if no rank does: a[n-1] then holds the last rank, *cum the total."""
    global _rng
    cdef Py_ssize_t lo = 0, hi = n, i, j
    cdef double before = 0.0, m
    cdef uint64_t x, pivot
    cdef bint lt
    while hi > lo:  # quickselect with a random pivot, moved to a[hi-1]; a[:lo] holds ranks 0..lo-1
        _rng ^= _rng << 13
        _rng ^= _rng >> 7
        _rng ^= _rng << 17
        j = lo + <Py_ssize_t>(_rng % <uint64_t>(hi - lo))
        pivot, a[j] = a[j], a[hi - 1]
        j = lo
        m = 0.0
        for i in range(lo, hi - 1):  # branch-free Lomuto: a[lo:j] < pivot <= a[j:i+1]
            x = a[i]
            a[i], a[j] = a[j], x
            lt = x < pivot
            j += lt
            m += lt * _wt(x, unit)
        a[hi - 1], a[j] = a[j], pivot
        if j > lo and _crossed(before + m, target, strict):
            hi = j  # the first crossing is in a[lo:j]
        else:
            before += m + _wt(pivot, unit)
            if _crossed(before, target, strict):
                cum[0] = before
                return j
            lo = j + 1
    cum[0] = before  # rounding may leave a narrowed range uncrossed: take its end
    return hi - 1 if hi < n else -1


cdef double _mass(const uint64_t *a, Py_ssize_t n) noexcept nogil:
    cdef double s = 0.0
    cdef Py_ssize_t i
    for i in range(n):
        s += _w[a[i] & ID]
    return s


# ---------------- sample ----------------

cdef int _first(double target, bint strict) noexcept nogil:
    """The first bucket at whose end the running mass exceeds (strict) or reaches target."""
    cdef int b = 0
    while b < NB - 1 and not _crossed(_cm[b], target, strict):
        b += 1
    return b


cdef Py_ssize_t _draw(const float *l, Py_ssize_t v, double top, double inv_t, Py_ssize_t k,
                      double tp, double mp, double u, int b0, int b1, bint drop) noexcept nogil:
    """The token drawn from buckets b0..b1, which must hold every stage boundary (b0 > 0 only
    without top-k/top-p/min-p; drop: min-p rejects every token past b1); -1 if a boundary turns
    out to lie past b1."""
    cdef Py_ssize_t n = xllm_find_u16(_bucket, v, <uint16_t>b0, <uint16_t>b1, _ids), i, j, r
    cdef Py_ssize_t below = _cc[b0 - 1] if b0 > 0 else 0
    cdef double before = _cm[b0 - 1] if b0 > 0 else 0.0  # the mass of the buckets below b0
    cdef double mass = _cm[NB - 1]
    cdef double cum
    cdef bint tail = below + n < v  # tokens past b1, unordered, take part
    if n == 0:
        return -1
    for i in range(n):
        _lc[i] = l[_ids[i]]
        _keys[i] = _key(_lc[i], i)
    xllm_weights(_lc, n, top, inv_t, PER_NAT, NB, NULL, _w, NULL, NULL)
    if k < v:
        _select(_keys, n, k - 0.5, True, True, &cum)
        n = k
        mass = _mass(_keys, n)
        tail = False
    if tp < 1.0:  # keep ranks 0..r, r the first whose running mass reaches tp * mass
        r = _select(_keys, n, tp * mass, False, False, &cum)
        if r >= 0:
            n = r + 1
            tail = False
        elif tail and not drop:
            return -1
        mass = cum
    if mp > 0.0:  # keep tokens with exp(-d) >= min_p, at least the top one (a tail is dropped)
        j = 0
        for i in range(n):
            if _w[_keys[i] & ID] >= mp:
                _keys[i], _keys[j] = _keys[j], _keys[i]
                j += 1
        if j == 0:
            _select(_keys, n, 0.5, True, True, &cum)
            j = 1
        n = j
        mass = _mass(_keys, n)
        tail = False
    r = _select(_keys, n, u * mass - before, True, False, &cum)
    if r < 0:
        if tail:
            return -1
        r = n - 1  # u rounded past the total: the last candidate
    return _ids[_keys[r] & ID]


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
    cdef Py_ssize_t v = a.shape[0], k = v
    cdef double t = float(temperature)
    cdef double tp = float(top_p)
    cdef double mp = float(min_p)
    cdef double uu = float(u)
    cdef double x
    if not t > 0:
        if t != t:
            raise ValueError("temperature is NaN")
        return int(_argmax(l, v))
    if top_k > 0 and top_k < v:
        k = top_k
    cdef int has_nan, b, b0 = 0, b1 = NB - 1, bm = NB - 1
    cdef float top = xllm_max_f32(l, v, &has_nan)
    if has_nan or not (-INFINITY < top < INFINITY):
        raise ValueError("logits must not hold NaN or +inf, and must not all be -inf")
    if k == 1:  # only the top token survives
        return int(_argmax(l, v))
    _reserve(v)
    memset(_cc, 0, sizeof(_cc))
    memset(_cm, 0, sizeof(_cm))
    xllm_weights(l, v, top, 1.0 / t, PER_NAT, NB, _bucket, NULL, _cc, _cm)
    for b in range(1, NB):
        _cc[b] += _cc[b - 1]
        _cm[b] += _cm[b - 1]
    # buckets that must be gathered: every stage boundary lies in b0..b1
    if mp > 0.0:  # tokens past bm have exp(-d) < min_p * exp(-1/PER_NAT)
        x = 2.0 - log(mp) * PER_NAT
        if x < NB - 1:
            bm = <int>x if x > 0 else 0
    if k < v:  # top-k needs its whole set, later stages stay inside it
        b1 = 0
        while _cc[b1] < k:
            b1 += 1
    else:
        if tp < 1.0:
            b1 = _first(tp * _cm[NB - 1] * (1 + EPS), False)
        b1 = min(b1, bm)
        if not (tp < 1.0 or mp > 0.0):  # plain: the draw's target is known, bound it both sides
            b0 = _first(uu * _cm[NB - 1] * (1 - EPS), True)
            b1 = _first(uu * _cm[NB - 1] * (1 + EPS), True)
    # The GIL stays held: the module-level scratch must not be shared by concurrent calls.
    cdef Py_ssize_t r = _draw(l, v, top, 1.0 / t, k, tp, mp, uu, b0, b1, mp > 0.0 and b1 >= bm)
    if r < 0:
        r = _draw(l, v, top, 1.0 / t, k, tp, mp, uu, 0, NB - 1, False)
    return int(r)


# ---------------- repetition penalty ----------------

def apply_repetition_penalty(logits, token_ids, penalty):
    """In place, once per distinct id in token_ids: logit / penalty if > 0 else logit * penalty.

    token_ids: integer array (or sequence) of ids in [0, V); IndexError otherwise, before any
    change. The arithmetic is float32, as in the reference.
    """
    cdef cnp.ndarray la = _logits(logits, True)
    if np.size(token_ids) == 0:
        return
    # a private copy (flatten copies): the ids checked are the ids used, even if logits share
    # their memory or code without the GIL writes them meanwhile
    cdef cnp.ndarray ids = _int64(token_ids, "token_ids").flatten()
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ids)
    cdef Py_ssize_t n = ids.shape[0], v = la.shape[0], i
    for i in range(n):
        if ip[i] < 0 or ip[i] >= v:
            raise IndexError(f"token id {ip[i]} is out of range for {v} logits")
    _reserve(v)
    cdef float *lp = <float *>cnp.PyArray_DATA(la)
    cdef float pen = float(penalty), y
    for i in range(n):  # mark each id on first sight so repeats count once, then clear the marks
        if not _seen[ip[i]]:
            _seen[ip[i]] = 1
            y = lp[ip[i]]
            lp[ip[i]] = y / pen if y > 0 else y * pen
    for i in range(n):
        _seen[ip[i]] = 0
