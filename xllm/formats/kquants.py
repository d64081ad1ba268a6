"""Reference quantizers of llama.cpp's K-quants: float32 rows -> rows of GGUF blocks.

``quantize_q4_k``, ``quantize_q5_k`` and ``quantize_q6_k`` take float32 weights [N, K] (K a
multiple of QK_K = 256) and return uint8 [N, K / 256 * block bytes]: the blocks as a GGUF file
stores them, which ``gguf.quants.dequantize`` reads back. They follow the algorithm of
llama.cpp's ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref`` and ``quantize_row_q6_K_ref``
(ggml-quants.c), which ``llama_model_quantize`` runs when it has no importance matrix; they were
written from its description, not copied.

A super-block holds 256 values.

- Q4_K and Q5_K split it into 8 sub-blocks of 32 values; each gets a scale and a minimum
  (x ~ scale * q - min, q in 0..15 or 0..31) found by ``_fit_scale_min`` (llama.cpp's
  ``make_qkx2_quants``): a grid search over scales that minimises the weighted squared error,
  weights |x| + rms(sub-block). The 8 scales and 8 minimums are stored as 6-bit integers
  against one float16 super-scale ``d`` and one ``dmin`` (``_pack_scales_mins``), and the
  codes are recomputed from the rounded scales.
- Q6_K splits it into 16 sub-blocks of 16 values, each with a signed scale (x ~ scale * (q -
  32), q in 0..63) found by ``_fit_scale`` (llama.cpp's ``make_qx_quants`` with weights x^2),
  stored as int8 against one float16 ``d``.

Block layouts (bytes, in order): Q4_K: d, dmin (float16), scales[12], qs[128] (144); Q5_K: d,
dmin, scales[12], qh[32], qs[128] (176); Q6_K: ql[128], qh[64], scales[16] (int8), d (210).

Arithmetic: every value is float32 and every sum runs in index order, one rounding per operation
and no fused multiply-add, as the reference compiles for plain x86-64 (SSE2: the
``libggml-base`` of llama-cpp-python holds no FMA instruction). Rounding to the nearest integer
is to even, as llama.cpp's ``nearest_int``. So the blocks are bit-identical to llama.cpp's
(``tests/test_kquants.py`` checks them against blocks it recorded). Work is vectorized over
sub-blocks: arrays are laid out [position in the sub-block, sub-block] so that a sum over a
sub-block is a loop of whole-vector additions.
"""
from dataclasses import dataclass

import numpy as np

QK_K = 256
# Sub-blocks of at most this many super-blocks are quantized at once (bounds the temporaries:
# about 40 float32 arrays of this many * 256 values).
CHUNK_SUPERBLOCKS = 1024
# llama.cpp's GROUP_MAX_EPS: a group whose largest |x| is below it quantizes to zero.
GROUP_MAX_EPS = np.float32(1e-15)

F32 = np.float32


def _seq_sum(a):
    """Sums over axis 0 of a float32 [n, m] array, adding in index order (as a C loop does)."""
    total = a[0].copy()
    for row in a[1:]:
        total += row
    return total


def _rounded_codes(a, low, high):
    """float32 codes: `a` rounded to the nearest integer (halves to even, as nearest_int), then
    clipped to low..high; the same as clipping nearest_int's result, in fewer passes."""
    return np.clip(np.rint(a), F32(low), F32(high))


def _nearest_int(a):
    """float32 -> int32, rounding halves to even (llama.cpp's nearest_int). Values beyond
    +-2^22, which llama.cpp asserts never occur, are clipped first."""
    return np.rint(np.clip(a, -4194303, 4194303)).astype(np.int32)


def _fp16(a):
    """float32 -> the float16 a block stores (round to nearest even)."""
    return np.asarray(a, F32).astype(np.float16)


def _positions_first(x, n):
    """Rows [..., K] -> float32 [n, sub-blocks]: column s holds sub-block s (n values)."""
    return np.ascontiguousarray(x.reshape(-1, n).T, dtype=F32)


# ----------------------------------------------------------------------------- Q4_K and Q5_K


@dataclass
class _Fit:
    """A fit of every column of a sub-block array x [n, m]: float32 codes [n, m], and per column
    a scale [m] and an offset [m] (x ~ scale * code + offset; Q4_K/Q5_K: offset <= 0, its
    negation is the stored minimum; Q6_K: no offset)."""
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray = None

    def where(self, chosen, other):
        """The fit of `self` in the columns where `chosen`, of `other` elsewhere."""
        offset = None if self.offset is None else np.where(chosen, self.offset, other.offset)
        return _Fit(np.where(chosen, self.codes, other.codes),
                    np.where(chosen, self.scale, other.scale), offset)


def _weighted_error(x, w, fit):
    """sum over each column of w * (scale * code + offset - x)^2, in index order."""
    diff = fit.scale * fit.codes + fit.offset - x
    return _seq_sum(w * (diff * diff))


def _least_squares_fit(x, w, codes, sum_w, sum_x):
    """The scale and offset minimising each column's weighted squared error for `codes`, the
    offset clipped to <= 0 (then the scale refitted alone). A column whose codes leave the
    system singular (determinant <= 0) gets a NaN scale, so that its error never compares as
    lower (llama.cpp skips the trial)."""
    weighted = w * codes
    sum_l = _seq_sum(weighted)
    sum_l2 = _seq_sum(weighted * codes)
    sum_xl = _seq_sum(weighted * x)
    det = sum_w * sum_l2 - sum_l * sum_l
    solvable = det > 0
    det = np.where(solvable, det, F32(1))
    scale = (sum_w * sum_xl - sum_x * sum_l) / det
    offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = offset > 0
    scale = np.where(positive, sum_xl / np.where(sum_l2 != 0, sum_l2, F32(1)), scale)
    offset = np.where(positive, F32(0), offset)
    return _Fit(codes, np.where(solvable, scale, F32(np.nan)), offset)


def _fit_scale_min(x, w, nmax, rmin, rdelta, nstep):
    """Codes 0..nmax, a scale and an offset of every column of `x` [n, m] (weights `w`), as
    llama.cpp's make_qkx2_quants (without mean-absolute error) finds them.

    The start is the range of the column, its minimum clipped to <= 0. Then, for each of
    nstep + 1 trial inverse scales (nmax + rmin + rdelta * step) / (max - offset), offset the
    best so far, the codes at that scale and their weighted least-squares scale and offset
    (_least_squares_fit) replace the best if their weighted squared error is strictly lower.
    A column whose maximum equals its clipped minimum gets codes 0 and scale 0."""
    lo = x.min(axis=0)
    hi = x.max(axis=0)
    lo = np.where(lo > 0, F32(0), lo)
    flat = hi == lo
    start_offset = np.where(flat, hi - F32(1), lo)  # (flat columns are answered at the end)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)

    iscale = F32(nmax) / (hi - start_offset)
    codes = _rounded_codes(iscale * (x - start_offset), 0, nmax)
    best = _Fit(codes, F32(1) / iscale, start_offset)
    best_error = _weighted_error(x, w, best)
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - best.offset)
        codes = _rounded_codes(iscale * (x - best.offset), 0, nmax)
        trial = _least_squares_fit(x, w, codes, sum_w, sum_x)
        error = _weighted_error(x, w, trial)
        better = error < best_error
        best = trial.where(better, best)
        best_error = np.where(better, error, best_error)
    flat_fit = _Fit(np.zeros_like(best.codes), np.zeros_like(best.scale), lo)
    return flat_fit.where(flat, best)


def _sixbit(values, inverse):
    """Scales or minimums [8, m] as 6-bit integers: nearest(inverse * value), stored in a uint8
    (so a negative one wraps, as in C), then capped at 63."""
    codes = _nearest_int(inverse * values) & 0xFF
    return np.minimum(codes, 63).astype(np.uint8)


def _pack_scales_mins(ls, lm):
    """The 12 scale bytes of a Q4_K/Q5_K super-block from 6-bit scales `ls` and minimums `lm`
    [8, m]: bytes 0-3 hold scales 0-3 and bytes 4-7 minimums 0-3 in their low 6 bits, bytes 8-11
    the low nibbles of scales 4-7 (low) and minimums 4-7 (high); the top 2 bits of scales 4-7
    and minimums 4-7 go to bits 6-7 of bytes 0-3 and 4-7. Returns uint8 [12, m]."""
    packed = np.empty((12, ls.shape[1]), np.uint8)
    packed[0:4] = ls[0:4] | ((ls[4:8] >> 4) << 6)
    packed[4:8] = lm[0:4] | ((lm[4:8] >> 4) << 6)
    packed[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    return packed


@dataclass
class _ScaleMinBlocks:
    """What Q4_K and Q5_K blocks share, for m super-blocks: the float16 super-scales ``d`` and
    ``dmin`` [m], the 12 scale bytes ``scales`` uint8 [m, 12] and the codes uint8 [m, 256]."""
    d: np.ndarray
    dmin: np.ndarray
    scales: np.ndarray
    codes: np.ndarray

    def header(self):
        """uint8 [m, 16]: d, dmin and the scale bytes, the start of every block."""
        m = self.d.shape[0]
        return np.concatenate([self.d.view(np.uint8).reshape(m, 2),
                               self.dmin.view(np.uint8).reshape(m, 2), self.scales], axis=1)


def _scale_min_superblocks(x, nmax, rmin, rdelta, nstep):
    """The shared part of Q4_K and Q5_K for super-blocks x [m, 256] (codes 0..nmax)."""
    m = x.shape[0]
    cols = _positions_first(x, 32)  # [32, 8 m]: sub-block j of super-block b is column 8 b + j
    sum_x2 = _seq_sum(cols * cols)
    rms = np.sqrt(sum_x2 / F32(32))
    weights = rms + np.abs(cols)
    fit = _fit_scale_min(cols, weights, nmax, rmin, rdelta, nstep)
    scales = fit.scale.reshape(m, 8).T  # [8, m]
    mins = -fit.offset.reshape(m, 8).T
    max_scale = np.maximum(scales.max(axis=0), F32(0))
    max_min = np.maximum(mins.max(axis=0), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = _sixbit(scales, inv_scale)
    lm = _sixbit(mins, inv_min)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))

    # The codes again, against the scales as stored.
    sub_d = d.astype(F32) * ls.astype(F32)  # [8, m]
    sub_m = dmin.astype(F32) * lm.astype(F32)
    sub_d = sub_d.T.reshape(-1)  # [8 m], in the column order of `cols`
    sub_m = sub_m.T.reshape(-1)
    nonzero = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = _nearest_int((cols + sub_m) / np.where(nonzero, sub_d, F32(1)))
    requantized = np.clip(requantized, 0, nmax).astype(np.uint8)
    codes = np.where(nonzero, requantized, fit.codes.astype(np.uint8))  # a zero scale keeps
    codes = codes.T.reshape(m, QK_K)  # the codes of the fit
    return _ScaleMinBlocks(d, dmin, _pack_scales_mins(ls, lm).T, codes)


def _q4_k_superblocks(x):
    """Q4_K blocks of super-blocks x [m, 256]: uint8 [m, 144]."""
    blocks = _scale_min_superblocks(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    m = x.shape[0]
    # qs: for each 64 values, byte l holds value l (low nibble) and value l + 32 (high nibble).
    q = blocks.codes.reshape(m, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return np.concatenate([blocks.header(), qs.reshape(m, 128)], axis=1)


def _q5_k_superblocks(x):
    """Q5_K blocks of super-blocks x [m, 256]: uint8 [m, 176]."""
    blocks = _scale_min_superblocks(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    m = x.shape[0]
    q = blocks.codes.reshape(m, 4, 2, 32)  # [super-block, 64-value chunk c, half h, l]
    low = q & 0xF
    qs = low[:, :, 0] | (low[:, :, 1] << 4)
    # qh byte l: bit 2c + h is the fifth bit of value 64 c + 32 h + l.
    high = (q >> 4).astype(np.uint8)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(m, 8, 32), axis=1)
    return np.concatenate([blocks.header(), qh.astype(np.uint8), qs.reshape(m, 128)], axis=1)


# ----------------------------------------------------------------------------- Q6_K


def _fit_scale(x, nmax):
    """Signed codes l in -nmax..nmax-1 (stored as l + nmax, uint8) and a scale for every column
    of `x` [n, m], x ~ scale * l: llama.cpp's make_qx_quants with rmse_type 1 (weights x^2) and
    no importance matrix.

    The start is the inverse scale -nmax / x_max (x_max the value of largest magnitude, the
    first one on a tie) and the weighted least-squares scale for its codes; then 18 trial
    inverse scales -(nmax + 0.1 * t) / x_max, t = -9..9 but 0, each replacing the best so far if
    (sum w x l)^2 / (sum w l^2) is strictly larger. Columns whose largest |x| is below
    GROUP_MAX_EPS get scale 0 and stored codes 0 (as llama.cpp leaves them)."""
    m = x.shape[1]
    which = np.argmax(np.abs(x), axis=0)
    x_max = x[which, np.arange(m)]
    zero = np.abs(x_max) < GROUP_MAX_EPS
    x_max = np.where(zero, F32(1), x_max)
    w = x * x
    wx = w * x

    def codes(iscale):
        return _rounded_codes(iscale * x, -nmax, nmax - 1)

    l = codes(F32(-nmax) / x_max)
    sum_lx = _seq_sum(wx * l)
    sum_l2 = _seq_sum(w * l * l)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
    best = scale * sum_lx
    for t in range(-9, 10):
        if t == 0:
            continue
        trial = codes(-(F32(nmax) + F32(0.1) * F32(t)) / x_max)
        trial_lx = _seq_sum(wx * trial)
        trial_l2 = _seq_sum(w * trial * trial)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        with np.errstate(divide="ignore", invalid="ignore"):
            trial_scale = trial_lx / trial_l2
        l = np.where(better, trial, l)
        scale = np.where(better, trial_scale, scale)
        best = np.where(better, trial_scale * trial_lx, best)
    scale = np.where(zero, F32(0), scale)
    stored = np.where(zero, F32(0), l + F32(nmax))
    return _Fit(stored.astype(np.uint8), scale)


def _q6_k_superblocks(x):
    """Q6_K blocks of super-blocks x [m, 256]: uint8 [m, 210]."""
    m = x.shape[0]
    cols = _positions_first(x, 16)  # [16, 16 m]: sub-block j of super-block b is column 16 b + j
    fit = _fit_scale(cols, nmax=32)
    scales = fit.scale.reshape(m, 16)
    # The super-scale: from the sub-block scale of largest magnitude (the first on a tie).
    which = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(m), which]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d = _fp16(F32(1) / iscale)
    sub_scales = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)

    # The codes again, against the scales as stored.
    sub_d = (d.astype(F32)[:, None] * sub_scales.astype(F32)).reshape(-1)  # [16 m]
    nonzero = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = _nearest_int(cols / np.where(nonzero, sub_d, F32(1)))
    requantized = (np.clip(requantized, -32, 31) + 32).astype(np.uint8)
    q = np.where(nonzero, requantized, fit.codes)  # a zero scale keeps the codes of the fit
    q = q.T.reshape(m, 2, 4, 32)  # [super-block, 128-value half c, quarter k, l]

    # ql byte 64 c + l: value 128 c + l (low nibble), 128 c + 64 + l (high); byte 64 c + 32 + l:
    # values 128 c + 32 + l and 128 c + 96 + l. qh byte 32 c + l: the top 2 bits of the four
    # values 128 c + 32 k + l at bits 2k.
    low = q & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4),
                         low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    top = q >> 4
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(m, 128), qh.reshape(m, 64),
                             sub_scales.view(np.uint8), d.view(np.uint8).reshape(m, 2)], axis=1)
    blocks[empty] = 0  # llama.cpp writes an all-zero block (d = 0)
    return blocks


# ----------------------------------------------------------------------------- entry points


def _quantize_rows(weights, superblocks, block_bytes):
    """Rows float32 [N, K] (K a multiple of 256) -> uint8 [N, K / 256 * block_bytes], the
    super-blocks quantized by `superblocks` in chunks of CHUNK_SUPERBLOCKS."""
    weights = np.asarray(weights, F32)
    if weights.ndim != 2 or weights.shape[1] % QK_K:
        raise ValueError(f"K-quants need rows whose length is a multiple of {QK_K}, "
                         f"got shape {weights.shape}")
    n = weights.shape[0]
    k = weights.shape[1]
    flat = weights.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], block_bytes), np.uint8)
    for start in range(0, flat.shape[0], CHUNK_SUPERBLOCKS):
        stop = start + CHUNK_SUPERBLOCKS
        out[start:stop] = superblocks(flat[start:stop])
    return out.reshape(n, k // QK_K * block_bytes)


def quantize_q4_k(weights):
    """float32 [N, K] -> Q4_K blocks, uint8 [N, K / 256 * 144] (llama.cpp's
    quantize_row_q4_K_ref)."""
    return _quantize_rows(weights, _q4_k_superblocks, 144)


def quantize_q5_k(weights):
    """float32 [N, K] -> Q5_K blocks, uint8 [N, K / 256 * 176] (llama.cpp's
    quantize_row_q5_K_ref)."""
    return _quantize_rows(weights, _q5_k_superblocks, 176)


def quantize_q6_k(weights):
    """float32 [N, K] -> Q6_K blocks, uint8 [N, K / 256 * 210] (llama.cpp's
    quantize_row_q6_K_ref)."""
    return _quantize_rows(weights, _q6_k_superblocks, 210)
