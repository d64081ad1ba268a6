"""Matrix multiply and embedding lookup with group-quantized weights (xllm.quant.QTensor): the
argument checks at the Python boundary and the split of W's panels across threads. The arithmetic
(AVX2, AVX-512 VNNI) and why it is bitwise batch-invariant: gemm_q.h."""
import os

import numpy as np

cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc

from xllm._kernels._cpu cimport get_num_threads
from xllm._kernels._cpu import features
from xllm.quant import QTensor, check_qtensor

cnp.import_array()

cdef extern from "gemm_q.h" nogil:
    ctypedef struct xq_weights:
        const uint8_t *qs
        const uint8_t *scales
        const uint8_t *mins
        size_t nb, ng
        int bits, gshift, f32, parts
    ctypedef struct xq_xb:
        pass
    void xq_quantize_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K,
                          int parts, xq_xb *qx)
    void xq_panels(int isa, const xq_weights *w, size_t p0, size_t p1, const xq_xb *x,
                   size_t M, size_t N, float *out, int accum)
    void xq_dequant_row(const xq_weights *w, size_t r, float *o)
    void xq_barrier()
    enum: XQ_X_BYTES, XQ_OWN_M


# ---- instruction-set path (set_isa, get_isa: _matrix.pxi) ----

_ISAS = ("avx2", "avx512vnni")
_NEEDS = {"avx512vnni": ("avx512", "avx512vnni")}

include "_matrix.pxi"
_init_isa()


cdef bint _fits(object a, Py_ssize_t d0, Py_ssize_t d1, Py_ssize_t d2, int t1, int t2):
    """Whether `a` is a C-contiguous [d0, d1, d2] ndarray of numpy type t1 or t2."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray x = <cnp.ndarray>a
    return (x.ndim == 3 and x.shape[0] == d0 and x.shape[1] == d1 and x.shape[2] == d2 and
            cnp.PyArray_TYPE(x) in (t1, t2) and cnp.PyArray_IS_C_CONTIGUOUS(x))


cdef xq_weights _weights(object w) except *:
    """The C view of QTensor `w`, re-validated (its arrays are plain attributes): the common
    case by a quick check here (1.4 us less per call), anything else by check_qtensor."""
    if type(w) is not QTensor:
        raise TypeError(f"w must be an xllm.quant.QTensor, got {type(w).__name__}")
    n, k = w.shape
    cdef object g = w.group, parts = w.parts, mn = w.mins
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>w.scales) if cnp.PyArray_Check(w.scales) else -1
    cdef Py_ssize_t p = (n + 15) // 16
    if not (type(g) is int and type(parts) is int and parts in (2, 3) and g >= 32 and
            not g & (g - 1) and k % g == 0 and (w.bits == 8 or (w.bits == 4 and g == 32)) and
            _fits(w.qs, p, k // 32, 512 if w.bits == 8 else 256, cnp.NPY_UINT8, cnp.NPY_UINT8)
            and _fits(w.scales, p, k // g, 16, cnp.NPY_FLOAT16, cnp.NPY_FLOAT32) and
            (mn is None or (w.bits == 4 and _fits(mn, p, k // g, 16, t, t)))):
        check_qtensor(w, "qmatmul")  # raises with the details (or accepts a rarer form)
    cdef xq_weights c
    cdef cnp.ndarray qs = w.qs, sc = w.scales
    c.qs = <const uint8_t *>cnp.PyArray_DATA(qs)
    c.scales = <const uint8_t *>cnp.PyArray_DATA(sc)
    c.mins = NULL if w.mins is None else <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>w.mins)
    c.nb, c.ng = <size_t>qs.shape[1], <size_t>sc.shape[1]
    c.bits, c.f32, c.parts = w.bits, sc.dtype == np.float32, w.parts
    c.gshift = (w.group // 32).bit_length() - 1
    return c


# Rows of x per parallel work item (with one panel of W): at most 128, and their quantized
# blocks at most _X_BYTES, so that they stay in L2 while the item's panel streams past them.
cdef size_t _ROWS = 128, _X_BYTES = XQ_X_BYTES
cdef size_t _SERIAL_MAX_MACS = 1 << 16  # products this small (multiply-adds) run on one thread
cdef size_t _OWN_M = XQ_OWN_M
cdef enum:
    _STACK_B = 8 * 8192 // 32  # quantized x of up to this many blocks (128 B) lives on the stack
    _MAXW = 4  # weights sharing one x in a call


def qmatmul(x, w, out, accumulate=False):
    """out[M, N] = x[M, K] @ W[N, K].T, or out += ... when accumulate, W a QTensor.

    x, out: float32, C-contiguous. w and out may also be equal-length tuples (up to 4) of
    weights and outputs sharing the input x, which is then quantized once and all products run
    in one parallel loop (equal ``parts`` required). x is quantized per 32-value block into
    ``w.parts`` int8 parts (gemm_q.h): the result carries that (about 16-bit, 23-bit for 3 parts)
    error; each element is bitwise independent of M, its row, the thread count and the ISA path.
    """
    ws, outs = (w, out) if type(w) is tuple else ((w,), (out,))
    if type(outs) is not tuple or not 1 <= len(ws) == len(outs) <= _MAXW:
        raise ValueError(f"w and out must be a QTensor and an array, or two tuples of the same "
                         f"length (1..{_MAXW})")
    cdef cnp.ndarray xa = _check_2d(x, "x", cnp.NPY_FLOAT32, "float32")
    cdef size_t M = <size_t>xa.shape[0], K = <size_t>xa.shape[1], nw = len(ws), j
    cdef xq_weights cw[_MAXW]
    cdef float *ops[_MAXW]
    cdef size_t Ns[_MAXW]
    cdef Py_ssize_t first[_MAXW + 1]  # first panel of each weight in the joint panel list
    cdef cnp.ndarray oa
    first[0] = 0
    for j in range(nw):
        cw[j] = _weights(ws[j])
        if cw[j].parts != cw[0].parts:
            raise ValueError(f"weights sharing x need equal parts: {cw[0].parts}, {cw[j].parts}")
        oa = _check_2d(outs[j], "out", cnp.NPY_FLOAT32, "float32")
        _check_out(oa)
        Ns[j] = <size_t>ws[j].shape[0]
        if K != <size_t>ws[j].shape[1]:
            raise ValueError(f"x has {K} columns but W {ws[j].shape} has {ws[j].shape[1]}")
        if <size_t>oa.shape[0] != M or <size_t>oa.shape[1] != Ns[j]:
            raise ValueError(f"out must have shape ({M}, {Ns[j]}) for x {x.shape} and W "
                             f"{ws[j].shape}, got {outs[j].shape}")
        _check_no_overlap(oa, xa, "x")
        ops[j] = <float *>cnp.PyArray_DATA(oa)
        first[j + 1] = first[j] + <Py_ssize_t>((Ns[j] + 15) // 16)
    cdef Py_ssize_t npanels = first[nw]
    if M == 0 or npanels == 0:
        return
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef int isa = _isa, acc = 1 if accumulate else 0, nt = get_num_threads()
    if M * K * <size_t>npanels * 16 < _SERIAL_MAX_MACS:
        nt = 1
    nt = <int>min(<Py_ssize_t>nt, npanels * <Py_ssize_t>M)

    # quantized x (xq_xb blocks, cache-line aligned): on the stack when small, else malloc
    cdef size_t nb = K // 32, m0, m1
    cdef char qstack[128 * _STACK_B + 64]
    cdef void *mem = NULL
    # up to _OWN_M rows, each thread quantizes all of x into its own copy: no barrier
    cdef bint own = M <= _OWN_M and nt > 1
    cdef size_t copies = <size_t>nt if own else 1
    if copies * M * nb > _STACK_B:
        mem = malloc(128 * copies * M * nb + 64)
        if mem == NULL:
            raise MemoryError("qmatmul: cannot allocate scratch memory for the quantized x")
    cdef xq_xb *qx = <xq_xb *>((<size_t>(mem or qstack) + 63) & ~(<size_t>63))
    cdef xq_xb *qxt
    cdef Py_ssize_t it, m, p
    cdef size_t rows = max(8, min(_ROWS, _X_BYTES // (128 * nb)))
    cdef Py_ssize_t nitems = npanels * <Py_ssize_t>((M + rows - 1) // rows)
    try:
        # One parallel region (each costs microseconds): the threads quantize rows of x, wait,
        # then take work items (block of `rows` rows of x) x (panel of one W); static, so each
        # thread streams one contiguous run of panels (SmolLM2 int4 decode: 167 -> 237 tok/s
        # against dynamic). Which thread computes an item never changes its bits.
        with nogil, parallel(num_threads=nt):
            qxt = qx
            if own:
                qxt = qx + threadid() * M * nb
                xq_quantize_rows(xp, K, 0, M, K, cw[0].parts, qxt)
            else:
                for m in prange(<Py_ssize_t>M, schedule="static"):
                    xq_quantize_rows(xp, K, <size_t>m, <size_t>m + 1, K, cw[0].parts, qx)
                xq_barrier()  # Cython's prange ends with nowait
            for it in prange(nitems, schedule="static"):
                m0 = (it // npanels) * rows
                m1 = min(m0 + rows, M)
                p = it % npanels
                j = 0
                while p >= first[j + 1]:
                    j = j + 1
                p = p - first[j]
                xq_panels(isa, &cw[j], p, p + 1, qxt + m0 * nb, m1 - m0, Ns[j],
                          ops[j] + m0 * Ns[j], acc)
    finally:
        free(mem)


def qembedding(table, ids, out):
    """out[i, :] = row ids[i] of the QTensor `table`, dequantized to float32 (exactly as
    ``QTensor.dequantize``); IndexError for an id outside 0 .. V-1."""
    cdef xq_weights cw = _weights(table)
    cdef cnp.ndarray oa = _check_2d(out, "out", cnp.NPY_FLOAT32, "float32")
    _check_out(oa)
    cdef cnp.ndarray ia = np.ascontiguousarray(ids, dtype=np.int64)
    cdef size_t n = <size_t>ia.shape[0], V = <size_t>table.shape[0], D = <size_t>table.shape[1]
    if ia.ndim != 1 or <size_t>oa.shape[0] != n or <size_t>oa.shape[1] != D:
        raise ValueError(f"out must have shape ({n}, {D}) for {n} ids (1-D) and table "
                         f"{table.shape}, got {out.shape}")
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ia)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef size_t i
    for i in range(n):
        if ip[i] < 0 or <size_t>ip[i] >= V:
            raise IndexError(f"token id {ip[i]} out of range for an embedding table of {V} rows")
    with nogil:
        for i in range(n):
            xq_dequant_row(&cw, <size_t>ip[i], op + i * D)

