"""The weight formats xllm knows: one row per format, in the style of llama.cpp's ``type_traits``.

Every module that needs to know something about a format reads it here: the GGUF loader
(which types run natively, which are expanded at load), the xllm quantized format's reader and
writer, ``tools/quantize.py`` (what it can write, and under which ``--type`` name),
``xllm.memory`` (bytes per weight) and the kernel dispatch (``formats/dispatch.py``: which
kernel multiplies a weight). Adding a format means adding its row here, its kernel and its
NumPy reference; nothing else should need to change.

Columns:

``name``
    The GGUF type name (``F32``, ``Q4_0`` ...) or, for a format GGUF does not have, xllm's own.
``block``, ``block_bytes``
    Values per block and the bytes one block takes as stored (float16 scales).
``packing``
    ``FLOAT``: a typed array (``dtype``: float32, float16, or uint16 holding bfloat16 bits);
    ``PANELS``: a ``QTensor`` (``bits``, ``asymmetric``; ``codec``: the kernels' codec, see
    ``xllm/_kernels/layout.py``, for the formats beyond int8 / int4), repacked at load at the same
    size into panels of 16 rows; ``EXPANDED``: expanded to float32 at load (no kernel of its own).
``kernel``
    ``MATMUL`` (float weights) or ``QMATMUL`` (packed weights).
``dequantize``
    The reference dequantizer, to float32: of a typed array (``FLOAT``), of rows of raw GGUF
    blocks (GGUF block types, the ``gguf`` package's own), or of a ``QTensor`` (``INT8``).
``from_float``
    The reference quantizer of a GGUF writer: float32 [N, K] -> the tensor as stored (a typed
    array, or uint8 rows of blocks); None where xllm writes no GGUF of the format.
``gguf_type``, ``file_type``
    The ``gguf.GGMLQuantizationType`` of a tensor, and the ``general.file_type``
    (``gguf.LlamaFileType``) of a GGUF file whose matrices are all (or, for a llama.cpp mix
    such as Q4_K_M, mostly) of this format.
``quantize_type``
    The ``--type`` name under which ``tools/quantize.py`` writes the format (None: it cannot):
    llama.cpp's name of the file type, whose mix of formats ``formats/mixes.py`` states.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf.constants import GGMLQuantizationType, LlamaFileType

from .._kernels.layout import BLOCK, CODECS, PANEL, to_float32
from .kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

FLOAT = "float"
PANELS = "panels"
EXPANDED = "expanded"

MATMUL = "matmul"
QMATMUL = "qmatmul"


@dataclass(frozen=True)
class WeightFormat:
    """One row of the registry (see the module docstring for the columns)."""
    name: str
    block: int
    block_bytes: int
    packing: str
    kernel: str
    dequantize: Callable
    gguf_type: Optional[GGMLQuantizationType] = None
    file_type: Optional[LlamaFileType] = None
    quantize_type: Optional[str] = None
    from_float: Optional[Callable] = None
    dtype: Optional[np.dtype] = None  # FLOAT: the NumPy dtype of the array
    bits: Optional[int] = None  # PANELS: bits per code
    asymmetric: bool = False  # PANELS: a minimum per group besides the scale
    codec: Optional[str] = None  # PANELS: the kernels' codec (layout.CODECS), None for int8/int4

    @property
    def bytes_per_weight(self) -> float:
        return self.block_bytes / self.block


def _gguf_blocks(gguf_type):
    """The ``gguf`` package's dequantizer of `gguf_type`: rows of raw blocks -> float32."""
    def dequantize(raw_rows):
        from gguf.quants import dequantize as gguf_dequantize
        return gguf_dequantize(raw_rows, gguf_type)
    return dequantize


def _gguf_quantizer(gguf_type):
    """The ``gguf`` package's quantizer to `gguf_type`: float32 rows -> rows of raw blocks."""
    def from_float(weights):
        from gguf.quants import quantize as gguf_quantize
        return gguf_quantize(weights, gguf_type)
    return from_float


def _qtensor(packed):
    """The dequantizer of a format that exists only packed: the QTensor's own."""
    return packed.dequantize()


def _float_format(name, dtype, file_type, quantize_type):
    dtype = np.dtype(dtype)

    def from_float(weights):
        return weights.astype(dtype, copy=False)
    return WeightFormat(name, block=1, block_bytes=dtype.itemsize, packing=FLOAT, kernel=MATMUL,
                        dequantize=to_float32, gguf_type=GGMLQuantizationType[name],
                        file_type=file_type, quantize_type=quantize_type,
                        from_float=from_float if quantize_type else None, dtype=dtype)


def _packed_format(name, block_bytes, bits, asymmetric, file_type, quantize_type):
    gguf_type = GGMLQuantizationType[name]
    return WeightFormat(name, block=BLOCK, block_bytes=block_bytes, packing=PANELS,
                        kernel=QMATMUL, dequantize=_gguf_blocks(gguf_type), gguf_type=gguf_type,
                        file_type=file_type, quantize_type=quantize_type,
                        from_float=_gguf_quantizer(gguf_type), bits=bits, asymmetric=asymmetric)


def _codec_format(name, block, block_bytes, file_type=None, quantize_type=None,
                  from_float=None):
    """A GGUF block type that runs on its codec of the kernels (gemm_k.h)."""
    gguf_type = GGMLQuantizationType[name]
    codec = CODECS[name]
    if quantize_type is not None and from_float is None:
        from_float = _gguf_quantizer(gguf_type)
    return WeightFormat(name, block=block, block_bytes=block_bytes, packing=PANELS,
                        kernel=QMATMUL, dequantize=_gguf_blocks(gguf_type), gguf_type=gguf_type,
                        file_type=file_type, quantize_type=quantize_type, from_float=from_float,
                        bits=codec.bits, asymmetric=codec.asymmetric, codec=name)


def _expanded_format(name, block, block_bytes, file_type=None, quantize_type=None,
                     from_float=None):
    gguf_type = GGMLQuantizationType[name]
    if quantize_type is not None and from_float is None:
        from_float = _gguf_quantizer(gguf_type)
    return WeightFormat(name, block=block, block_bytes=block_bytes, packing=EXPANDED,
                        kernel=MATMUL, dequantize=_gguf_blocks(gguf_type), gguf_type=gguf_type,
                        file_type=file_type, quantize_type=quantize_type, from_float=from_float)


# xllm's own int8 takes groups of 64, 128, ... values (32 is Q8_0): a block is one group,
# stored as its int8 codes and one float16 scale. It exists only in the xllm format.
INT8_BLOCK = 64

FORMATS = {f.name: f for f in (
    _float_format("F32", np.float32, LlamaFileType.ALL_F32, "f32"),
    _float_format("F16", np.float16, LlamaFileType.MOSTLY_F16, "f16"),
    _float_format("BF16", np.uint16, LlamaFileType.MOSTLY_BF16, None),
    _packed_format("Q8_0", 34, 8, False, LlamaFileType.MOSTLY_Q8_0, "q8_0"),
    _packed_format("Q4_0", 18, 4, False, LlamaFileType.MOSTLY_Q4_0, "q4_0"),
    _packed_format("Q4_1", 20, 4, True, LlamaFileType.MOSTLY_Q4_1, "q4_1"),
    WeightFormat("INT8", block=INT8_BLOCK, block_bytes=INT8_BLOCK + 2, packing=PANELS,
                 kernel=QMATMUL, dequantize=_qtensor, bits=8),
    _codec_format("Q5_0", 32, 22, LlamaFileType.MOSTLY_Q5_0, "q5_0"),
    _codec_format("Q5_1", 32, 24, LlamaFileType.MOSTLY_Q5_1, "q5_1"),
    _codec_format("Q4_K", 256, 144, LlamaFileType.MOSTLY_Q4_K_M, "q4_k_m", quantize_q4_k),
    _codec_format("Q5_K", 256, 176, LlamaFileType.MOSTLY_Q5_K_M, "q5_k_m", quantize_q5_k),
    _codec_format("Q6_K", 256, 210, LlamaFileType.MOSTLY_Q6_K, "q6_k", quantize_q6_k),
)}

# The format an EXPANDED one becomes at load.
EXPANDED_TO = FORMATS["F32"]


def gguf_formats():
    """{GGUF type name: format} of every format a GGUF file may hold."""
    return {name: f for name, f in FORMATS.items() if f.gguf_type is not None}


def float_dtypes():
    """{format name: NumPy dtype} of the FLOAT formats."""
    return {name: f.dtype for name, f in FORMATS.items() if f.packing == FLOAT}


def float_format(dtype):
    """The FLOAT format of arrays of `dtype` (uint16: bfloat16 bits); KeyError if none."""
    dtype = np.dtype(dtype)
    return next(f for f in FORMATS.values() if f.packing == FLOAT and f.dtype == dtype)


def packed_format(bits, group, asymmetric):
    """The PANELS format of a QTensor with these parameters (int8 groups of 64 or more: INT8)."""
    if bits == 8 and group > BLOCK:
        return FORMATS["INT8"]
    return next(f for f in FORMATS.values() if f.packing == PANELS and f.bits == bits
                and f.asymmetric == asymmetric and f.block == group and f.codec is None)


def writable_formats():
    """{--type name: format} of the formats tools/quantize.py writes (as GGUF tensors; the
    FLOAT and PANELS ones also in the xllm format)."""
    return {f.quantize_type: f for f in FORMATS.values() if f.quantize_type is not None}


def panel_block_bytes(bits):
    """Bytes of one block of codes in the packed layout: BLOCK values of PANEL rows."""
    return PANEL * BLOCK * bits // 8


def kernel_of_packing(packing):
    """The kernel kind every format of `packing` runs on."""
    kernels = {f.kernel for f in FORMATS.values() if f.packing == packing}
    if len(kernels) != 1:
        raise ValueError(f"the {packing} formats name {len(kernels)} kernels: {kernels}")
    return kernels.pop()
