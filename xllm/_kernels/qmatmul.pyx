"""Matrix multiply and embedding lookup with group-quantized weights (packed as
xllm/_kernels/layout.py describes; xllm.formats.qtensor.QTensor): the
argument checks at the Python boundary and the split of W's panels across threads. The arithmetic
(AVX2, AVX-512 VNNI) and why it is bitwise batch-invariant: gemm_q.h; the AMX tile kernels
with the same bits: gemm_amx.h."""
include "_matrix.pxi"
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport parallel, threadid
from libc.stdlib cimport free, malloc

from xllm._kernels.layout import BLOCK, CODECS, PANEL, check_packed, sub_shape

assert PANEL == 16 and BLOCK == 32  # the panels and blocks of gemm_q.h are layout.py's

cdef extern from "gemm_q.h" nogil:
    ctypedef struct xq_weights:
        const uint8_t *qs
        const uint8_t *scales
        const uint8_t *mins
        size_t nb, ng
        int bits, gshift, f32, parts
        int fmt
        const uint8_t *high
        const uint8_t *sub
    ctypedef struct xq_xb:
        pass
    ctypedef struct xq_xh:
        pass
    void xq_quantize_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K,
                          int parts, xq_xb *qx, xq_xh *xh)
    void xq_panels(int isa, const xq_weights *w, size_t p0, size_t p1, const xq_xb *x,
                   const xq_xh *xh, size_t M, size_t N, float *out, int accum)
    void xq_dequant_row(const xq_weights *w, size_t r, float *o)
    void xk_repack_panel(int F, const uint8_t *raw, size_t row_bytes, size_t n, size_t K,
                         size_t p, uint8_t *qs, uint8_t *high, uint8_t *scales, uint8_t *mins,
                         uint8_t *sub)
    enum: XQ_X_BYTES, XQ_OWN_M

cdef extern from "gemm_amx.h" nogil:
    void xa_panels(int isa, const xq_weights *w, size_t p0, size_t p1, const xq_xb *x,
                   const xq_xh *xh, size_t M, size_t N, float *out, int accum)
    size_t xa_emulated_count()
    void xa_emu_tile_dot(int op, int M, int K, int N, const void *a, const void *b, void *c)

# Instruction-set paths (set_isa, get_isa: _isa.pxi), each with the CPU features it needs; the
# index of each is the isa of xa_panels (gemm_amx.h). The tile kernels take the products of two
# rows or more, with the VNNI path's bits; "amx-emulated" runs them on a scalar model of the
# tiles (tests), never chosen unless named (XLLM_ISA=amx-emulated or set_isa).
_init_isa({"avx2": (), "avx512vnni": ("avx512", "avx512vnni"),
           "amx-emulated": ("avx512", "avx512vnni"), "amx": ("avx512", "avx512vnni", "amx")})


cdef bint _fits(object a, Py_ssize_t d0, Py_ssize_t d1, Py_ssize_t d2, int t1, int t2):
    """Whether `a` is a C-contiguous, aligned, native-order [d0, d1, d2] ndarray of numpy type t1
    or t2."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray x = <cnp.ndarray>a
    return (x.ndim == 3 and x.shape[0] == d0 and x.shape[1] == d1 and x.shape[2] == d2 and
            cnp.PyArray_TYPE(x) in (t1, t2) and cnp.PyArray_IS_C_CONTIGUOUS(x) and
            cnp.PyArray_ISALIGNED(x) and cnp.PyArray_ISNOTSWAPPED(x))


cdef int _layout_ok(object n, object k, object g, object parts, object bits, object qs,
                    object sc, object mn) except -1:
    """1 if a QTensor's fields describe arrays the kernels can read: Python ints in range (a
    group past K, possible when K = 0, would make a shift of 64 bits or more), arrays of the
    shapes they imply; 0 otherwise. OverflowError for sizes past Py_ssize_t."""
    if not (type(n) is int and type(k) is int and type(g) is int and type(parts) is int and
            type(bits) is int):
        return 0
    if not (n >= 0 and k >= 0 and parts in (1, 2, 3)):
        return 0
    if not (32 <= g and (g <= k or g == 32) and not g & (g - 1) and k % g == 0):
        return 0
    if not (bits == 8 or (bits == 4 and g == 32)):
        return 0
    p = (n + 15) // 16
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>sc) if cnp.PyArray_Check(sc) else -1
    return (_fits(qs, p, k // 32, 512 if bits == 8 else 256, cnp.NPY_UINT8, cnp.NPY_UINT8) and
            _fits(sc, p, k // g, 16, cnp.NPY_FLOAT16, cnp.NPY_FLOAT32) and
            (mn is None or (bits == 4 and _fits(mn, p, k // g, 16, t, t))))


cdef bint _codec_ok(object n, object k, object g, object parts, object bits, object codec,
                    object qs, object sc, object mn, object hi, object sub):
    """Whether a codec QTensor's fields describe arrays the kernels can read (layout.py)."""
    if not (type(n) is int and type(k) is int and type(g) is int and type(parts) is int and
            type(bits) is int):
        return False
    c = CODECS.get(codec)
    if c is None or not (n >= 0 and k >= 0 and parts in (1, 2, 3) and bits == c.bits and
                         g == c.group and k % g == 0):
        return False
    p = (n + 15) // 16
    if not (_fits(qs, p, k // 32, 256, cnp.NPY_UINT8, cnp.NPY_UINT8) and
            _fits(sc, p, k // g, 16, cnp.NPY_FLOAT16, cnp.NPY_FLOAT16)):
        return False
    if not (mn is None if not c.asymmetric else
            _fits(mn, p, k // g, 16, cnp.NPY_FLOAT16, cnp.NPY_FLOAT16)):
        return False
    if not (hi is None if not c.planes else
            _fits(hi, p, k // 32, 64 * c.planes, cnp.NPY_UINT8, cnp.NPY_UINT8)):
        return False
    spec = sub_shape(c, p, k)
    if spec is None:
        return sub is None
    shape, dtype = spec
    t = cnp.NPY_UINT8 if dtype == np.uint8 else cnp.NPY_INT8
    if not cnp.PyArray_Check(sub):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>sub
    return (a.ndim == 4 and a.shape[0] == shape[0] and a.shape[1] == shape[1] and
            a.shape[2] == shape[2] and a.shape[3] == shape[3] and cnp.PyArray_TYPE(a) == t and
            cnp.PyArray_IS_C_CONTIGUOUS(a))


cdef xq_weights _weights(object w, size_t *nk, list keep) except *:
    """The C view of QTensor `w`, re-validated (its fields are plain attributes, which may have
    changed since it was built): the common case by a quick check here (it runs on every call,
    several times per token), anything else by check_packed, for its messages. Its shape goes to nk[0], nk[1] and its
    arrays to `keep`, which holds them alive while the kernel runs without the GIL."""
    if not hasattr(w, "qs"):
        raise TypeError(f"w must be packed quantized weights (an xllm.formats.qtensor.QTensor), "
                        f"got {type(w).__name__}")
    n, k = w.shape
    cdef object g = w.group
    cdef object parts = w.parts
    cdef object bits = w.bits
    cdef object qs = w.qs
    cdef object sc = w.scales
    cdef object mn = w.mins
    cdef object codec = getattr(w, "codec", None)
    if codec is not None:
        return _codec_weights(w, n, k, g, parts, bits, codec, qs, sc, mn, nk, keep)
    if not _layout_ok(n, k, g, parts, bits, qs, sc, mn):
        for a in (sc, mn):
            if isinstance(a, np.ndarray) and not a.dtype.isnative:
                raise TypeError(f"qmatmul: the scales and mins of a QTensor must be in native "
                                f"byte order, got {a.dtype}")
        check_packed(w, "qmatmul")  # raises with the details, or accepts numpy integers;
        # it does not look at alignment, hence the second check here
        n = operator.index(n)
        k = operator.index(k)
        g = operator.index(g)
        parts = operator.index(parts)
        bits = operator.index(bits)
        if not _layout_ok(n, k, g, parts, bits, qs, sc, mn):
            raise ValueError(f"qmatmul: {w!r} has misaligned arrays or a group larger than K")
    keep += (qs, sc, mn)
    cdef xq_weights c
    c.qs = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>qs)
    c.scales = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>sc)
    c.mins = NULL if mn is None else <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>mn)
    c.nb = <size_t>(<cnp.ndarray>qs).shape[1]
    c.ng = <size_t>(<cnp.ndarray>sc).shape[1]
    c.bits = bits
    c.parts = parts
    c.f32 = cnp.PyArray_TYPE(<cnp.ndarray>sc) == cnp.NPY_FLOAT32
    c.gshift = (g // 32).bit_length() - 1
    c.fmt = 0
    c.high = NULL
    c.sub = NULL
    nk[0] = n
    nk[1] = k
    return c


cdef xq_weights _codec_weights(object w, object n, object k, object g, object parts,
                               object bits, object codec, object qs, object sc, object mn,
                               size_t *nk, list keep) except *:
    """_weights for a QTensor of a codec (gemm_k.h)."""
    cdef object hi = w.high
    cdef object sub = w.sub
    if not _codec_ok(n, k, g, parts, bits, codec, qs, sc, mn, hi, sub):
        for a in (sc, mn):
            if isinstance(a, np.ndarray) and not a.dtype.isnative:
                raise TypeError(f"qmatmul: the scales and mins of a QTensor must be in native "
                                f"byte order, got {a.dtype}")
        check_packed(w, "qmatmul")  # raises with the details
        raise ValueError(f"qmatmul: {w!r} has misaligned arrays or fields of the wrong type")
    keep += (qs, sc, mn, hi, sub)
    cdef xq_weights c
    c.qs = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>qs)
    c.scales = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>sc)
    c.mins = NULL if mn is None else <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>mn)
    c.high = NULL if hi is None else <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>hi)
    c.sub = NULL if sub is None else <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>sub)
    c.nb = <size_t>(<cnp.ndarray>qs).shape[1]
    c.ng = <size_t>(<cnp.ndarray>sc).shape[1]
    c.bits = bits
    c.parts = parts
    c.f32 = 0
    c.gshift = 0
    c.fmt = CODECS[codec].ident
    nk[0] = n
    nk[1] = k
    return c


# Rows of x per parallel work item (with one panel of W): at most 128, and their quantized
# blocks at most _X_BYTES, so that they stay in L2 while the item's panel streams past them.
cdef size_t _ROWS = 128
cdef size_t _X_BYTES = XQ_X_BYTES
cdef size_t _OWN_M = XQ_OWN_M  # up to this many rows, each thread quantizes x itself
cdef enum:
    _STACK_B = 8 * 8192 // 32  # quantized x of up to this many blocks (160 B) lives on the stack
    _XB = 128 + 32  # bytes per block of quantized x: its xq_xb and its xq_xh
    _MAXW = 4  # weights sharing one x in a call


def qmatmul(x, w, out, accumulate=False):
    """out[M, N] = x[M, K] @ W[N, K].T, or out += ... when accumulate, W a QTensor.

    x, out: float32, C-contiguous. w and out may also be equal-length tuples (up to 4) of
    weights and outputs sharing the input x, which is then quantized once and all products run
    in one parallel loop (equal ``parts`` required). x is quantized per 32-value block into
    ``w.parts`` int8 parts (gemm_q.h): the result carries that (about 16-bit, 23-bit for 3 parts)
    error; each element is bitwise independent of M, its row, the thread count and the ISA path.
    """
    if type(w) is tuple:
        ws = w
        outs = out
    else:
        ws = (w,)
        outs = (out,)
    if type(outs) is not tuple or not 1 <= len(ws) == len(outs) <= _MAXW:
        raise ValueError(f"w and out must be a QTensor and an array, or two tuples of the same "
                         f"length (1..{_MAXW})")
    cdef cnp.ndarray xa = _check_2d(x, "x", cnp.NPY_FLOAT32, "float32")
    cdef size_t M = <size_t>xa.shape[0], K = <size_t>xa.shape[1], nw = len(ws), j, i
    cdef xq_weights cw[_MAXW]
    cdef float *ops[_MAXW]
    cdef size_t Ns[_MAXW]
    cdef size_t nk[2]
    cdef Py_ssize_t first[_MAXW + 1]  # first panel of each weight in the joint panel list
    cdef cnp.ndarray oa
    cdef list keep = []  # the weights' arrays, alive until the end even if w's fields change
    first[0] = 0
    for j in range(nw):
        cw[j] = _weights(ws[j], nk, keep)
        if cw[j].parts != cw[0].parts:
            raise ValueError(f"weights sharing x need equal parts: {cw[0].parts}, {cw[j].parts}")
        oa = _check_2d(outs[j], "out", cnp.NPY_FLOAT32, "float32")
        _check_writeable(oa)
        Ns[j] = nk[0]
        if K != nk[1]:
            raise ValueError(f"x has {K} columns but W {ws[j].shape} has {nk[1]}")
        if <size_t>oa.shape[0] != M or <size_t>oa.shape[1] != Ns[j]:
            raise ValueError(f"out must have shape ({M}, {Ns[j]}) for x {x.shape} and W "
                             f"{ws[j].shape}, got {outs[j].shape}")
        _check_no_overlap(oa, xa, "x")
        for i in range(len(keep)):  # the weights' arrays so far (None: absent)
            if keep[i] is not None:
                _check_no_overlap(oa, keep[i], "a weight")
        ops[j] = <float *>cnp.PyArray_DATA(oa)
        for i in range(j):
            if _overlap(oa, outs[i], False):
                raise ValueError("the outputs overlap")
        first[j + 1] = first[j] + <Py_ssize_t>((Ns[j] + 15) // 16)
    cdef Py_ssize_t npanels = first[nw]
    if M == 0 or npanels == 0:
        return
    if K == 0:  # (no blocks of x: the products are 0)
        for j in range(nw):
            if not accumulate:
                outs[j][...] = 0
        return
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef int isa = _isa
    cdef int acc = 1 if accumulate else 0
    cdef int nt = get_num_threads()
    # The sizes below cannot overflow: M * K <= x.size, npanels * 16 * K <= the weights' size,
    # and the checks that multiply sizes that are not so bounded are written as divisions.
    cdef size_t mk = M * K
    if mk < _SERIAL_MAX_MACS and <size_t>npanels * 16 < (_SERIAL_MAX_MACS + mk - 1) // mk:
        nt = 1  # M * K * npanels * 16 < _SERIAL_MAX_MACS
    if npanels < nt and M < <size_t>nt:  # (else npanels * M >= nt)
        nt = <int>min(<Py_ssize_t>nt, npanels * <Py_ssize_t>M)

    # quantized x (xq_xb blocks, cache-line aligned): on the stack when small, else malloc
    cdef size_t nb = K // 32, m0, m1
    cdef char qstack[_XB * _STACK_B + 64]
    cdef void *mem = NULL
    # up to _OWN_M rows, each thread quantizes all of x into its own copy: no barrier
    cdef bint own = M <= _OWN_M and nt > 1
    cdef size_t copies = <size_t>nt if own else 1  # copies * M <= max(M, nt * _OWN_M)
    if copies * M > (<size_t>PY_SSIZE_T_MAX - 64) // (_XB * nb):
        raise MemoryError(f"qmatmul: {copies} copies of {M} x {K} quantized is too large")
    if copies * M * nb > _STACK_B:
        mem = malloc(_XB * copies * M * nb + 64)
        if mem == NULL:
            raise MemoryError("qmatmul: cannot allocate scratch memory for the quantized x")
    cdef xq_xb *qx = <xq_xb *>((<size_t>(mem or qstack) + 63) & ~(<size_t>63))
    cdef xq_xh *xh = <xq_xh *>(<char *>qx + 128 * copies * M * nb)  # the half sums, after
    cdef xq_xb *qxt
    cdef xq_xh *xht
    cdef Py_ssize_t it, m, p
    cdef size_t rows = max(8, min(_ROWS, _X_BYTES // (128 * nb)))
    if <size_t>npanels > <size_t>PY_SSIZE_T_MAX // ((M + rows - 1) // rows):
        raise MemoryError(f"qmatmul: {npanels} panels x {M} rows is too many work items")
    cdef Py_ssize_t nitems = npanels * <Py_ssize_t>((M + rows - 1) // rows)
    try:
        # One parallel region (each costs microseconds): the threads quantize rows of x, wait,
        # then take work items (block of `rows` rows of x) x (panel of one W); static, so each
        # thread streams one contiguous run of panels, which the hardware prefetchers follow
        # better than the scattered panels of a dynamic schedule (docs/performance.rst). Which
        # thread computes an item never changes its bits.
        with nogil, parallel(num_threads=nt):
            qxt = qx
            xht = xh
            if own:
                qxt = qx + threadid() * M * nb
                xht = xh + threadid() * M * nb
                xq_quantize_rows(xp, K, 0, M, K, cw[0].parts, qxt, xht)
            else:
                for m in prange(<Py_ssize_t>M, schedule="static"):
                    xq_quantize_rows(xp, K, <size_t>m, <size_t>m + 1, K, cw[0].parts, qx, xh)
                xllm_barrier()  # Cython's prange ends with nowait
            for it in prange(nitems, schedule="static"):
                m0 = (it // npanels) * rows
                m1 = min(m0 + rows, M)
                p = it % npanels
                j = 0
                while p >= first[j + 1]:
                    j = j + 1
                p = p - first[j]
                xa_panels(isa, &cw[j], p, p + 1, qxt + m0 * nb, xht + m0 * nb, m1 - m0, Ns[j],
                          ops[j] + m0 * Ns[j], acc)
    finally:
        free(mem)


def qembedding(table, ids, out):
    """out[i, :] = row ids[i] of the QTensor `table`, dequantized to float32 (exactly as
    ``QTensor.dequantize``); ids: 1-D int32 or int64 (or a sequence of ints); IndexError for an
    id outside 0 .. V-1."""
    cdef list keep = []
    cdef size_t vd[2]
    cdef xq_weights cw = _weights(table, vd, keep)
    cdef size_t V = vd[0], D = vd[1], n, i
    cdef cnp.ndarray oa = _check_2d(out, "out", cnp.NPY_FLOAT32, "float32")
    _check_writeable(oa)
    for a in keep:
        if a is not None:
            _check_no_overlap(oa, a, "table")
    cdef cnp.ndarray ia = _check_ids(ids)
    n = <size_t>ia.shape[0]
    if <size_t>oa.shape[0] != n or <size_t>oa.shape[1] != D:
        raise ValueError(f"out must have shape ({n}, {D}) for {n} ids and table "
                         f"{table.shape}, got {out.shape}")
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ia)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    for i in range(n):
        if ip[i] < 0 or <size_t>ip[i] >= V:
            raise IndexError(f"token id {ip[i]} out of range for an embedding table of {V} rows")
    with nogil:
        for i in range(n):
            xq_dequant_row(&cw, <size_t>ip[i], op + i * D)


cdef uint8_t *_data_or_null(object a):
    return NULL if a is None else <uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>a)


def repack_codec(raw, codec, shape, qs, scales, mins, high, sub):
    """Fill the arrays of a [N, K] weight of `codec` (layout.py's shapes, None where the codec
    has none; every byte is written, the rows that pad the last panel 0) from its rows of GGUF
    blocks ``raw`` (uint8 [N, K / group * bytes per block]), as reference.repack_codec does.
    Parallel over panels; the copy moves whole words, no value is unpacked alone (gemm_k.h)."""
    c = CODECS.get(codec)
    if c is None:
        raise ValueError(f"repack_codec: unknown codec {codec!r}")
    n = operator.index(shape[0])
    k = operator.index(shape[1])
    if n < 0 or k < 0 or k % c.group:
        raise ValueError(f"repack_codec: a {codec} weight cannot have shape {tuple(shape)}")
    cdef cnp.ndarray ra = _check_2d(raw, "raw", cnp.NPY_UINT8, "uint8")
    cdef size_t row_bytes = <size_t>(k // c.group * c.gguf_bytes)
    if <size_t>ra.shape[0] != <size_t>n or <size_t>ra.shape[1] != row_bytes:
        raise ValueError(f"repack_codec: raw must have shape ({n}, {row_bytes}) for a {codec} "
                         f"weight of shape ({n}, {k}), got {raw.shape}")
    if not _codec_ok(n, k, c.group, 3, c.bits, codec, qs, scales, mins, high, sub):
        raise ValueError(f"repack_codec: the arrays do not have the {codec} layout of shape "
                         f"({n}, {k})")
    for a in (qs, scales, mins, high, sub):
        if a is not None:
            _check_writeable(a)
            _check_no_overlap(a, ra, "raw")
    cdef int F = c.ident
    cdef const uint8_t *rp = <const uint8_t *>cnp.PyArray_DATA(ra)
    cdef uint8_t *qp = _data_or_null(qs)
    cdef uint8_t *sp = _data_or_null(scales)
    cdef uint8_t *mp = _data_or_null(mins)
    cdef uint8_t *hp = _data_or_null(high)
    cdef uint8_t *bp = _data_or_null(sub)
    cdef size_t N = <size_t>n, K = <size_t>k
    cdef Py_ssize_t p, npanels = <Py_ssize_t>((N + 15) // 16)
    with nogil:
        for p in prange(npanels, schedule="static", num_threads=get_num_threads()):
            xk_repack_panel(F, rp, row_bytes, N, K, <size_t>p, qp, hp, sp, mp, bp)


def _emulated_panels():
    """How many panels the emulated tile kernels ("amx-emulated") computed in this process (for
    the tests: the tile path ran, not the VNNI path it falls back to)."""
    return xa_emulated_count()


_TILE_OPS = ("dpbssd", "dpbsud", "dpbusd", "dpbuud", "dpbf16ps")


def _emulated_tile_dot(op, a, b, c):
    """One tile dot product on the scalar model of gemm_amx.h, in place on c: c [M, 4N] op=
    a [M, 4K] . b [K, 4N], uint8 arrays of the tiles' bytes (int8 or bfloat16 values, int32 or
    float32 sums viewed as bytes), 1 <= M, K, N <= 16 (tests of the model)."""
    if op not in _TILE_OPS:
        raise ValueError(f"op must be one of {_TILE_OPS}, got {op!r}")
    cdef cnp.ndarray aa = _check_2d(a, "a", cnp.NPY_UINT8, "uint8")
    cdef cnp.ndarray ba = _check_2d(b, "b", cnp.NPY_UINT8, "uint8")
    cdef cnp.ndarray ca = _check_2d(c, "c", cnp.NPY_UINT8, "uint8")
    _check_writeable(ca)
    m = aa.shape[0]
    k = ba.shape[0]
    n = ca.shape[1] // 4
    if not (1 <= m <= 16 and 1 <= k <= 16 and 1 <= n <= 16 and aa.shape[1] == 4 * k and
            ba.shape[1] == 4 * n and ca.shape[0] == m and ca.shape[1] == 4 * n):
        raise ValueError(f"tile shapes a {a.shape}, b {b.shape}, c {c.shape} do not fit")
    xa_emu_tile_dot(_TILE_OPS.index(op), m, k, n, cnp.PyArray_DATA(aa), cnp.PyArray_DATA(ba),
                    cnp.PyArray_DATA(ca))
