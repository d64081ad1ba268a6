"""Group-quantized weights: :class:`QTensor`, the quantizers and the GGUF Q8_0/Q4_0/Q4_1 repacking.

A weight W [N, K] is quantized in groups of G values along K, one scale d (and for asymmetric
int4 a minimum m) per group: int8 ``W = d * q`` (G = 32, 64, ...; GGUF Q8_0 is G = 32), int4
(G = 32) ``W = d * (q - 8)`` (Q4_0) or ``W = d * q + m`` (Q4_1); q in [-127, 127] or [0, 15]. The
quantizers are bit-exact with the ``gguf`` package's, generalised to other G and float32 scales.

docs/quantization.rst describes the packed layout (rows in panels of 16, shapes checked by
:func:`check_qtensor`) and ``parts``: into how many int8 parts (2 or 3) ``qmatmul`` splits
each block of the activations."""
import numpy as np

from .._kernels.layout import BLOCK, PANEL, check_packed, to_float32
from ..errors import ModelFormatError


class QTensor:
    """A [N, K] weight matrix quantized in groups along K, in the packed panel layout."""
    __slots__ = ("shape", "bits", "group", "qs", "scales", "mins", "parts")
    dtype = np.dtype(np.uint8)  # so generic code asking for a dtype gets an answer

    def __init__(self, shape, bits, group, qs, scales, mins=None, parts=None):
        self.shape, self.bits, self.group = (int(shape[0]), int(shape[1])), int(bits), int(group)
        self.qs, self.scales, self.mins = qs, scales, mins
        self.parts = (2 if self.bits == 8 else 3) if parts is None else parts
        check_qtensor(self, "QTensor")

    @property
    def asymmetric(self):
        return self.mins is not None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.qs, self.scales, self.mins) if a is not None)

    @property
    def kind(self):
        """A short description: 'int8 g32 fp16', 'int4 g32 asym fp16' ..."""
        a = " asym" if self.asymmetric else ""
        s = "fp16" if self.scales.dtype == np.float16 else "fp32"
        return f"int{self.bits} g{self.group}{a} {s}"

    def __repr__(self):
        return f"QTensor({self.shape}, {self.kind})"

    def codes(self, rows=None):
        """The integer codes q [len(rows), K] (int16; int8 minus its +128 offset, int4 0..15)."""
        n, k = self.shape
        rows = np.arange(n) if rows is None else np.asarray(rows)
        p, r = rows // PANEL, rows % PANEL
        q = self.qs[p].reshape(len(rows), k // BLOCK, -1, PANEL, 4)[np.arange(len(rows)), :, :, r]
        if self.bits == 4:  # low nibbles: values 0..15 of the block, high: 16..31
            q = np.concatenate([q & 15, q >> 4], axis=2)
        return q.reshape(len(rows), k).astype(np.int16) - (128 if self.bits == 8 else 0)

    def group_params(self, rows=None):
        """(scales, mins or None) as float32 [len(rows), K/G]."""
        rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows)
        p, r = rows // PANEL, rows % PANEL
        m = None if self.mins is None else self.mins[p, :, r].astype(np.float32)
        return self.scales[p, :, r].astype(np.float32), m

    def dequantize(self, rows=None):
        """W (or the given rows of it) as float32 [len(rows), K]."""
        q = self.codes(rows).astype(np.float32)
        d, m = self.group_params(rows)
        qg = q.reshape(len(q), -1, self.group)
        if m is not None:
            return (d[:, :, None] * qg + m[:, :, None]).reshape(q.shape)
        return (d[:, :, None] * (qg - np.float32(8) if self.bits == 4 else qg)).reshape(q.shape)


def check_qtensor(t, where):
    """Raise ModelFormatError unless the arrays of `t` agree with its shape, bits and group."""
    try:
        check_packed(t, where)
    except ValueError as e:
        raise ModelFormatError(str(e)) from None


def _roundf(a):
    # Round half away from zero, computed as the gguf package (and ggml's C reference) does.
    b = np.abs(a)
    f = np.floor(b)
    return np.sign(a) * (f + np.floor(2 * (b - f)))


def pack(codes, scales, mins, bits, group, rows=1024, parts=None):
    """A QTensor (with `parts`) from integer codes [N, K] (int8 values for 8 bits, 0..15 for 4
    bits) and per-group scales (and mins) [N, K/G] (float16 or float32); `codes` may be a function
    (r0, r1) -> codes[r0:r1], called `rows` rows at a time to bound the temporary memory."""
    n, k = codes.shape if hasattr(codes, "shape") else (scales.shape[0], codes(0, 1).shape[1])
    p, nb = -(-n // PANEL), k // BLOCK
    qs = np.empty((p, nb, 512 if bits == 8 else 256), np.uint8)
    for r0 in range(0, n, rows):  # rows is a multiple of PANEL
        c = codes(r0, min(n, r0 + rows)) if callable(codes) else codes[r0:r0 + rows]
        c = np.pad(c, ((0, -len(c) % PANEL), (0, 0)))
        q = c.reshape(-1, PANEL, nb, 8, 4).transpose(0, 2, 3, 1, 4)
        if bits == 8:
            q = (q.astype(np.int16) + 128).astype(np.uint8)
        else:
            q = q.astype(np.uint8)
            q = q[:, :, :4] | (q[:, :, 4:] << 4)
        qs[r0 // PANEL:r0 // PANEL + len(q)] = q.reshape(len(q), nb, -1)

    def panels(a):
        return None if a is None else np.ascontiguousarray(
            np.pad(a, ((0, p * PANEL - n), (0, 0))).reshape(p, PANEL, -1).transpose(0, 2, 1))
    return QTensor((n, k), bits, group, qs, panels(scales), panels(mins), parts)


def quantize(w, bits=8, group=32, asymmetric=False, scale_dtype=np.float16, parts=None):
    """Quantize a float weight matrix [N, K] (any float dtype, or uint16 bfloat16 bits) into a
    QTensor: int8 symmetric (GGUF Q8_0's rule), int4 symmetric (Q4_0's) or asymmetric (Q4_1's)."""
    w = to_float32(np.asarray(w))
    n, k = w.shape
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if asymmetric and bits != 4:
        raise ValueError("asymmetric quantization is for 4 bits only")
    if group < BLOCK or group & (group - 1) or k % group or (bits == 4 and group != BLOCK):
        raise ValueError(f"group size {group} is invalid for K = {k} and {bits} bits "
                         f"(int8: a power of two >= 32 dividing K; int4: 32)")
    g = w.reshape(n, k // group, group)
    mins = None
    with np.errstate(divide="ignore", invalid="ignore"):
        if bits == 8:
            d = np.abs(g).max(axis=2, keepdims=True) / np.float32(127)
            q = _roundf(g * np.where(d == 0, 0, 1 / d)).astype(np.int8)
        elif not asymmetric:
            big = np.take_along_axis(g, np.abs(g).argmax(axis=2)[:, :, None], axis=2)
            d = big / np.float32(-8)
            q = np.trunc(g * np.where(d == 0, 0, 1 / d) + np.float32(8.5)).astype(np.uint8)
        else:
            lo = g.min(axis=2, keepdims=True)
            d = (g.max(axis=2, keepdims=True) - lo) / np.float32(15)
            q = np.trunc((g - lo) * np.where(d == 0, 0, 1 / d) + np.float32(0.5)).astype(np.uint8)
            mins = lo[:, :, 0].astype(scale_dtype)
        if bits == 4:
            q = np.minimum(q, 15)
    return pack(q.reshape(n, k), d[:, :, 0].astype(scale_dtype), mins, bits, group, parts=parts)


# GGUF block layouts: type name -> (bytes per 32 values, bits, has a minimum)
GGUF_NATIVE = {"Q8_0": (34, 8, False), "Q4_0": (18, 4, False), "Q4_1": (20, 4, True)}


def from_gguf_blocks(raw, kind, shape, parts=None):
    """A QTensor from the raw bytes [N, K/32 * block bytes] of a GGUF Q8_0/Q4_0/Q4_1 tensor."""
    size, bits, has_min = GGUF_NATIVE[kind]
    n, k = shape
    b = np.asarray(raw).reshape(n, k // BLOCK, size)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[:, :, 0]
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16)[:, :, 0] if has_min else None
    start = 4 if has_min else 2

    def codes(r0, r1):
        body = b[r0:r1, :, start:]
        if bits == 8:
            return body.view(np.int8).reshape(r1 - r0, k)
        # byte i: value i in the low nibble, value i + 16 in the high nibble
        return np.concatenate([body & 15, body >> 4], axis=2).reshape(r1 - r0, k)
    return pack(codes, d, m, bits, BLOCK, parts=parts)


def quantize_weights(weights, bits=8, group=32, asymmetric=False, scale_dtype=np.float16,
                     keep=(), progress=None, parts=None):
    """A new canonical weight dict with every matrix quantized, except norms (always kept), the
    names in `keep` ("tok_embeddings", "output") and matrices whose K is not a multiple of
    `group` (kept as they are). Already-quantized matrices are dequantized first."""
    out = {}
    for name, w in (progress or (lambda x: x))(list(weights.items())):
        if isinstance(w, QTensor):
            w = w.dequantize()
        out[name] = w if w.ndim != 2 or name in keep or w.shape[1] % group else \
            quantize(w, bits, group, asymmetric, scale_dtype, parts)
    return out
