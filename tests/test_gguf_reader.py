"""xllm's own GGUF reader (``xllm.files.gguf.open_gguf``) against the reference, the ``gguf``
package's ``GGUFReader``, on every GGUF file the tests have: the default model, the llama.cpp
vocabularies of the shared test data, the files the loader, hostile-input and tokenizer tests
write (rebuilt here with the same writers), the files xllm's own writer makes, and a file with
every metadata value type and tensor type the ``gguf`` writer knows.

The two must agree exactly: the same keys in the same order; the same values (floats compared
bit for bit, so NaN and -0.0 count; integers of any width as Python ints, booleans as bools,
arrays as lists of their items); the same tensor names, shapes (GGUF order, ne0 first), types,
data offsets and sizes, and the same bytes under each tensor."""
import math
import struct

import numpy as np
import pytest

from conftest import write_tiny_gguf
from xllm.files.gguf import TensorToWrite, open_gguf, write_gguf
from xllm.formats.registry import FORMATS

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf.quants import quantize  # noqa: E402

INTEGER_TYPES = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
FLOAT_TYPES = {V.FLOAT32: "<f", V.FLOAT64: "<d"}


def assert_same_as_gguf_reader(path):
    """Every key, value, tensor and tensor byte of `path` as open_gguf reads it equals what
    GGUFReader reads."""
    assert_same(open_gguf(path), gguf.GGUFReader(str(path)), path)


def assert_same(mine, ref, path):
    """open_gguf's reading `mine` equals GGUFReader's `ref` (of the file `path`)."""
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # (header)
    assert list(mine.metadata) == list(fields)
    for key, field in fields.items():
        _assert_same_value(mine.metadata[key], field, key)
    assert sorted(mine.tensors) == sorted(t.name for t in ref.tensors)
    assert len(mine.tensors) == len(ref.tensors)  # (no name twice)
    start = mine.buf.__array_interface__["data"][0]
    for t in ref.tensors:
        got = mine.tensors[t.name]
        where = f"{path}: {t.name}"
        assert got.kind == t.tensor_type.name, where
        assert got.dims == tuple(int(d) for d in t.shape), where
        assert got.data.__array_interface__["data"][0] - start == t.data_offset, where
        assert got.data.nbytes == t.n_bytes, where
        np.testing.assert_array_equal(_bytes(got.data), _bytes(t.data), err_msg=where)


def _assert_same_value(value, field, key):
    main = field.types[0]
    if main == V.ARRAY:
        assert isinstance(value, list), key
        want = field.contents()
        assert len(value) == len(want), key
        for i, (a, b) in enumerate(zip(value, want)):
            _assert_same_item(a, b, field.types[-1], f"{key}[{i}]")
    else:
        _assert_same_item(value, field.contents(), main, key)


def _assert_same_item(a, b, vtype, where):
    """`a` (open_gguf's) is `b` (GGUFReader's) of GGUF type `vtype`, as a Python value."""
    if vtype in FLOAT_TYPES:
        assert type(a) is float, where
        fmt = FLOAT_TYPES[vtype]
        assert struct.pack(fmt, a) == struct.pack(fmt, b), f"{where}: {a!r} != {b!r}"
        return
    kind = {V.BOOL: bool, V.STRING: str}.get(vtype, int)
    assert vtype in INTEGER_TYPES or kind is not int, where
    assert type(a) is kind, f"{where}: {type(a).__name__}, not {kind.__name__}"
    assert a == b, f"{where}: {a!r} != {b!r}"


def _bytes(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------- the files


@pytest.mark.slow
def test_default_model(smollm2_gguf):
    assert_same_as_gguf_reader(smollm2_gguf)


def test_llama_cpp_vocabularies(data_dir):
    paths = sorted((data_dir / "llamacpp_vocab").glob("*.gguf"))
    assert paths
    for path in paths:
        assert_same_as_gguf_reader(path)


def test_hostile_input_tests_tiny_model(tmp_path):
    """conftest's write_tiny_gguf, which the hostile-input tests and the fuzzer corrupt."""
    assert_same_as_gguf_reader(write_tiny_gguf(tmp_path / "tiny.gguf"))
    keys = {"llama.rope.freq_base": 1e39, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.bos_token_id": 2**40, "llama.block_count": -3}
    assert_same_as_gguf_reader(write_tiny_gguf(tmp_path / "keys.gguf", keys=keys))


@pytest.mark.slow
def test_loader_tests_files(tmp_path):
    """The small models of test_loader_gguf.py, in every type it writes."""
    pytest.importorskip("torch")
    from test_loader_gguf import hf_llama, k_quant_bytes, write_gguf as write_model_gguf
    model = hf_llama()
    for qtype in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0):
        assert_same_as_gguf_reader(write_model_gguf(tmp_path / f"{qtype.name}.gguf", model,
                                                    qtype))
    raw = {"token_embd.weight": (k_quant_bytes(512, 256, QT.Q6_K), QT.Q6_K),
           "blk.0.ffn_down.weight": (k_quant_bytes(256, 512, QT.Q4_K), QT.Q4_K)}
    assert_same_as_gguf_reader(write_model_gguf(tmp_path / "mixed.gguf", model, raw=raw,
                                                orig_ctx=32))


def test_xllm_writer_files(tmp_path):
    """What xllm.files.gguf.write_gguf (tools/quantize.py's writer) makes, in every format it
    can write."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)  # (K-quant rows: 256)
    tensors = []
    for name, f in FORMATS.items():
        if f.gguf_type is not None and f.from_float is not None:
            tensors.append(TensorToWrite(f"w.{name}", w.shape, f, lambda: w))
    assert len(tensors) >= 4
    fields = [("general.name", "x", V.STRING, None),
              ("tokenizer.ggml.tokens", ["a", "b", ""], V.ARRAY, V.STRING)]
    path = tmp_path / "xllm.gguf"
    write_gguf(str(path), "llama", fields, tensors)
    assert_same_as_gguf_reader(path)


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_and_tensor_type(tmp_path, alignment):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    scalars = [(V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768),
               (V.UINT32, 2**32 - 1), (V.INT32, -2**31), (V.UINT64, 2**64 - 1),
               (V.INT64, -2**63), (V.FLOAT32, 0.1), (V.FLOAT32, -0.0), (V.FLOAT32, math.nan),
               (V.FLOAT32, math.inf), (V.FLOAT64, 1e300), (V.FLOAT64, 2**-1074),
               (V.BOOL, True), (V.BOOL, False), (V.STRING, ""), (V.STRING, "é\x00 \u2028 🦙")]
    for i, (vtype, value) in enumerate(scalars):
        w.add_key_value(f"test.{i}.{vtype.name}", value, vtype)
    for vtype in dict.fromkeys(t for t, _ in scalars):  # (the writer refuses empty arrays)
        items = [value for t, value in scalars if t == vtype]
        w.add_key_value(f"test.array.{vtype.name}", items, V.ARRAY, vtype)
    rng = np.random.default_rng(1)
    for dims in ((7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)):
        w.add_tensor(f"f32.{len(dims)}d", rng.standard_normal(dims).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 3)).astype(np.float16))
    w.add_tensor("i8", rng.integers(-128, 128, (3, 5), np.int8))
    w.add_tensor("i32", rng.integers(-9, 9, (4,), np.int32))
    w.add_tensor("f64", rng.standard_normal((3,)))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for qtype in (QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
        w.add_tensor(qtype.name, quantize(x, qtype), raw_dtype=qtype)
    for qtype in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(qtype.name, rng.integers(0, 256, (2, size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_reader(path)
    assert open_gguf(path).metadata["test.10.FLOAT32"] != open_gguf(path).metadata[
        "test.10.FLOAT32"]  # NaN came back as NaN


def test_the_comparison_can_fail(tmp_path):
    """A file that differs in one string, or one byte of a tensor, does not pass for another."""
    path = write_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    ref = gguf.GGUFReader(str(path))
    for old, new in ((b"{{ messages }}", b"{{ massages }}"), (data[-4:], data[-4:-1] + b"x")):
        changed = tmp_path / "changed.gguf"
        changed.write_bytes(data[:-4] + new if old == data[-4:] else data.replace(old, new, 1))
        with pytest.raises(AssertionError):
            assert_same(open_gguf(changed), ref, changed)


# ----------------------------------------------------------------------------- string arrays
# open_gguf reads an array of strings (a vocabulary) in one loop of its own; a fault in any of
# its strings must be reported as for a single string, naming the key and the item.

def _strings_file(path, items, count=None):
    """A GGUF file of one key "x": an array of strings of the raw byte strings `items`."""
    body = b"".join(struct.pack("<Q", len(s)) + s for s in items)
    kv = struct.pack("<Q", 1) + b"x" + struct.pack("<IIQ", V.ARRAY, V.STRING,
                                                    len(items) if count is None else count)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + body)
    return path


def test_string_array_read_like_gguf_reader(tmp_path):
    items = ["a", "", "é🦙", "x" * 300]
    path = _strings_file(tmp_path / "s.gguf", [s.encode() for s in items])
    assert open_gguf(path).metadata["x"] == items
    assert_same_as_gguf_reader(path)


@pytest.mark.parametrize("items,count,error", [
    ([b"ab", b"\xff\xfe", b"c"], None, r"x\[1\]: not UTF-8"),
    ([b"ab", b"cd", b"e"], 4, r"x.*4 items cannot fit|x\[3\]: needs 8 bytes"),
    ([b"ab", b"cd"], 2**40, r"x: 1099511627776 items cannot fit"),
])
def test_string_array_faults_name_the_item(tmp_path, items, count, error):
    from xllm.errors import ModelFormatError
    path = _strings_file(tmp_path / "bad.gguf", items, count)
    with pytest.raises(ModelFormatError, match="bad.gguf: " + error):
        open_gguf(path)


def test_string_array_cut_inside_a_string(tmp_path):
    from xllm.errors import ModelFormatError
    data = _strings_file(tmp_path / "s.gguf", [b"abc", b"defgh"]).read_bytes()
    for cut in (len(data) - 1, len(data) - 6, len(data) - 9):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=rf"cut{cut}.gguf: (x\[1\]|x): "):
            open_gguf(path)


def test_dropping_a_tensors_pages_keeps_the_data(tmp_path):
    """drop_pages(tensor) releases the pages under one tensor (page-aligned below it, however
    the tensor is placed); reading it again reads the file again."""
    path = write_tiny_gguf(tmp_path / "t.gguf")
    g = open_gguf(path)
    before = {name: _bytes(t.data).copy() for name, t in g.tensors.items()}
    for name, t in g.tensors.items():
        g.drop_pages(t.data)
        np.testing.assert_array_equal(_bytes(t.data), before[name], err_msg=name)
    g.drop_pages()
    for name, t in g.tensors.items():
        np.testing.assert_array_equal(_bytes(t.data), before[name], err_msg=name)
