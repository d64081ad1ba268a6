"""A bounded reader of GGUF files (versions 2 and 3, little-endian).

Every count, length and offset in the file is checked against the bytes the file holds before
anything is built from it, so a corrupt or hostile file costs time and memory in proportion to
its size and is answered with ``ModelFormatError`` naming the file and the field. Metadata
values come back as Python values (arrays as lists), tensors as read-only views of one mmap
of the file: float types typed and shaped, block-quantized types as uint8 rows."""
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFormatError
from .common import check_regular_file, map_file

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of a scalar; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9
MIN_KV_BYTES = 8 + 4 + 1         # empty key, type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
TENSOR_TYPES = {t.value: t for t in GGML_QUANT_SIZES}  # the types of known block size
# Tensor types that come back typed; the others are uint8 rows of blocks.
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass
class GGUFTensor:
    """One tensor: name, type name ("F32", "Q4_0" ...), dims in GGUF order (ne0, the
    contiguous one, first) and its data (a read-only view of the file)."""
    name: str
    kind: str
    dims: tuple
    data: np.ndarray


class _Cursor:
    """Reads little-endian values from `buf` (uint8 array), never past its end."""

    def __init__(self, buf, path):
        self.view, self.size, self.path, self.pos = memoryview(buf), buf.size, path, 0

    def fail(self, what, why):
        raise ModelFormatError(f"{self.path}: {what}: {why} (at byte {self.pos} of "
                               f"{self.size}); the file is truncated or corrupt")

    def take(self, n, what):
        """The next `n` bytes (a memoryview)."""
        if n > self.size - self.pos:
            self.fail(what, f"needs {n} bytes, {self.size - self.pos} are left")
        self.pos += n
        return self.view[self.pos - n:self.pos]

    def scalar(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what, min_item_bytes):
        """A uint64 count of items that each take at least `min_item_bytes` bytes."""
        n = self.scalar("Q", what)
        if n * min_item_bytes > self.size - self.pos:
            self.fail(what, f"{n} items cannot fit in the {self.size - self.pos} bytes left")
        return n

    def string(self, what):
        raw = self.take(self.count(what, 1), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            self.fail(what, f"not UTF-8 ({e.reason})")

    def value(self, vtype, what):
        """A metadata value of GGUF type `vtype`; arrays (of scalars or strings) as lists."""
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            self.fail(what, f"unknown value type {vtype}")
        itype = self.scalar("I", what)
        if itype == STRING:
            return [self.string(what) for _ in range(self.count(what, 8))]
        if itype not in SCALARS:
            self.fail(what, f"arrays of value type {itype} are not supported")
        fmt = "<" + SCALARS[itype]
        n = self.count(what, struct.calcsize(fmt))
        raw = self.take(n * struct.calcsize(fmt), what)
        dtype = np.dtype(np.bool_ if itype == 7 else fmt)
        return np.frombuffer(raw, dtype).tolist()


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "an array"}


def typed_value(meta: dict, key, kind, default=None, source="GGUF file"):
    """``meta[key]`` (else `default`) checked to be of type `kind` (int, float, str, bool or
    list; an int passes as a float, a bool never as a number); ModelFormatError naming
    `source` and `key` otherwise."""
    v = meta.get(key, default)
    if v is None:
        return None
    numeric = kind is float and isinstance(v, int)
    if (isinstance(v, bool) and kind is not bool) or not (isinstance(v, kind) or numeric):
        raise ModelFormatError(f"{source}: {key} must be {_KINDS[kind]}, got {_short(v)}")
    return v


def typed_list(meta: dict, key, kind, default=None, source="GGUF file"):
    """``meta[key]`` (else `default`) checked to be a list of `kind` values (as typed_value)."""
    v = typed_value(meta, key, list, default, source)
    numeric = (int, float) if kind is float else kind
    for i, item in enumerate(v or ()):
        if isinstance(item, bool) or not isinstance(item, numeric):
            raise ModelFormatError(f"{source}: {key}[{i}] must be {_KINDS[kind]}, "
                                   f"got {_short(item)}")
    return v


def _short(v, limit=80):
    """repr(v), cut to `limit` characters."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


class GGUFFile:
    """A parsed GGUF file: ``metadata`` {key: value}, ``tensors`` {name: GGUFTensor},
    ``buf`` the mapped file (uint8). Raises ModelFormatError naming the file and the field."""

    def __init__(self, path):
        check_regular_file(path)
        self.path, self.buf = path, map_file(path)
        cur = _Cursor(self.buf, path)
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (no GGUF magic)")
        version = cur.scalar("I", "version")
        if version & 0xFFFF == 0:
            raise ModelFormatError(f"{path}: big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported "
                                   f"(xllm reads {VERSIONS})")
        n_tensors = cur.scalar("Q", "tensor_count")
        self.metadata = {}
        for _ in range(cur.count("kv_count", MIN_KV_BYTES)):
            key = cur.string("a metadata key")
            if key in self.metadata:
                cur.fail(key, "the key appears twice")
            self.metadata[key] = cur.value(cur.scalar("I", key), key)
        if n_tensors * MIN_TENSOR_INFO_BYTES > self.buf.size - cur.pos:
            cur.fail("tensor_count", f"{n_tensors} tensor infos cannot fit in the file")
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 \
                or align & (align - 1):
            raise ModelFormatError(f"{path}: general.alignment must be a power of two, "
                                   f"got {align!r}")
        start = -(-cur.pos // align) * align
        self.tensors = {}
        end = start  # tensors are checked in file order: none may overlap the one before
        for name, kind, dims, offset, nbytes in sorted(infos, key=lambda t: t[3]):
            where = f"{path}: tensor {name!r}"
            if name in self.tensors:
                raise ModelFormatError(f"{where}: the name appears twice")
            need = max(align, np.dtype(FLOAT_TYPES.get(kind, np.uint8)).itemsize)
            if (start + offset) % need:
                raise ModelFormatError(f"{where}: offset {offset} (byte {start + offset}) is "
                                       f"not aligned to {need} bytes")
            if start + offset < end:
                raise ModelFormatError(f"{where}: its data (offset {offset}) overlaps the "
                                       f"tensor before it")
            end = start + offset + nbytes
            if end > self.buf.size:
                raise ModelFormatError(f"{where}: needs bytes {start + offset}..{end} but the "
                                       f"file has {self.buf.size} (truncated?)")
            raw = self.buf[start + offset:end]
            shape = tuple(reversed(dims))
            if kind in FLOAT_TYPES:
                data = raw.view(FLOAT_TYPES[kind]).reshape(shape)
            else:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
                data = raw.reshape(shape[:-1] + (shape[-1] // block * size,))
            self.tensors[name] = GGUFTensor(name, kind, dims, data)

    def drop_pages(self):
        """Let the kernel drop the file's pages from memory (they are read again if used)."""
        self.buf.base.obj.madvise(mmap.MADV_DONTNEED)  # base: a memoryview of the mmap

    def _tensor_info(self, cur):
        """(name, type name, dims, offset, bytes) of the next tensor info, checked."""
        name = cur.string("a tensor name")
        where = f"tensor {name!r}"
        n_dims = cur.scalar("I", where)
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(where, f"n_dims must be 1..{MAX_DIMS}, got {n_dims}")
        dims = tuple(cur.scalar("Q", where) for _ in range(n_dims))
        code, offset = cur.scalar("I", where), cur.scalar("Q", where)
        if code not in TENSOR_TYPES:
            cur.fail(where, f"unknown tensor type {code}")
        kind = TENSOR_TYPES[code].name
        block, size = GGML_QUANT_SIZES[TENSOR_TYPES[code]]
        if min(dims) < 1 or dims[0] % block:
            cur.fail(where, f"dims {list(dims)} must be positive, the first a multiple of "
                            f"the {kind} block ({block})")
        nbytes = int(np.prod(dims, dtype=object)) // block * size  # Python ints: no overflow
        if nbytes > self.buf.size:
            cur.fail(where, f"dims {list(dims)} of {kind} take {nbytes} bytes, more than the "
                            f"file holds")
        return name, kind, dims, offset, nbytes


def open_gguf(path):
    """The parsed GGUF file (``GGUFFile``: ``metadata``, ``tensors``);
    ``ModelFormatError`` naming it if it cannot be parsed."""
    return GGUFFile(os.fspath(path))


def read_gguf_metadata(source) -> dict:
    """The key/value metadata of a GGUF file (a path, or an opened ``GGUFFile``) as Python
    values (arrays as lists). Raises ``ModelFormatError`` naming the file."""
    gguf_file = open_gguf(source) if isinstance(source, (str, os.PathLike)) else source
    return gguf_file.metadata
