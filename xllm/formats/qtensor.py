"""Group-quantized weights: :class:`QTensor`, the quantizers and the GGUF Q8_0/Q4_0/Q4_1 repacking.

A weight W [N, K] is quantized in groups of G values along K, one scale d (and for asymmetric
int4 a minimum m) per group: int8 ``W = d * q`` (G = 32, 64, ...; GGUF Q8_0 is G = 32), int4
(G = 32) ``W = d * (q - 8)`` (Q4_0) or ``W = d * q + m`` (Q4_1); q in [-127, 127] or [0, 15]. The
quantizers are bit-exact with the ``gguf`` package's, generalised to other G and float32 scales.

docs/quantization.rst describes the packed layout (rows in panels of 16, shapes checked by
:func:`check_qtensor`) and ``parts``: into how many int8 parts (1, 2 or 3) ``qmatmul``
splits each block of the activations."""
import numpy as np

from .. import _kernels
from .._kernels import reference
from .._kernels.layout import (BLOCK, CODECS, PANEL, check_packed, codec_block_params,
                               dequantize_codec_rows, dequantize_rows, sub_shape, to_float32,
                               unpack_codec_codes, unpack_codes, unpack_group_params,
                               valid_parts)
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
        self.parts = default_parts(self.bits, codec) if parts is None else parts
        self.codec = codec
        self.high = high
        self.sub = sub
        check_qtensor(self, "QTensor")

    @property
    def asymmetric(self):
        return self.mins is not None

    @property
    def arrays(self):
        """The arrays that hold the weight (those it has of qs, scales, mins, high, sub)."""
        every = (self.qs, self.scales, self.mins, self.high, self.sub)
        return tuple(a for a in every if a is not None)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays)

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


def default_parts(bits, codec=None):
    """Into how many int8 parts qmatmul splits each activation block by default: 1 (8 bits per
    32 values, fastest) for the GGUF codecs (Q5_0, Q5_1 and the K-quants), 2 (about 16 bits)
    for int8 weights, 3 (about 23 bits, more exact) for int4 (Q4_0, Q4_1).

    For the codecs one part is what llama.cpp does or finer: it rounds their activations to one
    int8 part per 32 values (Q8_0, for Q5_0/Q5_1) or per 256 (Q8_K, for the K-quants). Against
    two parts it costs +0.02-0.39% perplexity on SmolLM2 (alice.txt, ctx 512), and Q4_K and
    Q6_K products of 512 rows run 1.5-1.8x faster (docs/quantization.rst, "Activation parts").
    int8 and int4 keep their parts: the default model (Q4_1) is where xllm's logits are
    compared with transformers."""
    if codec is not None:
        return 1
    if bits == 8:
        return 2
    return 3


ACTIVATION_PARTS_HELP = ("int8 parts per activation block of the quantized weights: 1 (fastest, "
                         "the precision llama.cpp keeps), 2 or 3 (default: each format's own, "
                         "1 for K-quants and Q5_0/Q5_1, 2 for Q8_0, 3 for Q4_0/Q4_1)")


def add_activation_parts_option(parser, help=ACTIVATION_PARTS_HELP, metavar="N"):
    """The ``--activation-parts`` option of the command lines (generate, serve, the tools):
    None (each format's default) or 1, 2 or 3, passed on as ``activation_parts``."""
    parser.add_argument("--activation-parts", type=int, choices=[1, 2, 3], default=None,
                        metavar=metavar, help=help)


def check_parts(parts):
    """`parts` if it is None, 1, 2 or 3; else ValueError (a user's activation_parts)."""
    if parts is None:
        return None
    if not valid_parts(parts):
        raise ValueError(f"activation_parts must be 1, 2 or 3 (or None), got {parts!r}")
    return parts


def set_parts(weights, parts):
    """Set ``parts`` of every QTensor among the values of the dict `weights` (1, 2 or 3; None
    leaves each at its format's default). ValueError for another value."""
    if check_parts(parts) is None:
        return
    for w in weights.values():
        if isinstance(w, QTensor):
            w.parts = parts


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


def from_gguf_blocks(raw, kind, shape, parts=None, empty=np.empty):
    """A QTensor from the raw bytes [N, K/32 * block bytes] of a GGUF tensor of a PANELS format
    of the registry: Q8_0, Q4_0, Q4_1 (bitwise what ``pack`` makes of their codes and scales), or
    a codec (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: repack_codec, K/256 super-blocks for the K-quants).

    A GGUF block holds its float16 scale (and minimum), then its codes in the order the packed
    layout keeps within a row (layout.py): Q8_0 value j as the int8 byte j, Q4_0/Q4_1 values j
    and j + 16 in the low and high nibble of byte j. So each 4-byte group of a block's codes
    moves whole, as one uint32, to its place in the panel (int8 codes gaining their +128 offset,
    an XOR of each byte's top bit); nothing is unpacked, and every array is copied once, straight
    from `raw` (a view of the file). The new arrays come from ``empty(shape, dtype)`` (an
    :class:`xllm.formats.arena.Arena`'s, for the loaders)."""
    weight_format = FORMATS[kind]
    if weight_format.codec is not None:
        return _from_codec_blocks(raw, CODECS[weight_format.codec], weight_format, shape, parts,
                                  empty)
    bits = weight_format.bits
    n, k = shape
    blocks = np.asarray(raw).reshape(n, k // BLOCK, weight_format.block_bytes)
    codes_start = 4 if weight_format.asymmetric else 2
    code_bytes = BLOCK * bits // 8
    words = blocks[:, :, codes_start:codes_start + code_bytes].view(np.uint32)
    qs = _into_panels(words, empty)
    if bits == 8:
        np.bitwise_xor(qs, np.uint32(0x80808080), out=qs)  # padded rows too: code 0 is 128
    n_panels = qs.shape[0]
    qs = qs.view(np.uint8).reshape(n_panels, k // BLOCK, panel_block_bytes(bits))
    scales = _float16_panels(blocks, 0, empty)
    mins = _float16_panels(blocks, 2, empty) if weight_format.asymmetric else None
    return QTensor((n, k), bits, BLOCK, qs, scales, mins, parts)


def _from_codec_blocks(raw, codec, weight_format, shape, parts, empty):
    """from_gguf_blocks for a codec: the arrays of its layout, filled by the backend's
    repack_codec (compiled, or the NumPy reference)."""
    n, k = shape
    if k % weight_format.block:
        raise ModelFormatError(f"a {codec.name} tensor's rows must be a multiple of "
                               f"{weight_format.block} values long, got {shape}")
    n_panels = -(-n // PANEL)
    n_blocks = k // BLOCK
    # not zeroed: repack_codec writes every byte. (np.zeros of a large array is calloc's, faulted
    # in 4 KB page by page on first touch, seconds for a 7B model; np.empty asks for huge pages.)
    qs = empty((n_panels, n_blocks, 256), np.uint8)
    high = empty((n_panels, n_blocks, 64 * codec.planes), np.uint8) if codec.planes else None
    scales = empty((n_panels, k // codec.group, PANEL), np.float16)
    mins = empty(scales.shape, scales.dtype) if codec.asymmetric else None
    spec = sub_shape(codec, n_panels, k)
    sub = None if spec is None else empty(*spec)
    raw = np.ascontiguousarray(np.asarray(raw).reshape(n, -1))
    _repacker()(raw, codec.name, (n, k), qs, scales, mins, high, sub)
    return QTensor((n, k), codec.bits, codec.group, qs, scales, mins, parts, codec=codec.name,
                   high=high, sub=sub)


def _repacker():
    """repack_codec of the selected kernel backend."""
    if _kernels.backend is _kernels.REFERENCE:
        return reference.repack_codec
    from .._kernels.qmatmul import repack_codec
    return repack_codec


def _float16_panels(blocks, offset, empty=np.empty):
    """The float16 at byte `offset` of every block [N, K/32, block bytes], as the packed
    layout's [P, K/32, PANEL] (zero in the padded rows)."""
    field = blocks[:, :, offset:offset + 2].view(np.float16)
    return _into_panels(field, empty)[:, :, 0, :]


def _into_panels(rows, empty=np.empty):
    """`rows` [N, B, W] as a new [P, B, W, PANEL] array (row 16p + r at ``[p, :, :, r]``),
    P = ceil(N / PANEL), the rows that pad the last panel zero."""
    n, n_blocks, width = rows.shape
    n_panels = -(-n // PANEL)
    out = empty((n_panels, n_blocks, width, PANEL), rows.dtype)
    by_row = out.transpose(0, 3, 1, 2)  # a view: [P, PANEL, B, W]
    full = n // PANEL
    by_row[:full] = rows[:full * PANEL].reshape(full, PANEL, n_blocks, width)
    if full < n_panels:
        tail = n - full * PANEL
        by_row[full, :tail] = rows[full * PANEL:]
        by_row[full, tail:] = 0
    return out


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
