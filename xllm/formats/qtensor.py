"""Group-quantized weights: :class:`QTensor`, the quantizers and the GGUF Q8_0/Q4_0/Q4_1 repacking.

A weight W [N, K] is quantized in groups of G values along K, one scale d (and for asymmetric
int4 a minimum m) per group: int8 ``W = d * q`` (G = 32, 64, ...; GGUF Q8_0 is G = 32), int4
(G = 32) ``W = d * (q - 8)`` (Q4_0) or ``W = d * q + m`` (Q4_1); q in [-127, 127] or [0, 15]. The
quantizers are bit-exact with the ``gguf`` package's, generalised to other G and float32 scales.

docs/quantization.rst describes the packed layout (rows in panels of 16, shapes checked by
:func:`check_qtensor`) and ``parts``: into how many int8 parts (2 or 3) ``qmatmul`` splits
each block of the activations."""
import numpy as np

from .._kernels.layout import (BLOCK, CODECS, K_SCALE_BYTES, PANEL, SUPER, check_packed,
                               codec_block_params, dequantize_codec_rows, dequantize_rows,
                               to_float32, unpack_codec_codes, unpack_codes, unpack_group_params)
from ..errors import ModelFormatError
from .registry import FORMATS, panel_block_bytes


class QTensor:
    """A [N, K] weight matrix quantized in groups along K, in the packed panel layout; or, with a
    ``codec`` (layout.CODECS: Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), in that codec's layout, which adds
    the arrays ``high`` (bit planes above the low nibbles) and ``sub`` (sub-block scales)."""
    __slots__ = ("shape", "bits", "group", "qs", "scales", "mins", "parts", "codec", "high",
                 "sub")
    dtype = np.dtype(np.uint8)  # so generic code asking for a dtype gets an answer

    def __init__(self, shape, bits, group, qs, scales, mins=None, parts=None, codec=None,
                 high=None, sub=None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.bits = int(bits)
        self.group = int(group)
        self.qs = qs
        self.scales = scales
        self.mins = mins
        self.parts = default_parts(self.bits) if parts is None else parts
        self.codec = codec
        self.high = high
        self.sub = sub
        check_qtensor(self, "QTensor")

    @property
    def asymmetric(self):
        return self.mins is not None

    @property
    def nbytes(self):
        arrays = (self.qs, self.scales, self.mins, self.high, self.sub)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def kind(self):
        """A short description: 'int8 g32 fp16', 'int4 g32 asym fp16' ..., or the codec's name."""
        if self.codec is not None:
            return self.codec
        return describe(self.bits, self.group, self.asymmetric, self.scales.dtype)

    def __repr__(self):
        return f"QTensor({self.shape}, {self.kind})"

    def codes(self, rows=None):
        """The integer codes q [len(rows), K] (int16; int8 minus its +128 offset, int4 0..15, a
        codec's unsigned codes as stored)."""
        if self.codec is not None:
            return unpack_codec_codes(self.qs, self.high, self.shape, rows)
        return unpack_codes(self.qs, self.bits, self.shape, rows)

    def group_params(self, rows=None):
        """(scales, mins or None) as float32 [len(rows), K/G]; for a codec, per 32-value block:
        (scales [len(rows), K/32, 2] of each half block, mins [len(rows), K/32] or None)."""
        if self.codec is not None:
            return codec_block_params(self, rows)
        return unpack_group_params(self.scales, self.mins, self.shape, rows)

    def dequantize(self, rows=None):
        """W (or the given rows of it) as float32 [len(rows), K]."""
        if self.codec is not None:
            return dequantize_codec_rows(self, rows)
        return dequantize_rows(self.qs, self.scales, self.mins, self.bits, self.group,
                               self.shape, rows)


def default_parts(bits):
    """Into how many int8 parts qmatmul splits each activation block by default: 2 for int8
    weights (faster), 3 for int4 (more exact)."""
    return 2 if bits == 8 else 3


def describe(bits, group, asymmetric, scale_dtype):
    """'int8 g32 fp16', 'int4 g32 asym fp16' ...: a QTensor's kind."""
    asym = " asym" if asymmetric else ""
    scales = "fp16" if np.dtype(scale_dtype) == np.float16 else "fp32"
    return f"int{bits} g{group}{asym} {scales}"


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
    if callable(codes):
        n = scales.shape[0]
        k = codes(0, 1).shape[1]
    else:
        n = codes.shape[0]
        k = codes.shape[1]
    n_panels = -(-n // PANEL)
    n_blocks = k // BLOCK
    qs = np.empty((n_panels, n_blocks, panel_block_bytes(bits)), np.uint8)
    for r0 in range(0, n, rows):  # rows is a multiple of PANEL
        chunk = codes(r0, min(n, r0 + rows)) if callable(codes) else codes[r0:r0 + rows]
        chunk = np.pad(chunk, ((0, -len(chunk) % PANEL), (0, 0)))
        q = chunk.reshape(-1, PANEL, n_blocks, 8, 4).transpose(0, 2, 3, 1, 4)
        if bits == 8:
            q = (q.astype(np.int16) + 128).astype(np.uint8)
        else:
            q = q.astype(np.uint8)
            q = q[:, :, :4] | (q[:, :, 4:] << 4)
        first_panel = r0 // PANEL
        qs[first_panel:first_panel + len(q)] = q.reshape(len(q), n_blocks, -1)

    def panels(a):
        """Per-group values [N, K/G] as [panels, K/G, PANEL], rows padded with zeros."""
        if a is None:
            return None
        padded = np.pad(a, ((0, n_panels * PANEL - n), (0, 0)))
        return np.ascontiguousarray(padded.reshape(n_panels, PANEL, -1).transpose(0, 2, 1))
    return QTensor((n, k), bits, group, qs, panels(scales), panels(mins), parts)


def quantize(w, bits=8, group=32, asymmetric=False, scale_dtype=np.float16, parts=None):
    """Quantize a float weight matrix [N, K] (any float dtype, or uint16 bfloat16 bits) into a
    QTensor: int8 symmetric (GGUF Q8_0's rule), int4 symmetric (Q4_0's) or asymmetric (Q4_1's)."""
    w = to_float32(np.asarray(w))
    n, k = w.shape
    _check_quantize_options(bits, group, asymmetric, k)
    groups = w.reshape(n, k // group, group)
    mins = None
    with np.errstate(divide="ignore", invalid="ignore"):
        if bits == 8:
            scales, q = _quantize_int8(groups)
        elif not asymmetric:
            scales, q = _quantize_int4_symmetric(groups)
        else:
            scales, q, lowest = _quantize_int4_asymmetric(groups)
            mins = lowest[:, :, 0].astype(scale_dtype)
        if bits == 4:
            q = np.minimum(q, 15)
    return pack(q.reshape(n, k), scales[:, :, 0].astype(scale_dtype), mins, bits, group,
                parts=parts)


def _check_quantize_options(bits, group, asymmetric, k):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if asymmetric and bits != 4:
        raise ValueError("asymmetric quantization is for 4 bits only")
    if group < BLOCK or group & (group - 1) or k % group or (bits == 4 and group != BLOCK):
        raise ValueError(f"group size {group} is invalid for K = {k} and {bits} bits "
                         f"(int8: a power of two >= 32 dividing K; int4: 32)")


def _inverse(scales):
    """1 / scales, and 0 where a scale is 0 (a group of zeros)."""
    return np.where(scales == 0, 0, 1 / scales)


def _quantize_int8(groups):
    """(scales, codes) of Q8_0's rule: d = max |w| / 127, q = round(w / d)."""
    scales = np.abs(groups).max(axis=2, keepdims=True) / np.float32(127)
    return scales, _roundf(groups * _inverse(scales)).astype(np.int8)


def _quantize_int4_symmetric(groups):
    """(scales, codes) of Q4_0's rule: d = (the value of largest magnitude) / -8,
    q = trunc(w / d + 8.5)."""
    largest = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[:, :, None], axis=2)
    scales = largest / np.float32(-8)
    codes = np.trunc(groups * _inverse(scales) + np.float32(8.5)).astype(np.uint8)
    return scales, codes


def _quantize_int4_asymmetric(groups):
    """(scales, codes, minimums) of Q4_1's rule: d = (max - min) / 15,
    q = trunc((w - min) / d + 0.5)."""
    lowest = groups.min(axis=2, keepdims=True)
    scales = (groups.max(axis=2, keepdims=True) - lowest) / np.float32(15)
    codes = np.trunc((groups - lowest) * _inverse(scales) + np.float32(0.5)).astype(np.uint8)
    return scales, codes, lowest


def from_gguf_blocks(raw, kind, shape, parts=None):
    """A QTensor from the raw bytes [N, K/block * block bytes] of a GGUF tensor of a PANELS format
    of the registry (Q8_0, Q4_0, Q4_1, and the codecs Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)."""
    weight_format = FORMATS[kind]
    if weight_format.codec is not None:
        return _from_codec_blocks(raw, CODECS[weight_format.codec], weight_format, shape, parts)
    bits = weight_format.bits
    n, k = shape
    blocks = np.asarray(raw).reshape(n, k // BLOCK, weight_format.block_bytes)
    scales = _float16_field(blocks, 0)
    mins = _float16_field(blocks, 2) if weight_format.asymmetric else None
    codes_start = 4 if weight_format.asymmetric else 2

    def codes(r0, r1):
        body = blocks[r0:r1, :, codes_start:]
        if bits == 8:
            return body.view(np.int8).reshape(r1 - r0, k)
        # byte i: value i in the low nibble, value i + 16 in the high nibble
        return np.concatenate([body & 15, body >> 4], axis=2).reshape(r1 - r0, k)
    return pack(codes, scales, mins, bits, BLOCK, parts=parts)


def _codec_fields(blocks, name):
    """(codes [R, K] uint8, scales [R, K/G] float16, mins or None, sub [R, K/256, 12 or 16] or
    None) of rows of GGUF blocks [R, K/block, block bytes] of codec `name` (the layouts of
    ggml's block_q5_0 ... block_q6_K)."""
    r, nb, _ = blocks.shape

    def f16(offset):
        return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[:, :, 0]

    def bits_of(field, count):
        """The bits of `field` [R, nb, bytes], little-endian, as [R, nb, count]."""
        return np.unpackbits(field, axis=2, bitorder="little")[:, :, :count]

    if name in ("Q5_0", "Q5_1"):  # d, (m,) qh (32 bits), qs: value i low nibble, 16 + i high
        start = 2 if name == "Q5_0" else 4
        qs = blocks[:, :, start + 4:start + 20]
        low = np.concatenate([qs & 15, qs >> 4], axis=2)
        codes = low | (bits_of(blocks[:, :, start:start + 4], 32) << 4)
        mins = f16(2) if name == "Q5_1" else None
        return codes.reshape(r, -1), f16(0), mins, None
    if name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales, (qh,) qs
        start = 16 if name == "Q4_K" else 48
        qs = blocks[:, :, start:start + 128].reshape(r, nb, 4, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(r, nb, SUPER)  # 64c + 32h + i
        if name == "Q5_K":  # bit s of qh[i]: value 32s + i
            qh = blocks[:, :, 16:48]
            high = np.unpackbits(qh[:, :, None, :], axis=2, bitorder="little")
            codes = codes | (high.reshape(r, nb, SUPER) << 4)
        return codes.reshape(r, -1), f16(0), f16(2), blocks[:, :, 4:4 + K_SCALE_BYTES]
    # Q6_K: ql [128], qh [64], int8 scales [16], d; halves of 128 values
    ql = blocks[:, :, 0:128].reshape(r, nb, 2, 1, 64)
    low = np.concatenate([ql & 15, ql >> 4], axis=3).reshape(r, nb, 2, 128)  # 64 s + i
    qh = blocks[:, :, 128:192].reshape(r, nb, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [.., half, s, i]: 32 s + i
    codes = low | (high.reshape(r, nb, 2, 128) << 4)
    sub = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8)
    return codes.reshape(r, -1), f16(208), None, sub


def _from_codec_blocks(raw, codec, weight_format, shape, parts, rows=1024):
    """from_gguf_blocks for a codec: decoded and packed `rows` rows at a time."""
    n, k = shape
    if k % weight_format.block:
        raise ModelFormatError(f"a {codec.name} tensor's rows must be a multiple of "
                               f"{weight_format.block} values long, got {shape}")
    blocks = np.asarray(raw).reshape(n, k // weight_format.block, weight_format.block_bytes)
    n_panels = -(-n // PANEL)
    n_blocks = k // BLOCK
    qs = np.empty((n_panels, n_blocks, 256), np.uint8)
    high = np.empty((n_panels, n_blocks, 64 * codec.planes), np.uint8) if codec.planes else None
    scales = np.zeros((n_panels, k // codec.group, PANEL), np.float16)
    mins = np.zeros_like(scales) if codec.asymmetric else None
    sub = None
    for r0 in range(0, n, rows):  # rows is a multiple of PANEL
        r1 = min(n, r0 + rows)
        codes, d, m, s = _codec_fields(blocks[r0:r1], codec.name)
        p0 = r0 // PANEL
        p1 = -(-r1 // PANEL)
        qs[p0:p1], planes = _pack_codes(codes, codec.planes)
        if high is not None:
            high[p0:p1] = planes
        scales[p0:p1] = _panels(d)
        if mins is not None:
            mins[p0:p1] = _panels(m)
        if s is not None:
            if sub is None:
                sub = np.zeros((n_panels,) + s.shape[1:] + (PANEL,), s.dtype)
            sub[p0:p1] = _panels(s.reshape(len(s), -1)).reshape(p1 - p0, s.shape[1],
                                                                s.shape[2], PANEL)
    if sub is None and codec.sub is not None:  # no rows
        sub = np.zeros((0, k // SUPER, 16 if codec.sub == "int8x16" else K_SCALE_BYTES, PANEL),
                       np.int8 if codec.sub == "int8x16" else np.uint8)
    return QTensor((n, k), codec.bits, codec.group, qs, scales, mins, parts, codec=codec.name,
                   high=high, sub=sub)


def _panels(a):
    """Per-row values [R, C] (R a multiple of PANEL but for the last rows) as [panels, C, PANEL],
    rows padded with zeros."""
    padded = np.pad(a, ((0, -len(a) % PANEL), (0, 0)))
    return padded.reshape(-1, PANEL, a.shape[1]).transpose(0, 2, 1)


def _pack_codes(codes, planes):
    """(qs [panels, K/32, 256], high [panels, K/32, 64 * planes] or None) of unsigned codes
    [R, K] (layout.py's codec layout; rows padded with zeros to whole panels)."""
    r, k = codes.shape
    codes = np.pad(codes, ((0, -r % PANEL), (0, 0)))
    # [panel, row, block, half, line, t] -> [panel, block, half, line, row, t]
    q = codes.reshape(-1, PANEL, k // BLOCK, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)
    low = q & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(len(q), k // BLOCK, 256)
    if not planes:
        return qs, None
    high = np.empty((len(q), k // BLOCK, 64 * planes), np.uint8)
    lines = q.reshape(len(q), k // BLOCK, 8, 64)  # the 8 lines of a block, byte 4 r + t
    for e in range(planes):
        bits = (lines >> (4 + e)) & 1
        masks = np.packbits(bits, axis=3, bitorder="little")  # [panel, block, line, 8]
        high[:, :, 64 * e:64 * e + 64] = masks.reshape(len(q), k // BLOCK, 64)
    return qs, high


def _float16_field(blocks, offset):
    """The float16 at byte `offset` of every block, as [N, K/32]."""
    return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[:, :, 0]


def quantize_weights(weights, bits=8, group=32, asymmetric=False, scale_dtype=np.float16,
                     keep=(), progress=None, parts=None):
    """A new canonical weight dict with every matrix quantized, except norms (always kept), the
    names in `keep` ("tok_embeddings", "output") and matrices whose K is not a multiple of
    `group` (kept as they are). Already-quantized matrices are dequantized first."""
    items = list(weights.items())
    if progress is not None:
        items = progress(items)
    out = {}
    for name, w in items:
        if isinstance(w, QTensor):
            w = w.dequantize()
        stays_dense = w.ndim != 2 or name in keep or w.shape[1] % group
        out[name] = w if stays_dense else quantize(w, bits, group, asymmetric, scale_dtype, parts)
    return out
