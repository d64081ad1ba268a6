"""The memory layouts the kernels read, shared by the compiled kernels, the NumPy reference and
the Python layer: quantized weights in panels of PANEL rows and blocks of BLOCK values
(gemm_q.h), KV caches in blocks of KV_BLOCK rows (attention.h), bfloat16 as uint16.

A quantized weight W [N, K] (bits 8 or 4, groups of G values along K, one scale per group and,
for asymmetric int4, one minimum) is held in three arrays. Its rows are taken PANEL = 16 at a
time (a panel; the last one padded with zero rows), P = ceil(N / 16) panels, and each BLOCK =
32-value block of the 16 rows is interleaved so that one 64-byte line holds 4 consecutive values
of each row (the operand of AVX-512 VNNI's ``vpdpbusd``). For panel p, block b, row r of the
panel (row 16p + r of W) and t = 0..3:

- int8, ``qs`` uint8 [P, K/32, 512]: byte ``64*j + 4*r + t`` (j = 0..7) is ``q + 128`` for
  column 32b + 4j + t, q the signed code (-127..127);
- int4, ``qs`` uint8 [P, K/32, 256]: byte ``64*j + 4*r + t`` (j = 0..3) holds column 32b + 4j + t
  in its low nibble and column 32b + 16 + 4j + t in its high nibble (q in 0..15);
- ``scales`` and ``mins`` (float16 or float32) [P, K/G, 16]: group g of row 16p + r at
  ``[p, g, r]``; ``mins`` is None for symmetric weights.

W = d * q (int8), d * (q - 8) (symmetric int4) or d * q + m (asymmetric int4), d and m the
scale and minimum of the value's group: ``dequantize_rows``, in float32, operation for operation
as gemm_q.h's ``xq_dequant_row``. ``check_packed`` checks that the arrays agree with the shape.

Codecs (``CODECS``; gemm_k.h states their arithmetic): GGUF Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, at
the size of their GGUF blocks. Their codes c (4, 5 or 6 bits, unsigned) are held as

- ``qs`` uint8 [P, K/32, 256]: the low 4 bits, in the int4 layout above;
- ``high`` uint8 [P, K/32, 64 * (bits - 4)] (None for 4 bits): plane e (bit 4 + e of the codes)
  at bytes ``64*e .. 64*e + 63``, one little-endian 64-bit mask per 64-byte line of ``qs`` (line
  l = 0..3 the low nibbles of line l, 4..7 the high nibbles of line l - 4), bit i for byte i;
- ``scales`` float16 [P, K/G, 16]: d (Q5_0, Q5_1; G = 32) or the super-block's D (the K-quants,
  G = 256); ``mins`` float16, the same shape: m (Q5_1) or DMIN (Q4_K, Q5_K), else None;
- ``sub`` (the K-quants, else None): Q4_K and Q5_K uint8 [P, K/256, 12, 16], the 12 bytes of
  packed 6-bit scale and minimum codes of each super-block as GGUF stores them, byte i of row r
  at ``[p, s, i, r]``; Q6_K int8 [P, K/256, 16, 16], the scale of values 16i .. 16i + 15.

Per 32-value block b of a row, ws and wm are float32 (exact: a float16 times a 6 or 8-bit
integer): Q5_0 W = d (c - 16); Q5_1 W = d c + m; Q4_K, Q5_K W = ws c + wm with ws = D sc_b,
wm = -(DMIN m_b); Q6_K W = ws_h (c - 32) with ws_h = D s_{2b + h} for half h (values 16h ..
16h + 15 of the block). The product is rounded before wm is added (``dequantize_rows``, and
gemm_k.h's ``xk_dequant_row``), as the ``gguf`` package's dequantizers do.
"""
from typing import NamedTuple, Optional

import numpy as np

PANEL = 16  # rows of a quantized W interleaved together
BLOCK = 32  # values per quantized block (the kernel's unit along K)
KV_BLOCK = 32  # rows per block of a KV cache (K: [blocks, kv_dim, KV_BLOCK], transposed)
SUPER = 256  # values per super-block of the K-quants
K_SCALE_BYTES = 12  # bytes of packed 6-bit scale and minimum codes per Q4_K / Q5_K super-block


class Codec(NamedTuple):
    """A packed format of gemm_k.h (see the module docstring)."""
    name: str
    ident: int  # its number in gemm_k.h (XK_*)
    bits: int  # bits per code
    offset: int  # subtracted from the codes (symmetric codecs), else 0
    group: int  # values per float16 scale (and minimum)
    asymmetric: bool  # a minimum per block besides the scale
    sub: Optional[str]  # "scale_min6" (Q4_K, Q5_K), "int8x16" (Q6_K) or None
    gguf_bytes: int  # bytes of one GGUF block (of `group` values)

    @property
    def planes(self):
        return self.bits - 4


CODECS = {c.name: c for c in (
    Codec("Q5_0", 1, 5, 16, BLOCK, False, None, 22),
    Codec("Q5_1", 2, 5, 0, BLOCK, True, None, 24),
    Codec("Q4_K", 3, 4, 0, SUPER, True, "scale_min6", 144),
    Codec("Q5_K", 4, 5, 0, SUPER, True, "scale_min6", 176),
    Codec("Q6_K", 5, 6, 32, SUPER, False, "int8x16", 210),
)}


def sub_shape(codec, panels, k):
    """The shape and dtype of a codec's ``sub`` array (None if it has none)."""
    if codec.sub == "scale_min6":
        return (panels, k // SUPER, K_SCALE_BYTES, PANEL), np.uint8
    if codec.sub == "int8x16":
        return (panels, k // SUPER, SUPER // 16, PANEL), np.int8
    return None


def to_float32(w):
    """A float32 copy (or view) of a weight array of any supported dtype."""
    if w.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
        return (w.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(w, dtype=np.float32)


def valid_parts(parts):
    """Whether `parts` is 1, 2 or 3 as an integer (not a bool, float or string)."""
    is_int = isinstance(parts, (int, np.integer)) and not isinstance(parts, bool)
    return is_int and parts in (1, 2, 3)


def check_packed(t, where):
    """Raise ValueError unless the arrays of `t` agree with its shape, bits and group (and
    codec)."""
    if getattr(t, "codec", None) is not None:
        return _check_codec(t, where)
    n, k = t.shape
    if t.bits not in (4, 8):
        raise ValueError(f"{where}: {t.bits}-bit weights are not supported (use 8 or 4)")
    if not valid_parts(t.parts):
        raise ValueError(f"{where}: parts (of x, in qmatmul) must be 1, 2 or 3, got {t.parts!r}")
    g = t.group
    if g < BLOCK or g & (g - 1) or k % g or (t.bits == 4 and g != BLOCK):
        raise ValueError(f"{where}: group size {g} is invalid for K = {k} and {t.bits} bits "
                               f"(int8: a power of two >= 32 dividing K; int4: 32)")
    p = -(-n // PANEL)
    want = {"qs": ((p, k // BLOCK, 512 if t.bits == 8 else 256), (np.uint8,)),
            "scales": ((p, k // g, PANEL), (np.float16, np.float32))}
    if t.mins is not None:
        if t.bits != 4:
            raise ValueError(f"{where}: asymmetric (mins) weights must be int4")
        want["mins"] = (want["scales"][0], (t.scales.dtype,))
    for name, (shape, dtypes) in want.items():
        a = getattr(t, name)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype not in dtypes \
                or not a.flags.c_contiguous:
            got = (a.shape, str(a.dtype)) if isinstance(a, np.ndarray) else type(a).__name__
            spec = f"{shape} {'/'.join(np.dtype(d).name for d in dtypes)}"
            raise ValueError(f"{where}: {name} of a {t.shape} int{t.bits} g{g} tensor must "
                                   f"be C-contiguous {spec}, got {got}")


def _check_codec(t, where):
    """check_packed for a tensor of a codec."""
    n, k = t.shape
    codec = CODECS.get(t.codec)
    if codec is None:
        raise ValueError(f"{where}: unknown codec {t.codec!r} (known: {', '.join(CODECS)})")
    if not valid_parts(t.parts):
        raise ValueError(f"{where}: parts (of x, in qmatmul) must be 1, 2 or 3, got {t.parts!r}")
    if t.bits != codec.bits or t.group != codec.group:
        raise ValueError(f"{where}: a {codec.name} tensor has {codec.bits}-bit codes in groups of "
                         f"{codec.group}, got {t.bits} bits, group {t.group}")
    if k % codec.group:
        raise ValueError(f"{where}: the rows of a {codec.name} tensor must be a multiple of "
                         f"{codec.group} values long, got K = {k}")
    p = -(-n // PANEL)
    want = {"qs": ((p, k // BLOCK, 256), np.uint8),
            "scales": ((p, k // codec.group, PANEL), np.float16),
            "mins": ((p, k // codec.group, PANEL), np.float16) if codec.asymmetric else None,
            "high": ((p, k // BLOCK, 64 * codec.planes), np.uint8) if codec.planes else None,
            "sub": sub_shape(codec, p, k)}
    for name, spec in want.items():
        a = getattr(t, name)
        if spec is None:
            if a is not None:
                raise ValueError(f"{where}: a {codec.name} tensor has no {name}, got "
                                 f"{type(a).__name__}")
            continue
        shape, dtype = spec
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype \
                or not a.flags.c_contiguous:
            got = (a.shape, str(a.dtype)) if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{where}: {name} of a {t.shape} {codec.name} tensor must be "
                             f"C-contiguous {shape} {np.dtype(dtype).name}, got {got}")


def unpack_codes(qs, bits, shape, rows=None):
    """The integer codes [len(rows), K] (int16) of the given rows (default: all N) of a packed
    [N, K] weight: int8 codes without their +128 offset (-127..127), int4 codes as stored
    (0..15)."""
    n, k = shape
    rows = np.arange(n) if rows is None else np.asarray(rows)
    panel = rows // PANEL
    lane = rows % PANEL
    # a block of a panel, [values per row / 4][PANEL rows][4 values]: each row's part of it
    blocks = qs[panel].reshape(len(rows), k // BLOCK, -1, PANEL, 4)
    codes = blocks[np.arange(len(rows)), :, :, lane]
    if bits == 4:  # low nibbles: values 0..15 of the block, high: 16..31
        codes = np.concatenate([codes & 15, codes >> 4], axis=2)
    offset = 128 if bits == 8 else 0
    return codes.reshape(len(rows), k).astype(np.int16) - offset


def unpack_group_params(scales, mins, shape, rows=None):
    """(scales, mins or None) of the given rows (default: all N) of a packed [N, K] weight, as
    float32 [len(rows), K/G]."""
    rows = np.arange(shape[0]) if rows is None else np.asarray(rows)
    panel = rows // PANEL
    lane = rows % PANEL
    row_mins = None if mins is None else mins[panel, :, lane].astype(np.float32)
    row_scales = scales[panel, :, lane].astype(np.float32)
    return row_scales, row_mins


def dequantize_rows(qs, scales, mins, bits, group, shape, rows=None):
    """The given rows (default: all N) of a packed [N, K] weight as float32 [len(rows), K]."""
    codes = unpack_codes(qs, bits, shape, rows).astype(np.float32)
    row_scales, row_mins = unpack_group_params(scales, mins, shape, rows)
    grouped = codes.reshape(len(codes), -1, group)
    if row_mins is not None:  # asymmetric int4: d * q + m (the product rounded first)
        return (row_scales[:, :, None] * grouped + row_mins[:, :, None]).reshape(codes.shape)
    if bits == 4:  # symmetric int4: d * (q - 8)
        grouped = grouped - np.float32(8)
    return (row_scales[:, :, None] * grouped).reshape(codes.shape)


def unpack_codec_codes(qs, high, shape, rows=None):
    """The unsigned codes [len(rows), K] (int16) of the given rows of a codec tensor: the low
    nibbles of ``qs`` and the bit planes of ``high`` (None: 4-bit codes)."""
    n, k = shape
    rows = np.arange(n) if rows is None else np.asarray(rows)
    codes = unpack_codes(qs, 4, shape, rows).reshape(len(rows), k // BLOCK, BLOCK)
    if high is not None:
        planes = high.shape[2] // 64
        lines = high[rows // PANEL].reshape(len(rows), k // BLOCK, planes, 8, 8)
        bits = np.unpackbits(lines, axis=-1, bitorder="little")  # [.., plane, line, byte 4r + t]
        bits = bits.reshape(len(rows), k // BLOCK, planes, 8, PANEL, 4)
        bits = bits[np.arange(len(rows)), :, :, :, rows % PANEL]  # [row, block, plane, line, t]
        bits = bits.reshape(len(rows), k // BLOCK, planes, BLOCK).astype(np.int16)
        for e in range(planes):
            codes = codes | (bits[:, :, e] << (4 + e))
    return codes.reshape(len(rows), k)


def _scale_min6(sub, rows):
    """(sc, m) [len(rows), K/256, 8] (int16) of the packed 6-bit codes `sub` of Q4_K / Q5_K."""
    s = sub[rows // PANEL, :, :, rows % PANEL].astype(np.int16)  # [row, super, 12]
    low = s[:, :, 0:4]
    mid = s[:, :, 4:8]
    top = s[:, :, 8:12]
    sc = np.concatenate([low & 63, (top & 15) | ((low >> 6) << 4)], axis=2)
    m = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=2)
    return sc, m


def codec_block_params(t, rows=None):
    """(ws, wm) of the given rows (default: all N) of a codec tensor `t`, float32: ws
    [len(rows), K/32, 2] the scale of each half of each block (the same for both halves but in
    Q6_K), wm [len(rows), K/32] the minimums (None for the symmetric codecs)."""
    n, k = t.shape
    codec = CODECS[t.codec]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    d = t.scales[rows // PANEL, :, rows % PANEL].astype(np.float32)  # [row, K / group]
    mins = None if t.mins is None else t.mins[rows // PANEL, :, rows % PANEL].astype(np.float32)
    if codec.sub is None:
        ws = np.repeat(d[:, :, None], 2, axis=2)
        return ws, mins
    if codec.sub == "int8x16":
        s = t.sub[rows // PANEL, :, :, rows % PANEL].astype(np.float32)  # [row, super, 16]
        ws = d[:, :, None] * s
        return ws.reshape(len(rows), k // BLOCK, 2), None
    sc, m = _scale_min6(t.sub, rows)
    ws = d[:, :, None] * sc.astype(np.float32)
    wm = -(mins[:, :, None] * m.astype(np.float32))
    ws = np.repeat(ws.reshape(len(rows), k // BLOCK)[:, :, None], 2, axis=2)
    return ws, wm.reshape(len(rows), k // BLOCK)


def dequantize_codec_rows(t, rows=None):
    """The given rows (default: all N) of a codec tensor `t` as float32 [len(rows), K]."""
    n, k = t.shape
    codec = CODECS[t.codec]
    codes = unpack_codec_codes(t.qs, t.high, t.shape, rows) - codec.offset
    ws, wm = codec_block_params(t, rows)
    halves = codes.reshape(len(codes), k // BLOCK, 2, BLOCK // 2).astype(np.float32)
    w = ws[:, :, :, None] * halves
    if wm is not None:
        w = w + wm[:, :, None, None]
    return w.reshape(len(codes), k)
