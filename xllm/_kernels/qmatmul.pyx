"""Matrix multiply with GGUF Q8_0 weights (``x @ W.T``), the groundwork for native Q8_0 models.

The arithmetic lives in ``gemm_q8.h`` (AVX2, and AVX-512 VNNI where the CPU has it): x is
quantized to int8 per 32-value block on the fly, each block's int8 dot product is exact, and
the scaled block products are summed in float32 in block order, so every element of out is
bitwise independent of M, of its row, of the thread count and of the instruction-set path.
This module validates arguments at the Python boundary and splits the rows of W across threads.
"""
import os

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int8_t, uint8_t
from libc.stdlib cimport free, malloc

from xllm._kernels._cpu cimport get_num_threads
from xllm._kernels._cpu import features

cnp.import_array()

cdef extern from "gemm_q8.h" nogil:
    int XQ8_BLOCK_BYTES
    void xq8_quantize_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K,
                           int8_t *qx, float *dx)
    void xq8_panel(int isa, const int8_t *qx, const float *dx, size_t M, size_t K,
                   const uint8_t *w, size_t n0, size_t n1, float *out, size_t ldo, int accum)


# ---- instruction-set path ----

_ISAS = ("avx2", "avx512vnni")
cdef int _isa = 0  # index into _ISAS


def set_isa(name):
    """Select the kernel path: "avx2" or "avx512vnni" (ValueError if the CPU lacks it)."""
    global _isa
    if name not in _ISAS:
        raise ValueError(f"isa must be one of {_ISAS}, got {name!r}")
    if name == "avx512vnni" and not (features()["avx512"] and features()["avx512vnni"]):
        raise ValueError("this CPU lacks AVX-512 VNNI; use isa='avx2'")
    _isa = _ISAS.index(name)


def get_isa():
    """The kernel path in use: "avx2" or "avx512vnni"."""
    return _ISAS[_isa]


def _init_isa():
    # XLLM_ISA=avx2 forces the AVX2 path (as for matmul); otherwise the best the CPU has.
    want = os.environ.get("XLLM_ISA", "").strip().lower()
    f = features()
    if want == "avx2" or not (f["avx512"] and f["avx512vnni"]):
        set_isa("avx2")
    else:
        set_isa("avx512vnni")


_init_isa()


# ---- argument checks (all before any nogil code) ----

include "_matrix.pxi"


# Rows of W per parallel work item (a multiple of 8, the micro-kernel width).
cdef size_t _PANEL_ROWS = 64
# Products this small (multiply-adds) run on one thread.
cdef size_t _SERIAL_MAX_MACS = 1 << 16
# The quantized x of up to this many values (and its scales) lives on the stack (M <= 4).
cdef enum:
    _STACK_Q = 4 * 32768
    _STACK_D = _STACK_Q // 32


def matmul_q8_0(x, w_blocks, out, accumulate=False):
    """out[M, N] = x[M, K] @ W[N, K].T, or out += ... when accumulate; W in GGUF Q8_0.

    x: float32 [M, K], K a multiple of 32; w_blocks: uint8 [N, (K / 32) * 34] (per 32 weights,
    an fp16 scale then 32 int8 quants), may be read-only; out: float32 [M, N]. All
    C-contiguous. x is quantized to int8 per 32-value block (see gemm_q8.h), so the result
    carries the activation-quantization error of Q8_0 x Q8_0 products; each element is
    bitwise independent of M, of its row index, of the thread count and of the ISA path.
    """
    cdef cnp.ndarray xa = _check_2d(x, "x", cnp.NPY_FLOAT32, "float32")
    cdef cnp.ndarray wa = _check_2d(w_blocks, "w_blocks", cnp.NPY_UINT8, "uint8 (Q8_0 blocks)")
    cdef cnp.ndarray oa = _check_2d(out, "out", cnp.NPY_FLOAT32, "float32")
    _check_out(oa)
    cdef size_t M = <size_t>xa.shape[0], K = <size_t>xa.shape[1]
    cdef size_t N = <size_t>wa.shape[0]
    if K % 32:
        raise ValueError(f"K = {K} (x {x.shape}) is not a multiple of 32, the Q8_0 block size")
    cdef size_t rb = K // 32 * XQ8_BLOCK_BYTES
    if <size_t>wa.shape[1] != rb:
        raise ValueError(f"w_blocks must have {rb} bytes per row (K/32 blocks of 34 bytes) "
                         f"for x {x.shape}, got shape {w_blocks.shape}")
    if <size_t>oa.shape[0] != M or <size_t>oa.shape[1] != N:
        raise ValueError(f"out must have shape ({M}, {N}) for x {x.shape} and w_blocks "
                         f"{w_blocks.shape}, got {out.shape}")
    if M == 0 or N == 0:
        return
    _check_no_overlap(oa, xa, "x")
    _check_no_overlap(oa, wa, "w_blocks")

    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const uint8_t *wp = <const uint8_t *>cnp.PyArray_DATA(wa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef int isa = _isa
    cdef int acc = 1 if accumulate else 0
    cdef int nt = get_num_threads()
    if M * N * K < _SERIAL_MAX_MACS:
        nt = 1
    cdef size_t nb = _PANEL_ROWS
    cdef Py_ssize_t npanels = <Py_ssize_t>((N + nb - 1) // nb)
    if nt > npanels:
        nt = <int>npanels

    # quantized x: on the stack when small (decode), else one malloc per call
    cdef int8_t qstack[_STACK_Q]
    cdef float dstack[_STACK_D]
    cdef int8_t *qx = qstack
    cdef float *dx = dstack
    cdef void *mem = NULL
    if M * K > _STACK_Q:
        mem = malloc(M * K + M * (K // 32) * sizeof(float) + 64)
        if mem == NULL:
            raise MemoryError("matmul_q8_0: cannot allocate scratch memory for quantized x")
        dx = <float *>(((<size_t>mem) + 63) & ~(<size_t>63))
        qx = <int8_t *>(dx + M * (K // 32))

    cdef Py_ssize_t p, m
    cdef size_t n0, n1
    try:
        with nogil:
            if M < 8 or nt == 1:
                xq8_quantize_rows(xp, K, 0, M, K, qx, dx)
            else:
                for m in prange(<Py_ssize_t>M, schedule="static", num_threads=nt):
                    xq8_quantize_rows(xp, K, <size_t>m, <size_t>m + 1, K, qx, dx)
            if nt == 1:
                xq8_panel(isa, qx, dx, M, K, wp, 0, N, op, N, acc)
            else:
                # dynamic: which thread computes a panel never changes its bits
                for p in prange(npanels, schedule="dynamic", num_threads=nt):
                    n0 = <size_t>p * nb
                    n1 = min(n0 + nb, N)
                    xq8_panel(isa, qx, dx, M, K, wp, n0, n1, op, N, acc)
    finally:
        free(mem)
