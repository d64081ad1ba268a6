# Included by matmul.pyx and qmatmul.pyx: the instruction-set path (_isa.pxi), and argument
# checks for the matrix kernels, run with the GIL held so that bad input raises before any nogil
# code.
include "_isa.pxi"

cdef cnp.ndarray _check_2d(object a, str name, int typenum, str tname):
    """`a` as a 2-D C-contiguous ndarray of numpy type `typenum` (any type if -1)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if typenum >= 0 and cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name} must be {tname}, got {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous (shape {a.shape}, "
                         f"strides {a.strides})")
    return arr


cdef _check_out(cnp.ndarray out):
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("out is read-only")


cdef _check_no_overlap(cnp.ndarray out, cnp.ndarray a, str name):
    # out is written while a is still being read: overlapping buffers would give garbage.
    cdef size_t o0 = <size_t>cnp.PyArray_DATA(out), a0 = <size_t>cnp.PyArray_DATA(a)
    cdef size_t o1 = o0 + <size_t>cnp.PyArray_NBYTES(out), a1 = a0 + <size_t>cnp.PyArray_NBYTES(a)
    if o0 < a1 and a0 < o1:
        raise ValueError(f"out must not overlap {name}")
