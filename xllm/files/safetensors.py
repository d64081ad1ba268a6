"""Reader and writer of .safetensors files (header length, JSON header, raw little-endian data).

We parse them ourselves because the ``safetensors`` package's NumPy API copies every tensor and
has no bfloat16; here each tensor is a read-only view into one mmap of the file, and bf16 comes
back (and is written from) uint16 bits."""
import json
import math
import os
import struct

import numpy as np

from ..errors import ModelFormatError
from ..formats.registry import float_dtypes
from .common import map_file

# safetensors dtype name -> NumPy dtype of the float tensors xllm computes with (the registry's
# FLOAT formats; uint16 holds bfloat16 bits, the xllm convention).
DTYPES = float_dtypes()
# NumPy dtype -> safetensors dtype name, for writing: the float formats and packed bytes.
TAGS = {**{np.dtype(dtype): tag for tag, dtype in DTYPES.items()}, np.dtype(np.uint8): "U8"}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20  # the reference implementation refuses headers over 100 MB too


def read_safetensors(path):
    """Map a .safetensors file: {name: (safetensors dtype, shape, raw uint8 view)}; see
    :func:`as_array`. A truncated or corrupt file raises ModelFormatError naming file and tensor:
    every entry needs a known dtype, a shape of non-negative integers and data_offsets inside
    the file, matching the shape and overlapping no other tensor's."""
    buf = map_file(path)
    header = _read_header(buf, path)
    data_start = 8 + int(buf[:8].view("<u8")[0])
    size = buf.size
    out = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, key, info)
        if data_start + end > size:
            raise ModelFormatError(f"{path}: tensor {key!r} needs bytes {data_start + begin}.."
                                   f"{data_start + end} but the file has {size} bytes "
                                   f"(truncated?)")
        want = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow
        if want != end - begin:
            raise ModelFormatError(f"{path}: tensor {key!r} ({dtype} {shape}) should take {want} "
                                   f"bytes but its data_offsets span {end - begin}")
        out[key] = (dtype, tuple(shape), buf[data_start + begin:data_start + end])
        spans.append((begin, end, key))
    _check_no_overlap(spans, path)
    return out


def _read_header(buf, path):
    """The JSON header (a dict) of the mapped file `buf`, its length checked against the file."""
    size = buf.size
    if size < 8:
        raise ModelFormatError(f"{path}: {size} bytes is too short for a safetensors file")
    n = int(buf[:8].view("<u8")[0])
    if n > min(size - 8, _MAX_HEADER):
        raise ModelFormatError(f"{path}: safetensors header claims {n} bytes but the file has "
                               f"{size} bytes (truncated or not a safetensors file?)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: corrupt safetensors header: {e}") from None
    return header


def _check_no_overlap(spans, path):
    """ModelFormatError if two of the (begin, end, name) data spans overlap."""
    spans = sorted(spans)
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelFormatError(f"{path}: tensors {key!r} and {other!r} overlap (data_offsets "
                                   f"{begin} < {end})")


def _entry(path, key, info):
    """(dtype, shape, begin, end) of one header entry, each of the right type and range."""
    def bad(why):
        text = repr(info)
        text = text if len(text) <= 200 else text[:200] + "..."
        return ModelFormatError(f"{path}: corrupt safetensors entry for tensor {key!r}: {why} "
                                f"(got {text})")

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise bad(f"dtype must be one of {', '.join(_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise bad("data_offsets must be [begin, end] with 0 <= begin <= end")
    return dtype, shape, offsets[0], offsets[1]


def _is_count(v) -> bool:
    """A non-negative integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def as_array(entry, key, path):
    """Typed, shaped read-only view of one entry from :func:`read_safetensors`. Data that is not
    aligned to its element size (a header whose length is not a multiple of 8, written by some
    tools) is copied once into an aligned array, which the kernels need."""
    dtype, shape, raw = entry
    if dtype not in DTYPES:
        raise ModelFormatError(f"{path}: tensor {key!r} has dtype {dtype}; xllm supports "
                               f"{', '.join(DTYPES)}")
    if raw.ctypes.data % np.dtype(DTYPES[dtype]).itemsize:
        raw = raw.copy()  # a fresh array is aligned
        raw.flags.writeable = False
    return raw.view(DTYPES[dtype]).reshape(shape)


def write_safetensors(path, tensors, alignment=8, metadata=None):
    """Write `tensors` ({name: array} or [(name, array)], float32, float16, uint16 = bfloat16
    bits or uint8) to `path` in that order, with the optional ``__metadata__`` dict first in the
    header. The header is padded with spaces so that the data starts at a multiple of
    `alignment` bytes. The file is written under a temporary name and renamed into place."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, array in items:
        header[name] = {"dtype": TAGS[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % alignment)
    partial = os.fspath(path) + ".part"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, array in items:
            f.write(np.ascontiguousarray(array).data)
    os.replace(partial, path)


def aligned_order(tensors, alignment):
    """[(name, array)] ordered so that in a file whose data starts `alignment`-aligned, every
    tensor is aligned to its item size and those whose size is a multiple of `alignment` to
    `alignment`: those come first, then the others by decreasing item size (no holes needed)."""
    return sorted(tensors, key=lambda t: (t[1].nbytes % alignment != 0, -t[1].itemsize))
