"""Matrix multiply (``x @ w.T``) and embedding lookup: argument checks, the instruction-set path
and the split of w's rows across threads. The arithmetic (AVX2, AVX-512) and why it is bitwise
independent of the batch size and the thread count: gemm.h; bfloat16 weights on AMX tiles (the
"amx" paths): gemm_amx_bf16.h."""
include "_matrix.pxi"
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport parallel, threadid
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from "gemm.h" nogil:
    int XW_F32, XW_F16, XW_BF16
    int XLLM_NR2, XLLM_NR5, XLLM_KC
    size_t XLLM_ACCBUF_FLOATS
    size_t xllm_mr(int isa)
    void xllm_pack_x(int isa, const float *x, size_t ldx, size_t M, size_t K, size_t kc,
                     size_t g, float *xpk)
    void xllm_gemm_panel(int isa, const float *x, size_t ldx, const float *xpk, size_t M,
                         size_t K, const void *w, int wt, size_t ldw, size_t n0, size_t n1,
                         float *out, size_t ldo, int accum, float *scratch, size_t ldk,
                         float *accbuf, size_t kc)
    void xllm_embedding(const void *table, int wt, size_t D, const int64_t *ids, size_t n,
                        float *out)

cdef extern from "gemm_amx_bf16.h" nogil:
    enum: XB_PARTS
    void xb_split_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K, size_t kp,
                       size_t M, uint16_t *xs)
    void xb_item(int hw, const uint16_t *xs, size_t M, size_t kp, size_t m0, size_t m1,
                 const uint16_t *w, size_t N, size_t K, size_t p, uint16_t *bt, float *out,
                 int accum)
    size_t xb_emulated_count()

# Instruction-set paths (set_isa, get_isa: _isa.pxi), each with the CPU features it needs; the
# index of each is the isa of gemm.h (0 AVX2, else AVX-512). The tile paths run bfloat16 weights
# on tdpbf16ps (gemm_amx_bf16.h) for every M, and the other weights on the AVX-512 path;
# "amx-emulated" runs the tiles on their scalar model (tests), never chosen unless named.
_init_isa({"avx2": (), "avx512": ("avx512",), "amx-emulated": ("avx512",),
           "amx": ("avx512", "amx")})


cdef int _weight_type(cnp.ndarray a, str name) except -1:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return XW_F32
    if t == cnp.NPY_FLOAT16:
        return XW_F16
    if t == cnp.NPY_UINT16:
        return XW_BF16
    raise TypeError(f"{name} must be float32, float16 or uint16 (bfloat16 bits), "
                    f"got {a.dtype}")


# ---- matmul ----

# Prefill converts w to float32 one panel of rows at a time (per thread): about 1 MiB stays in
# L2 (2 MiB per core on current Xeons) while the packed rows of x stream past it.
cdef size_t _PANEL_BYTES = 1024 * 1024
# From this many rows of x on, the prefill path; below it, w streams through registers (decode).
cdef size_t _PREFILL_MIN_M = 16
cdef size_t _KC = XLLM_KC  # the K block of the prefill path


def _tune(kc=None, panel_bytes=None, prefill_min_m=None):
    """Testing/benchmark aid: change the prefill K block, panel size and the M from which the
    prefill path is used; returns the previous values. Results stay bitwise the same."""
    global _KC, _PANEL_BYTES, _PREFILL_MIN_M
    old = (_KC, _PANEL_BYTES, _PREFILL_MIN_M)
    if kc is not None and (kc < 16 or kc % 16):
        raise ValueError("kc must be a positive multiple of 16")
    # all converted (OverflowError past size_t) before any is set
    cdef size_t new_kc = _KC if kc is None else kc
    cdef size_t new_panel = _PANEL_BYTES if panel_bytes is None else max(1, panel_bytes)
    cdef size_t new_min_m = _PREFILL_MIN_M if prefill_min_m is None else max(1, prefill_min_m)
    _KC = new_kc
    _PANEL_BYTES = new_panel
    _PREFILL_MIN_M = new_min_m
    return old


def matmul(x, w, out, accumulate=False):
    """out[M, N] = x[M, K] @ w[N, K].T, or out += ... when accumulate.

    x: float32 [M, K]; w: float32, float16 or uint16 (bfloat16 bits) [N, K], may be read-only;
    out: float32 [M, N] (e.g. a row slice of a larger array). All C-contiguous. Each element
    of out is bitwise independent of M, of its row index and of the thread count.
    """
    cdef cnp.ndarray xa = _check_2d(x, "x", cnp.NPY_FLOAT32, "float32")
    cdef cnp.ndarray wa = _check_2d(w, "w", -1, "")
    cdef cnp.ndarray oa = _check_2d(out, "out", cnp.NPY_FLOAT32, "float32")
    cdef int wt = _weight_type(wa, "w")
    _check_writeable(oa)
    cdef size_t M = <size_t>xa.shape[0], K = <size_t>xa.shape[1], N = <size_t>wa.shape[0]
    if <size_t>wa.shape[1] != K:
        raise ValueError(f"x and w disagree on K: x {x.shape}, w {w.shape} "
                         "(w is [N, K], used as x @ w.T)")
    if <size_t>oa.shape[0] != M or <size_t>oa.shape[1] != N:
        raise ValueError(f"out must have shape ({M}, {N}) for x {x.shape} and w {w.shape}, "
                         f"got {out.shape}")
    if M == 0 or N == 0:
        return
    _check_no_overlap(oa, xa, "x")
    _check_no_overlap(oa, wa, "w")

    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const void *wp = <const void *>cnp.PyArray_DATA(wa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    cdef int isa = _isa
    cdef int acc = 1 if accumulate else 0
    cdef int nt = get_num_threads()
    cdef size_t mk = M * K  # <= x.size, which fits
    if mk == 0 or (mk < _SERIAL_MAX_MACS and N < (_SERIAL_MAX_MACS + mk - 1) // mk):
        nt = 1  # M * N * K < _SERIAL_MAX_MACS, without the product that can overflow
    if isa >= 2 and wt == XW_BF16:
        _matmul_tiles(xp, M, K, <const uint16_t *>wp, N, op, acc, isa == 3, nt)
        return
    isa = 1 if isa >= 1 else 0  # the tile paths' other weights: the AVX-512 path
    cdef size_t nr = XLLM_NR5 if isa else XLLM_NR2
    # Row stride of converted panels: 64-byte aligned rows, plus one extra cache line so that
    # rows are not a multiple of 4 KiB apart (which would map them all to the same L1 sets).
    cdef size_t nb, kc = 0, ldk = ((K + 15) & ~(<size_t>15)) + 16
    cdef size_t per_thread = 0, conv_floats = 0, mr, n0, n1
    cdef bint prefill = M >= _PREFILL_MIN_M
    cdef float *scratch = NULL
    cdef float *xpk = NULL
    cdef float *xpk_mem = NULL
    cdef Py_ssize_t g, p, ngroups = 0

    if not prefill:
        # Decode: memory bound. Small panels (24: a multiple of the tile widths 3 and 6) spread
        # the rows of w evenly over the threads; each is read once, converted in registers.
        nb = 24
    else:
        # Prefill: compute bound. A float32 panel of w sized to stay in L2 while all rows of x
        # stream past it (but at least two panels per thread, so that none idles when N is
        # small), K-blocked so the current rows of x stay in L1.
        nb = min(_PANEL_BYTES // (4 * ldk), (N + 2 * nt - 1) // (2 * nt))
        nb = max(nr, nb - nb % nr)
        kc = _KC
        conv_floats = nb * ldk
        # keep each thread's part 64-byte aligned
        per_thread = (conv_floats + XLLM_ACCBUF_FLOATS + 15) & ~(<size_t>15)
    cdef Py_ssize_t npanels = <Py_ssize_t>((N + nb - 1) // nb)
    nt = <int>min(<Py_ssize_t>nt, npanels)
    # per-thread parts of scratch: the float32 panel of w, then the parked accumulators
    cdef float *conv = NULL
    cdef float *accbuf = NULL
    try:
        if prefill:
            mr = xllm_mr(isa)
            ngroups = <Py_ssize_t>((M + mr - 1) // mr)
            scratch = <float *>malloc(<size_t>nt * per_thread * sizeof(float) + 64)
            xpk_mem = <float *>malloc(<size_t>ngroups * mr * K * sizeof(float) + 64)
            if scratch == NULL or xpk_mem == NULL:
                raise MemoryError("matmul: cannot allocate scratch memory")  # freed in finally
            xpk = _align64(xpk_mem)
            for g in prange(ngroups, nogil=True, schedule="static", num_threads=nt):
                xllm_pack_x(isa, xp, K, M, K, kc, <size_t>g, xpk)
        with nogil, parallel(num_threads=nt):
            conv = NULL
            accbuf = NULL
            if scratch != NULL:
                conv = _align64(scratch) + <size_t>threadid() * per_thread
                accbuf = conv + conv_floats
            # dynamic: when another process takes one core, the other thread picks up its panels
            # (which thread computes a panel never changes its bits)
            for p in prange(npanels, schedule="dynamic"):
                n0 = <size_t>p * nb
                n1 = min(n0 + nb, N)
                xllm_gemm_panel(isa, xp, K, xpk, M, K, wp, wt, K, n0, n1, op, N, acc, conv,
                                ldk, accbuf, kc)
    finally:
        free(scratch)
        free(xpk_mem)


# Rows of x per work item of the tile path (one panel of 16 rows of w each).
cdef size_t _TILE_ROWS = 128


cdef _matmul_tiles(const float *xp, size_t M, size_t K, const uint16_t *wp, size_t N, float *op,
                   int acc, int hw, int nt):
    """out (+)= x @ w.T for bfloat16 w on the tile kernel (gemm_amx_bf16.h; hw: the AMX unit, or
    its model): x split into bfloat16 parts once, then work items (row chunk) x (panel of w)."""
    cdef size_t kp = (K + 31) & ~(<size_t>31)
    cdef size_t npanels = (N + 15) // 16
    cdef size_t nchunks = (M + _TILE_ROWS - 1) // _TILE_ROWS
    if kp == 0:  # K = 0: the products are 0
        if not acc:
            memset(op, 0, M * N * sizeof(float))
        return
    if M > (<size_t>PY_SSIZE_T_MAX // 8) // kp or npanels > <size_t>PY_SSIZE_T_MAX // nchunks:
        raise MemoryError(f"matmul: {M} x {K} is too large for the tile path")
    if <size_t>nt > npanels * nchunks:
        nt = <int>(npanels * nchunks)
    cdef size_t xs_bytes = (XB_PARTS * M * kp * 2 + 63) & ~(<size_t>63)
    cdef size_t bt_bytes = kp * 32  # one panel's tiles: kp / 32 KiB
    cdef char *mem = <char *>malloc(xs_bytes + <size_t>nt * bt_bytes + 64)
    if mem == NULL:
        raise MemoryError("matmul: cannot allocate scratch memory for the tile path")
    cdef uint16_t *xs = <uint16_t *>((<size_t>mem + 63) & ~(<size_t>63))
    cdef uint16_t *bt
    cdef Py_ssize_t m, it
    cdef size_t m0, m1, p
    try:
        with nogil, parallel(num_threads=nt):
            for m in prange(<Py_ssize_t>M, schedule="static"):
                xb_split_rows(xp, K, <size_t>m, <size_t>m + 1, K, kp, M, xs)
            xllm_barrier()  # Cython's prange ends with nowait
            bt = <uint16_t *>(<char *>xs + xs_bytes + <size_t>threadid() * bt_bytes)
            for it in prange(<Py_ssize_t>(npanels * nchunks), schedule="static"):
                m0 = (<size_t>it // npanels) * _TILE_ROWS
                m1 = min(m0 + _TILE_ROWS, M)
                p = <size_t>it % npanels
                xb_item(hw, xs, M, kp, m0, m1, wp, N, K, p, bt, op, acc)
    finally:
        free(mem)


def _emulated_tile_items():
    """How many work items the emulated bf16 tile kernel computed in this process (tests)."""
    return xb_emulated_count()


cdef inline float *_align64(float *p) noexcept nogil:
    return <float *>((<size_t>p + 63) & ~(<size_t>63))


# ---- embedding ----

def embedding(table, ids, out):
    """out[i, :] = float32(table[ids[i], :]).

    table: [V, D] float32, float16 or uint16 (bfloat16 bits), C-contiguous, may be read-only;
    ids: 1-D int32 or int64; out: float32 C-contiguous [len(ids), D]. IndexError for an id
    outside 0 .. V-1.
    """
    cdef cnp.ndarray ta = _check_2d(table, "table", -1, "")
    cdef int wt = _weight_type(ta, "table")
    cdef cnp.ndarray oa = _check_2d(out, "out", cnp.NPY_FLOAT32, "float32")
    _check_writeable(oa)
    _check_no_overlap(oa, ta, "table")
    cdef cnp.ndarray ia = _check_ids(ids)
    cdef size_t n = <size_t>ia.shape[0], V = <size_t>ta.shape[0], D = <size_t>ta.shape[1]
    if <size_t>oa.shape[0] != n or <size_t>oa.shape[1] != D:
        raise ValueError(f"out must have shape ({n}, {D}) for {n} ids and table {table.shape}, "
                         f"got {out.shape}")
    if n == 0:
        return
    lowest = int(ia.min())
    highest = int(ia.max())
    if lowest < 0 or highest >= <Py_ssize_t>V:
        bad = lowest if lowest < 0 else highest
        raise IndexError(f"token id {bad} out of range for an embedding table of {V} rows")
    cdef const void *tp = <const void *>cnp.PyArray_DATA(ta)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ia)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    with nogil:
        xllm_embedding(tp, wt, D, ip, n, op)
