# Included by matmul.pyx and qmatmul.pyx: what every kernel module shares (_common.pxi), the
# instruction-set path (_isa.pxi), and the argument checks of the matrix kernels, run with the GIL
# held so that bad input raises before any nogil code.
include "_common.pxi"
include "_isa.pxi"

# Products of fewer multiply-adds (M * N * K) than this run on one thread: waking a second one
# would cost more than it saves.
cdef size_t _SERIAL_MAX_MACS = 1 << 16

cdef cnp.ndarray _check_2d(object a, str name, int typenum, str tname):
    """`a` as a 2-D C-contiguous, aligned ndarray of numpy type `typenum` (any type if -1) in
    native byte order (TypeError or ValueError otherwise)."""
    if not cnp.PyArray_Check(a):  # (isinstance(a, np.ndarray) in a nanosecond)
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if typenum >= 0 and cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name} must be {tname}, got {arr.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(arr):  # the numpy type of '>f4' is float32 too
        raise TypeError(f"{name} must be in native byte order, got dtype {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be C-contiguous and aligned (shape {a.shape}, "
                         f"strides {a.strides})")
    return arr


cdef cnp.ndarray _check_ids(object ids):
    """Token ids (a 1-D int32 or int64 array or an integer sequence) as a private int64 copy:
    the ids checked are the ids used, even if out shares their memory or another thread writes
    them meanwhile. TypeError, OverflowError (Python ints past int64) or ValueError otherwise;
    the range is the caller's to check."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(ids):
        a = <cnp.ndarray>ids
    else:
        a = np.asarray(ids)
        if a.size == 0:  # [] is float64 to numpy
            a = a.astype(np.int64)
    if a.dtype.kind == "O":  # Python ints past the int64 range, or not ints at all
        a = np.array([operator.index(v) for v in a.flat], np.int64).reshape((<object>a).shape)
    if cnp.PyArray_TYPE(a) not in (cnp.NPY_INT32, cnp.NPY_INT64) or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"ids must be native int32 or int64, got {a.dtype}")
    if cnp.PyArray_NDIM(a) != 1:
        raise ValueError(f"ids must be 1-D, got shape {(<object>a).shape}")
    return np.array(a, np.int64)  # (a copy)


cdef _check_writeable(cnp.ndarray out):
    """ValueError if out is read-only."""
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("out is read-only")


cdef _check_no_overlap(cnp.ndarray out, cnp.ndarray a, str name):
    """ValueError if out shares memory with a: out is written while a is still being read, so
    overlapping buffers would give garbage."""
    if _overlap(out, a, False):
        raise ValueError(f"out must not overlap {name}")
