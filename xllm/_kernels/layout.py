"""The memory layouts the kernels read, shared by the compiled kernels, the NumPy reference and
the Python layer: quantized weights in panels of PANEL rows and blocks of BLOCK values
(gemm_q.h), KV caches in blocks of KV_BLOCK rows (the attention kernel), bfloat16 as uint16."""
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
