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
from ..formats.registry import float_dtypes
from .common import check_regular_file, map_file

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of a scalar; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
BOOL = 7
STRING = 8
ARRAY = 9
MIN_KV_BYTES = 8 + 4 + 1         # empty key, type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
TENSOR_TYPES = {t.value: t for t in GGML_QUANT_SIZES}  # the types of known block size
# Tensor types that come back typed (the registry's FLOAT formats); the others are uint8 rows
# of blocks.
FLOAT_TYPES = float_dtypes()


@dataclass
class GGUFTensor:
    """One tensor: name, type name ("F32", "Q4_0" ...), dims in GGUF order (ne0, the
    contiguous one, first) and its data (a read-only view of the file)."""
    name: str
    kind: str
    dims: tuple
    data: np.ndarray


_U64 = struct.Struct("<Q")


class _Cursor:
    """Reads little-endian values from `buf` (uint8 array over an mmap), never past its end."""

    def __init__(self, buf, path):
        self.view = memoryview(buf)
        # the object under the array (an mmap, or bytes): slicing it gives bytes, which decode
        # faster than memoryview slices (string arrays of a whole vocabulary are read here)
        self.raw = buf.base.obj if isinstance(buf.base, memoryview) else bytes(buf)
        self.size = buf.size
        self.path = path
        self.pos = 0

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

    def strings(self, n, what):
        """The next `n` strings (each a uint64 length and UTF-8 bytes), as a list: what
        ``string`` reads, in one loop (a vocabulary is tens of thousands of strings)."""
        raw = self.raw
        size = self.size
        pos = self.pos
        out = []
        append = out.append
        length_at = _U64.unpack_from
        try:
            for _ in range(n):
                if size - pos < 8:
                    break
                start = pos + 8
                pos = start + length_at(raw, pos)[0]
                if pos > size:
                    break
                append(raw[start:pos].decode("utf-8"))
        except UnicodeDecodeError:
            pass
        if len(out) < n:  # read string `len(out)` again, for the error
            self.pos = _string_start(raw, self.pos, len(out))
            self.string(f"{what}[{len(out)}]")  # raises: the loop stopped at its fault
        self.pos = pos
        return out

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
            return self.strings(self.count(what, 8), what)
        if itype not in SCALARS:
            self.fail(what, f"arrays of value type {itype} are not supported")
        fmt = "<" + SCALARS[itype]
        n = self.count(what, struct.calcsize(fmt))
        raw = self.take(n * struct.calcsize(fmt), what)
        dtype = np.dtype(np.bool_ if itype == BOOL else fmt)
        return np.frombuffer(raw, dtype).tolist()


def _string_start(raw, pos, index):
    """The position of string `index` of the (valid up to it) strings that begin at `pos`."""
    for _ in range(index):
        pos += 8 + _U64.unpack_from(raw, pos)[0]
    return pos


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
    if v and set(map(type, v)) <= set(numeric if kind is float else (kind,)):
        return v  # every item exactly of an accepted type (one pass in C, for a vocabulary)
    for i, item in enumerate(v or ()):
        if isinstance(item, bool) or not isinstance(item, numeric):
            raise ModelFormatError(f"{source}: {key}[{i}] must be {_KINDS[kind]}, "
                                   f"got {_short(item)}")
    return v


def _short(v, limit=80):
    """repr(v), cut to `limit` characters."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class _TensorInfo:
    """A tensor's entry in the header: where its data is and what it holds."""
    name: str
    kind: str
    dims: tuple
    offset: int  # from the start of the data section
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: ``metadata`` {key: value}, ``tensors`` {name: GGUFTensor},
    ``buf`` the mapped file (uint8). Raises ModelFormatError naming the file and the field."""

    def __init__(self, path):
        check_regular_file(path)
        self.path = path
        self.buf = map_file(path)
        cursor = _Cursor(self.buf, path)
        self._read_preamble(cursor)
        n_tensors = cursor.scalar("Q", "tensor_count")
        self.metadata = self._read_metadata(cursor)
        if n_tensors * MIN_TENSOR_INFO_BYTES > self.buf.size - cursor.pos:
            cursor.fail("tensor_count", f"{n_tensors} tensor infos cannot fit in the file")
        infos = [self._tensor_info(cursor) for _ in range(n_tensors)]
        alignment = self._alignment()
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = self._map_tensors(infos, data_start, alignment)

    def drop_pages(self, data=None):
        """Let the kernel drop the file's pages from memory (they are read again if used): all
        of them, or those under `data` (a tensor's view of the file)."""
        mapped = self.buf.base.obj  # base: a memoryview of the mmap
        if data is None:
            mapped.madvise(mmap.MADV_DONTNEED)
            return
        begin = data.__array_interface__["data"][0] - self.buf.__array_interface__["data"][0]
        first_page = begin - begin % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first_page, begin + data.nbytes - first_page)

    def _read_preamble(self, cursor):
        """The magic and a version this reader knows."""
        if bytes(cursor.take(4, "magic")) != MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file (no GGUF magic)")
        version = cursor.scalar("I", "version")
        if version & 0xFFFF == 0:
            raise ModelFormatError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise ModelFormatError(f"{self.path}: GGUF version {version} is not supported "
                                   f"(xllm reads {VERSIONS})")

    @staticmethod
    def _read_metadata(cursor):
        """{key: value} of the key/value section; a key may appear once."""
        metadata = {}
        for _ in range(cursor.count("kv_count", MIN_KV_BYTES)):
            key = cursor.string("a metadata key")
            if key in metadata:
                cursor.fail(key, "the key appears twice")
            metadata[key] = cursor.value(cursor.scalar("I", key), key)
        return metadata

    def _alignment(self):
        """general.alignment, checked to be a power of two."""
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        is_int = isinstance(alignment, int) and not isinstance(alignment, bool)
        if not is_int or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path}: general.alignment must be a power of two, "
                                   f"got {alignment!r}")
        return alignment

    def _map_tensors(self, infos, data_start, alignment):
        """{name: GGUFTensor}, each a view of the file. Tensors are checked in file order: each
        must be aligned, lie inside the file and not overlap the one before it."""
        tensors = {}
        end = data_start
        for info in sorted(infos, key=lambda info: info.offset):
            where = f"{self.path}: tensor {info.name!r}"
            if info.name in tensors:
                raise ModelFormatError(f"{where}: the name appears twice")
            begin = data_start + info.offset
            item_size = np.dtype(FLOAT_TYPES.get(info.kind, np.uint8)).itemsize
            need = max(alignment, item_size)
            if begin % need:
                raise ModelFormatError(f"{where}: offset {info.offset} (byte {begin}) is "
                                       f"not aligned to {need} bytes")
            if begin < end:
                raise ModelFormatError(f"{where}: its data (offset {info.offset}) overlaps the "
                                       f"tensor before it")
            end = begin + info.nbytes
            if end > self.buf.size:
                raise ModelFormatError(f"{where}: needs bytes {begin}..{end} but the "
                                       f"file has {self.buf.size} (truncated?)")
            data = _typed(self.buf[begin:end], info.kind, tuple(reversed(info.dims)))
            tensors[info.name] = GGUFTensor(info.name, info.kind, info.dims, data)
        return tensors

    def _tensor_info(self, cursor):
        """The next tensor info, checked."""
        name = cursor.string("a tensor name")
        where = f"tensor {name!r}"
        n_dims = cursor.scalar("I", where)
        if not 1 <= n_dims <= MAX_DIMS:
            cursor.fail(where, f"n_dims must be 1..{MAX_DIMS}, got {n_dims}")
        dims = tuple(cursor.scalar("Q", where) for _ in range(n_dims))
        code = cursor.scalar("I", where)
        offset = cursor.scalar("Q", where)
        if code not in TENSOR_TYPES:
            cursor.fail(where, f"unknown tensor type {code}")
        kind = TENSOR_TYPES[code].name
        block, block_bytes = GGML_QUANT_SIZES[TENSOR_TYPES[code]]
        if min(dims) < 1 or dims[0] % block:
            cursor.fail(where, f"dims {list(dims)} must be positive, the first a multiple of "
                               f"the {kind} block ({block})")
        nbytes = int(np.prod(dims, dtype=object)) // block * block_bytes  # Python ints: no overflow
        if nbytes > self.buf.size:
            cursor.fail(where, f"dims {list(dims)} of {kind} take {nbytes} bytes, more than the "
                               f"file holds")
        return _TensorInfo(name, kind, dims, offset, nbytes)


def _typed(raw, kind, shape):
    """The bytes `raw` of a tensor of type `kind` and `shape` (row-major): typed for the float
    types, else uint8 rows of blocks."""
    if kind in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[kind]).reshape(shape)
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return raw.reshape(shape[:-1] + (shape[-1] // block * block_bytes,))


def open_gguf(path):
    """The parsed GGUF file (``GGUFFile``: ``metadata``, ``tensors``);
    ``ModelFormatError`` naming it if it cannot be parsed."""
    return GGUFFile(os.fspath(path))


def read_gguf_metadata(source) -> dict:
    """The key/value metadata of a GGUF file (a path, or an opened ``GGUFFile``) as Python
    values (arrays as lists). Raises ``ModelFormatError`` naming the file."""
    gguf_file = open_gguf(source) if isinstance(source, (str, os.PathLike)) else source
    return gguf_file.metadata


@dataclass
class TensorToWrite:
    """One tensor of a GGUF file to write: its name, shape [rows, ..., columns], registry format
    (one with ``from_float``), and a function returning its values as float32 (called once, when
    its data is written)."""
    name: str
    shape: tuple
    weight_format: object
    values: object


def write_gguf(path, arch, fields, tensors, progress=None):
    """Write a GGUF file (with the ``gguf`` package's writer): general.architecture `arch`, the
    metadata `fields` [(key, value, GGUFValueType, item type or None)] in order, then the
    `tensors` (TensorToWrite): every tensor info first, then each tensor's data in turn,
    quantized by its format's ``from_float``, so that one tensor at a time is in memory.
    `progress` wraps the iteration over the tensors (a progress bar)."""
    import gguf
    writer = gguf.GGUFWriter(path, arch)
    for field in fields:
        writer.add_key_value(*field)
    for tensor in tensors:
        weight_format = tensor.weight_format
        shape = _stored_shape(tensor.shape, weight_format)
        dtype = weight_format.dtype if weight_format.dtype is not None else np.dtype(np.uint8)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, weight_format.gguf_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in (progress or list)(tensors):
            writer.write_tensor_data(tensor.weight_format.from_float(tensor.values()))
    finally:
        writer.close()


def _stored_shape(shape, weight_format):
    """The shape of a tensor as stored: its own for a float format, else uint8 rows of blocks."""
    if weight_format.dtype is not None:
        return tuple(shape)
    row_bytes = shape[-1] // weight_format.block * weight_format.block_bytes
    return tuple(shape[:-1]) + (row_bytes,)
