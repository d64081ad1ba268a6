"""Row-wise kernels: rmsnorm, rope, softmax, silu_mul (semantics: ``reference.py``). Arguments
are validated with the GIL held; the loops then run without it, on several threads only when
there is enough work to pay for waking the team."""
include "_common.pxi"
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef enum:
    GRAIN = 16384  # below this many floats per thread a parallel region costs more than it saves


cdef inline int _threads(Py_ssize_t rows, Py_ssize_t work) noexcept nogil:
    """Threads for `rows` independent rows totalling `work` floats."""
    cdef Py_ssize_t t = min(<Py_ssize_t>get_num_threads(), work // GRAIN, rows)
    return <int>(t if t > 1 else 1)


def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight over the last axis; out may be x.

    The mean of squares is accumulated in double precision and x * (1/sqrt(ms + eps)) is rounded
    to float32 before the weight multiply, as the reference does (transformers' LlamaRMSNorm does
    the same in float32; the two differ by about an ulp).
    """
    cdef cnp.ndarray xa = _f32(x, "x", False, 0)
    cdef cnp.ndarray wa = _f32(weight, "weight", False, 1)
    cdef cnp.ndarray oa = _f32(out, "out", True, 0)
    if wa.shape[0] != xa.shape[xa.ndim - 1]:
        raise ValueError(f"weight shape {(<object>wa).shape} does not match the last axis of x "
                         f"{(<object>xa).shape}")
    _check_out_matches(oa, xa, "x")
    if _overlap(oa, wa, False):
        raise ValueError("out overlaps weight")
    cdef double e = float(eps), ms
    cdef Py_ssize_t d = wa.shape[0], i
    if d == 0:
        return
    cdef Py_ssize_t m = cnp.PyArray_SIZE(xa) // d
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const float *wp = <const float *>cnp.PyArray_DATA(wa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    for i in prange(m, nogil=True, num_threads=_threads(m, m * d), schedule="static"):
        ms = xllm_sumsq_f64(xp + i * d, d) / d
        xllm_rms_scale(xp + i * d, wp, 1.0 / sqrt(ms + e), op + i * d, d)


def rope(x, positions, cos, sin, n_heads, interleaved):
    """Rotate each head of x[M, n_heads*head_dim] in place by its row's position.

    positions: int64 (or int32) [M], each in [0, P) for the tables cos, sin: float32
    [P, head_dim/2] (IndexError otherwise). interleaved=True rotates pairs (2i, 2i+1) (Meta,
    llama2.c, GGUF); False rotates (i, i + head_dim/2) (Hugging Face rotate_half).
    """
    cdef cnp.ndarray xa = _f32(x, "x", True, 2)
    cdef cnp.ndarray ca = _f32(cos, "cos", False, 2)
    cdef cnp.ndarray sa = _f32(sin, "sin", False, 2)
    if (<object>sa).shape != (<object>ca).shape:
        raise ValueError(f"cos and sin differ in shape: {(<object>ca).shape}, {(<object>sa).shape}")
    # n_heads: OverflowError past Py_ssize_t; compared by division (nh * 2 * half can overflow,
    # 2 * half cannot: numpy keeps cos's row, half floats, under 2**63 bytes even with 0 rows)
    cdef Py_ssize_t nh = n_heads
    cdef Py_ssize_t half = ca.shape[1]  # pairs rotated per head
    cdef Py_ssize_t m = xa.shape[0]
    cdef Py_ssize_t n_pos = ca.shape[0]
    if nh < 1 or half < 1 or xa.shape[1] % (2 * half) or xa.shape[1] // (2 * half) != nh:
        raise ValueError(f"x has {xa.shape[1]} columns; expected n_heads ({nh}) * 2 * "
                         f"cos.shape[1] ({half})")
    cdef cnp.ndarray pa = _int64(positions, "positions")
    if pa.ndim != 1 or pa.shape[0] != m:
        raise ValueError(f"positions must be 1-D of length {m}, got shape {(<object>pa).shape}")
    cdef bint il = interleaved
    cdef Py_ssize_t i, h, j, ld = xa.shape[1]
    cdef float *xp = <float *>cnp.PyArray_DATA(xa)
    cdef const float *c0 = <const float *>cnp.PyArray_DATA(ca)
    cdef const float *s0 = <const float *>cnp.PyArray_DATA(sa)
    cdef const float *c
    cdef const float *s
    cdef float *v
    cdef float a, b
    # The threads read a private copy of positions: what is checked is what they use, even if x
    # shares memory with positions or another thread writes them meanwhile.
    cdef int64_t *pp = <int64_t *>malloc(m * sizeof(int64_t) + 1)
    if pp == NULL:
        raise MemoryError()
    try:
        memcpy(pp, cnp.PyArray_DATA(pa), m * sizeof(int64_t))
        for i in range(m):
            if pp[i] < 0 or pp[i] >= n_pos:
                raise IndexError(f"position {pp[i]} is outside the rope tables [0, {n_pos})")
        for i in prange(m, nogil=True, num_threads=_threads(m, m * ld), schedule="static"):
            c = c0 + pp[i] * half
            s = s0 + pp[i] * half
            for h in range(nh):  # two loops with constant strides, so that both vectorise
                v = xp + i * ld + h * 2 * half
                if il:  # pairs (2j, 2j+1)
                    for j in range(half):
                        a = v[2 * j]
                        b = v[2 * j + 1]
                        v[2 * j] = a * c[j] - b * s[j]
                        v[2 * j + 1] = a * s[j] + b * c[j]
                else:  # pairs (j, j + half), "rotate_half"
                    for j in range(half):
                        a = v[j]
                        b = v[j + half]
                        v[j] = a * c[j] - b * s[j]
                        v[j + half] = a * s[j] + b * c[j]
    finally:
        free(pp)


def softmax(x, out):
    """Softmax over the last axis; out may be x."""
    cdef cnp.ndarray xa = _f32(x, "x", False, 0)
    cdef cnp.ndarray oa = _f32(out, "out", True, 0)
    _check_out_matches(oa, xa, "x")
    cdef Py_ssize_t d = xa.shape[xa.ndim - 1], i, j
    if d == 0:
        return
    cdef Py_ssize_t m = cnp.PyArray_SIZE(xa) // d
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef int has_nan
    cdef float mx, inv
    for i in prange(m, nogil=True, num_threads=_threads(m, m * d), schedule="static"):
        mx = xllm_max_f32(xp + i * d, d, &has_nan)
        inv = 1.0 / xllm_exp_shift(xp + i * d, mx, op + i * d, d)
        for j in range(i * d, i * d + d):
            op[j] *= inv


def silu_mul(a, b, out):
    """out = silu(a) * b = a / (1 + exp(-a)) * b, elementwise; out may be a or b."""
    cdef cnp.ndarray aa = _f32(a, "a", False, 0)
    cdef cnp.ndarray ba = _f32(b, "b", False, 0)
    cdef cnp.ndarray oa = _f32(out, "out", True, 0)
    _check_out_matches(oa, aa, "a")
    _check_out_matches(oa, ba, "b")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(aa), c, lo
    cdef const float *ap = <const float *>cnp.PyArray_DATA(aa)
    cdef const float *bp = <const float *>cnp.PyArray_DATA(ba)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    # one equal chunk (a multiple of 8 floats) per thread: an exp costs as much as 8 floats of
    # the other kernels, so GRAIN // 8 floats per thread already pay for the parallel region
    cdef Py_ssize_t nt = _threads(n, 8 * n)
    cdef Py_ssize_t chunk = (n + 8 * nt - 1) // (8 * nt) * 8
    for c in prange(nt, nogil=True, num_threads=nt, schedule="static"):
        lo = c * chunk
        if lo < n:
            xllm_silu_mul(ap + lo, bp + lo, op + lo, min(n - lo, chunk))
