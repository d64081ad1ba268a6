"""Zero-copy reader for .safetensors files (header length, JSON header, raw little-endian data).

We parse it ourselves because the ``safetensors`` package's NumPy API copies every tensor and has
no bfloat16; here each tensor is a read-only view into one mmap of the file, and bf16 comes back
as uint16 bits."""
import json
import mmap
import os

import numpy as np

from ..errors import ModelFormatError

# safetensors dtype name -> NumPy dtype (uint16 holds bfloat16 bits, the xllm convention).
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20  # the reference implementation refuses headers over 100 MB too


def map_file(path):
    """A read-only uint8 array over the whole file, backed by one mmap (kept alive by the array)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ModelFormatError(f"{path}: file is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)


def read_safetensors(path):
    """Map a .safetensors file: {name: (safetensors dtype, shape, raw uint8 view)}; see
    :func:`as_array`. A truncated or corrupt file raises ModelFormatError naming file and tensor."""
    buf = map_file(path)
    if (size := buf.size) < 8:
        raise ModelFormatError(f"{path}: {size} bytes is too short for a safetensors file")
    n = int(buf[:8].view("<u8")[0])
    if n > min(size - 8, _MAX_HEADER):
        raise ModelFormatError(f"{path}: safetensors header claims {n} bytes but the file has "
                               f"{size} bytes (truncated or not a safetensors file?)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:
        raise ModelFormatError(f"{path}: corrupt safetensors header: {e}") from None
    base, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: corrupt safetensors entry for tensor {key!r}: "
                                   f"{info!r}") from None
        if not 0 <= begin <= end or base + end > size:
            raise ModelFormatError(f"{path}: tensor {key!r} needs bytes {base + begin}.."
                                   f"{base + end} but the file has {size} bytes (truncated?)")
        want = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE.get(dtype, 0)
        if dtype in _ITEMSIZE and want != end - begin:
            raise ModelFormatError(f"{path}: tensor {key!r} ({dtype} {shape}) should take {want} "
                                   f"bytes but its data_offsets span {end - begin}")
        out[key] = (dtype, tuple(shape), buf[base + begin:base + end])
    return out


def as_array(entry, key, path):
    """Typed, shaped read-only view of one entry from :func:`read_safetensors`."""
    dtype, shape, raw = entry
    if dtype not in DTYPES:
        raise ModelFormatError(f"{path}: tensor {key!r} has dtype {dtype}; xllm supports "
                               f"{', '.join(DTYPES)}")
    return raw.view(DTYPES[dtype]).reshape(shape)
