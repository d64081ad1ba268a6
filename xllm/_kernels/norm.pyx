"""Row-wise kernels: rmsnorm, rope, softmax, silu_mul (semantics: ``reference.py``).

Arguments are validated here, with the GIL held; the loops then run without it. Rows are split
across threads with prange only when there is enough work to pay for waking the team.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t

from xllm._kernels._cpu cimport get_num_threads

cnp.import_array()

cdef extern from "vecmath.h" nogil:
    double xllm_sumsq_f64(const float *x, Py_ssize_t n)
    void xllm_rms_scale(const float *x, const float *w, double inv, float *out, Py_ssize_t n)
    float xllm_max_f32(const float *x, Py_ssize_t n, int *has_nan)
    float xllm_exp_shift(const float *x, float shift, float *out, Py_ssize_t n)
    void xllm_scale_f32(float *x, float a, Py_ssize_t n)
    void xllm_silu_mul(const float *a, const float *b, float *out, Py_ssize_t n)

# Below this many floats per thread a parallel region costs more than it saves.
cdef enum:
    GRAIN = 16384


cdef inline cnp.ndarray _f32(object a, str name, bint write):
    """`a` as a float32, native-order, aligned, C-contiguous ndarray (TypeError/ValueError)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must be a native float32 array, got dtype {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    if cnp.PyArray_NDIM(arr) < 1:
        raise ValueError(f"{name} must have at least one dimension")
    return arr


cdef inline bint _partial_overlap(cnp.ndarray a, cnp.ndarray b):
    """True if a and b share memory without being the same buffer (unsafe in-place use)."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    if pa == pb and cnp.PyArray_NBYTES(a) == cnp.PyArray_NBYTES(b):
        return False
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef inline int _threads(Py_ssize_t rows, Py_ssize_t work) noexcept nogil:
    """Threads for `rows` independent rows totalling `work` floats."""
    cdef Py_ssize_t t = get_num_threads()
    cdef Py_ssize_t by_work = work // GRAIN
    if by_work < t:
        t = by_work
    if rows < t:
        t = rows
    return <int>(t if t > 1 else 1)


def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight over the last axis; out may be x.

    The mean of squares is accumulated in double precision and x * (1/sqrt(ms + eps)) is rounded
    to float32 before the weight multiply, as the reference does (transformers' LlamaRMSNorm does
    the same in float32; the two differ by about an ulp).
    """
    cdef cnp.ndarray xa = _f32(x, "x", False)
    cdef cnp.ndarray wa = _f32(weight, "weight", False)
    cdef cnp.ndarray oa = _f32(out, "out", True)
    if wa.ndim != 1 or wa.shape[0] != xa.shape[xa.ndim - 1]:
        raise ValueError(f"weight shape {(<object>wa).shape} does not match the last axis of x {(<object>xa).shape}")
    if (<object>oa).shape != (<object>xa).shape:
        raise ValueError(f"out shape {(<object>oa).shape} != x shape {(<object>xa).shape}")
    if _partial_overlap(xa, oa):
        raise ValueError("out overlaps x without being x")
    cdef double e = float(eps)
    cdef Py_ssize_t d = wa.shape[0]
    if d == 0:
        return
    cdef Py_ssize_t m = cnp.PyArray_SIZE(xa) // d
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const float *wp = <const float *>cnp.PyArray_DATA(wa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef int nt = _threads(m, m * d)
    cdef Py_ssize_t i
    cdef double ms
    for i in prange(m, nogil=True, num_threads=nt, schedule="static"):
        ms = xllm_sumsq_f64(xp + i * d, d) / d
        xllm_rms_scale(xp + i * d, wp, 1.0 / sqrt(ms + e), op + i * d, d)


cdef void _rope_rows(float *x, Py_ssize_t m, Py_ssize_t ld, const int64_t *pos, const float *cos,
                     const float *sin, Py_ssize_t half, Py_ssize_t n_heads, bint interleaved,
                     int nt) noexcept nogil:
    cdef Py_ssize_t i, h, j
    cdef float *v
    cdef const float *c
    cdef const float *s
    cdef float a, b
    for i in prange(m, num_threads=nt, schedule="static"):
        c = cos + pos[i] * half
        s = sin + pos[i] * half
        for h in range(n_heads):
            v = x + i * ld + h * 2 * half
            if interleaved:  # pairs (2j, 2j+1)
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


def rope(x, positions, cos, sin, n_heads, interleaved):
    """Rotate each head of x[M, n_heads*head_dim] in place by its row's position.

    positions: int64 (or int32) [M], each in [0, P) for the tables cos, sin: float32
    [P, head_dim/2] (IndexError otherwise). interleaved=True rotates pairs (2i, 2i+1) (Meta,
    llama2.c, GGUF); False rotates (i, i + head_dim/2) (Hugging Face rotate_half).
    """
    cdef cnp.ndarray xa = _f32(x, "x", True)
    cdef cnp.ndarray ca = _f32(cos, "cos", False)
    cdef cnp.ndarray sa = _f32(sin, "sin", False)
    if xa.ndim != 2:
        raise ValueError(f"x must be 2-D [M, n_heads*head_dim], got shape {(<object>xa).shape}")
    if ca.ndim != 2 or (<object>sa).shape != (<object>ca).shape:
        raise ValueError(f"cos and sin must be 2-D of equal shape, got {(<object>ca).shape} and {(<object>sa).shape}")
    cdef Py_ssize_t nh = n_heads
    cdef Py_ssize_t half = ca.shape[1]
    if nh < 1 or half < 1 or xa.shape[1] != nh * 2 * half:
        raise ValueError(f"x has {xa.shape[1]} columns; expected n_heads ({nh}) * 2 * "
                         f"cos.shape[1] ({half})")
    cdef cnp.ndarray pa = positions if isinstance(positions, np.ndarray) else np.asarray(positions)
    if pa.dtype.kind not in "iu":
        raise TypeError(f"positions must be an integer array, got dtype {pa.dtype}")
    if pa.ndim != 1 or pa.shape[0] != xa.shape[0]:
        raise ValueError(f"positions must be 1-D of length {xa.shape[0]}, got shape {(<object>pa).shape}")
    if cnp.PyArray_TYPE(pa) != cnp.NPY_INT64 or not cnp.PyArray_IS_C_CONTIGUOUS(pa) \
            or not cnp.PyArray_ISNOTSWAPPED(pa) or not cnp.PyArray_ISALIGNED(pa):
        pa = np.ascontiguousarray(pa, dtype=np.int64)
    cdef Py_ssize_t m = xa.shape[0]
    cdef Py_ssize_t n_pos = ca.shape[0]
    cdef const int64_t *pp = <const int64_t *>cnp.PyArray_DATA(pa)
    cdef Py_ssize_t i
    for i in range(m):
        if pp[i] < 0 or pp[i] >= n_pos:
            raise IndexError(f"position {pp[i]} is outside the rope tables [0, {n_pos})")
    if m == 0:
        return
    cdef bint il = bool(interleaved)
    cdef int nt = _threads(m, m * xa.shape[1])
    with nogil:
        _rope_rows(<float *>cnp.PyArray_DATA(xa), m, xa.shape[1], pp,
                   <const float *>cnp.PyArray_DATA(ca), <const float *>cnp.PyArray_DATA(sa),
                   half, nh, il, nt)


def softmax(x, out):
    """Softmax over the last axis; out may be x."""
    cdef cnp.ndarray xa = _f32(x, "x", False)
    cdef cnp.ndarray oa = _f32(out, "out", True)
    if (<object>oa).shape != (<object>xa).shape:
        raise ValueError(f"out shape {(<object>oa).shape} != x shape {(<object>xa).shape}")
    if _partial_overlap(xa, oa):
        raise ValueError("out overlaps x without being x")
    cdef Py_ssize_t d = xa.shape[xa.ndim - 1]
    if d == 0:
        return
    cdef Py_ssize_t m = cnp.PyArray_SIZE(xa) // d
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef int nt = _threads(m, m * d)
    cdef Py_ssize_t i
    cdef int has_nan
    cdef float mx, total
    for i in prange(m, nogil=True, num_threads=nt, schedule="static"):
        mx = xllm_max_f32(xp + i * d, d, &has_nan)
        total = xllm_exp_shift(xp + i * d, mx, op + i * d, d)
        xllm_scale_f32(op + i * d, 1.0 / total, d)


def silu_mul(a, b, out):
    """out = silu(a) * b = a / (1 + exp(-a)) * b, elementwise; out may be a or b."""
    cdef cnp.ndarray aa = _f32(a, "a", False)
    cdef cnp.ndarray ba = _f32(b, "b", False)
    cdef cnp.ndarray oa = _f32(out, "out", True)
    if (<object>ba).shape != (<object>aa).shape or (<object>oa).shape != (<object>aa).shape:
        raise ValueError(f"a, b and out must have one shape, got {(<object>aa).shape}, {(<object>ba).shape}, "
                         f"{(<object>oa).shape}")
    if _partial_overlap(aa, oa) or _partial_overlap(ba, oa):
        raise ValueError("out overlaps a or b without being it")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(aa)
    cdef const float *ap = <const float *>cnp.PyArray_DATA(aa)
    cdef const float *bp = <const float *>cnp.PyArray_DATA(ba)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    # split the flat array into chunks (multiples of 8) so one long row also uses all threads
    cdef Py_ssize_t chunk = GRAIN
    cdef Py_ssize_t nchunks = (n + chunk - 1) // chunk
    cdef int nt = _threads(nchunks, n)
    cdef Py_ssize_t c, lo, cnt
    for c in prange(nchunks, nogil=True, num_threads=nt, schedule="static"):
        lo = c * chunk
        cnt = n - lo
        if cnt > chunk:
            cnt = chunk
        xllm_silu_mul(ap + lo, bp + lo, op + lo, cnt)
