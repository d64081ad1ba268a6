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
"""
import numpy as np

PANEL = 16  # rows of a quantized W interleaved together
BLOCK = 32  # values per quantized block (the kernel's unit along K)
KV_BLOCK = 32  # rows per block of a KV cache (K: [blocks, kv_dim, KV_BLOCK], transposed)


def to_float32(w):
    """A float32 copy (or view) of a weight array of any supported dtype."""
    if w.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
        return (w.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(w, dtype=np.float32)


def check_packed(t, where):
    """Raise ValueError unless the arrays of `t` agree with its shape, bits and group."""
    n, k = t.shape
    if t.bits not in (4, 8):
        raise ValueError(f"{where}: {t.bits}-bit weights are not supported (use 8 or 4)")
    if not isinstance(t.parts, (int, np.integer)) or t.parts not in (2, 3):
        raise ValueError(f"{where}: parts (of x, in qmatmul) must be 2 or 3, got {t.parts!r}")
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
