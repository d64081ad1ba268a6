# Included by every kernel module (matmul.pyx and qmatmul.pyx through _matrix.pxi): the imports
# they share, the declarations of vecmath.h (the vector helpers), and the argument checks, which
# run with the GIL held so that bad input raises before any nogil code.
import operator

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from xllm._kernels._cpu cimport get_num_threads

cnp.import_array()

cdef extern from "vecmath.h" nogil:
    float xllm_max_f32(const float *x, Py_ssize_t n, int *has_nan)
    Py_ssize_t xllm_find_first(const float *x, Py_ssize_t n, float v)
    double xllm_sumsq_f64(const float *x, Py_ssize_t n)
    void xllm_rms_scale(const float *x, const float *w, double inv, float *out, Py_ssize_t n)
    float xllm_exp_shift(const float *x, float shift, float *out, Py_ssize_t n)
    void xllm_silu_mul(const float *a, const float *b, float *out, Py_ssize_t n)
    void xllm_barrier()


cdef cnp.ndarray _f32(object a, str name, bint write, int ndim, bint f16=False):
    """`a` as a native-order, aligned, C-contiguous float32 (float16 if f16) ndarray with ndim
    dimensions (any number >= 1 if ndim is 0), writeable if `write`; TypeError or ValueError
    otherwise."""
    if not cnp.PyArray_Check(a):  # (isinstance(a, np.ndarray) in a nanosecond)
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int want = cnp.NPY_FLOAT16 if f16 else cnp.NPY_FLOAT32
    if cnp.PyArray_TYPE(arr) != want or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must be a native {'float16' if f16 else 'float32'} array, "
                        f"got dtype {arr.dtype}")
    if (arr.ndim != ndim) if ndim else (arr.ndim < 1):
        raise ValueError(f"{name} must be {ndim or 'at least 1'}-D, "
                         f"got shape {(<object>arr).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    return arr


cdef cnp.ndarray _int64(object a, str name):
    """An integer array or sequence as a native, aligned, C-contiguous int64 ndarray: TypeError
    if it holds no integers or is in non-native byte order, OverflowError for Python ints past
    the int64 range, IndexError for uint64 values past it."""
    cdef cnp.ndarray arr
    if cnp.PyArray_Check(a):
        arr = <cnp.ndarray>a
    else:
        arr = np.asarray(a)
        if arr.size == 0:  # [] is float64 to numpy
            arr = arr.astype(np.int64)
    if cnp.PyArray_TYPE(arr) == cnp.NPY_INT64 and cnp.PyArray_ISNOTSWAPPED(arr) \
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr):
        return arr
    if not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must be in native byte order, got dtype {arr.dtype}")
    if arr.dtype.kind == "O":  # Python ints past int64, or other objects: each must be an int
        ints = [operator.index(v) for v in arr.flat]
        return np.array(ints, np.int64).reshape((<object>arr).shape)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and \
            arr.max() > 0x7FFFFFFFFFFFFFFF:
        raise IndexError(f"{name} holds {arr.max()}, which is out of range")
    return np.require(arr, np.int64, "CA")


cdef inline bint _in_range(int64_t start, int64_t n, int64_t cap) noexcept:
    """Whether 0 <= start and start + n <= cap, for 0 <= n and 0 <= cap: written so that it
    cannot overflow (start + n can, for a start near 2**63)."""
    return 0 <= start and n <= cap and start <= cap - n


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b, bint same_ok):
    """True if a and b share memory, unless same_ok and they are exactly the same buffer."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    if same_ok and pa == pb and cnp.PyArray_NBYTES(a) == cnp.PyArray_NBYTES(b):
        return False
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef _check_out_matches(cnp.ndarray out, cnp.ndarray src, str name):
    """ValueError unless out has src's shape and is either src itself (the kernel works in
    place) or shares no memory with it."""
    if (<object>out).shape != (<object>src).shape:
        raise ValueError(f"out shape {(<object>out).shape} != {name} shape {(<object>src).shape}")
    if _overlap(out, src, True):
        raise ValueError(f"out overlaps {name} without being {name}")
