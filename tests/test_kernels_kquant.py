"""Tests of the codecs of the quantized kernels: GGUF Q5_0, Q5_1, Q4_K, Q5_K and Q6_K run from
their own blocks (xllm/_kernels/gemm_k.h, layout.py).

* Repacking GGUF blocks keeps every value: QTensor.dequantize (NumPy) and qembedding (C) equal
  ``gguf.quants.dequantize`` bit for bit, on random blocks (every code, every 6-bit scale and
  minimum, float16 scales of both signs) and, for Q5_0 / Q5_1, on blocks of the gguf package's
  own quantizer.
* qmatmul equals the NumPy reference (reference.qmatmul, which spells out the arithmetic) BIT FOR
  BIT for every codec, ISA path, thread count, M, number of activation parts, and awkward sizes:
  that is also what makes a row's result independent of its batch.
* Independently, qmatmul is compared with float64 x @ dequantize(W).T within the error bound of
  the activations' quantization (test_kernels_quant.py states it): |d| <= 1e-4 (|x| @ |W|.T) +
  1e-5 elementwise.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm._kernels import _cpu
from xllm._kernels import backend
from xllm._kernels import reference as R
from xllm.errors import ModelFormatError
from xllm.formats import qtensor as quant
from xllm.formats.dispatch import ops
from xllm.formats.registry import FORMATS

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

Q = pytest.importorskip("xllm._kernels.qmatmul")
from helpers_kernels import QMATMUL_ISAS, restore_threads_and_isa  # noqa: E402
from helpers_kernels import assert_qmatmul_batch_thread_and_isa_invariant  # noqa: E402
from helpers_kernels import assert_qmatmul_matches_reference  # noqa: E402
from helpers_kernels import assert_dispatch_matches_separate_calls  # noqa: E402

SETTINGS = dict(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
CODECS = ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"]
# the float16 fields of each block: (byte offset, kind) with kind "d" a scale, "m" a minimum
F16_FIELDS = {"Q5_0": [(0, "d")], "Q5_1": [(0, "d"), (2, "m")], "Q4_K": [(0, "d"), (2, "d")],
              "Q5_K": [(0, "d"), (2, "d")], "Q6_K": [(208, "d")]}


_restore = restore_threads_and_isa(Q)


def random_blocks(rng, name, n, k, zero_scale=False):
    """Raw GGUF rows [n, bytes] of codec `name`: random codes and sub-block scales, float16
    scales near the magnitudes real files hold (both signs), one scale 0 if zero_scale."""
    fmt = FORMATS[name]
    nb = k // fmt.block
    raw = rng.integers(0, 256, (n, nb, fmt.block_bytes), dtype=np.uint8)
    for offset, kind in F16_FIELDS[name]:
        size = 1e-3 if fmt.block == 256 else 2e-3
        values = rng.standard_normal((n, nb)) * size
        if kind == "m":
            values *= 20
        if zero_scale:
            values[0, 0] = 0
        raw[:, :, offset:offset + 2] = values.astype(np.float16)[:, :, None].view(np.uint8)
    return raw.reshape(n, nb * fmt.block_bytes)


def packed(rng, name, n, k, parts=None, zero_scale=False):
    raw = random_blocks(rng, name, n, k, zero_scale)
    return quant.from_gguf_blocks(raw, name, (n, k), parts=parts), raw


@settings(**SETTINGS)
@given(n=st.integers(1, 40), nsb=st.integers(1, 3), name=st.sampled_from(CODECS),
       seed=st.integers(0, 999))
def test_dequantize_equals_gguf(n, nsb, name, seed):
    rng = np.random.default_rng(seed)
    k = 256 * nsb
    t, raw = packed(rng, name, n, k, zero_scale=seed % 3 == 0)
    want = gguf_dequantize(raw, T[name])
    np.testing.assert_array_equal(t.dequantize(), want)
    rows = np.array([n - 1, 0, n // 2])
    np.testing.assert_array_equal(t.dequantize(rows), want[rows])
    out = np.empty((3, k), np.float32)
    Q.qembedding(t, rows, out)
    np.testing.assert_array_equal(out, want[rows])
    R.qembedding(t, rows, out)
    np.testing.assert_array_equal(out, want[rows])
    assert t.nbytes == -(-n // 16) * 16 * raw.shape[1]  # the size of the GGUF blocks


def empty_arrays(name, n, k, rng=None):
    """Arrays of codec `name`'s layout for an [n, k] weight (qs, scales, mins, high, sub; None
    where the codec has none): zeroed, or random bytes if `rng` is given."""
    from xllm._kernels.layout import CODECS as LAYOUT, sub_shape
    c = LAYOUT[name]
    p = -(-n // 16)
    mins = np.zeros((p, k // c.group, 16), np.float16) if c.asymmetric else None
    high = np.zeros((p, k // 32, 64 * c.planes), np.uint8) if c.planes else None
    sub = np.zeros(*sub_shape(c, p, k)) if c.sub else None
    arrays = [np.zeros((p, k // 32, 256), np.uint8), np.zeros((p, k // c.group, 16), np.float16),
              mins, high, sub]
    if rng is not None:
        for a in arrays:
            if a is not None:
                a.view(np.uint8)[...] = rng.integers(0, 256, a.nbytes, np.uint8).reshape(
                    a.view(np.uint8).shape)
    return arrays


@settings(**dict(SETTINGS, max_examples=30))
@given(n=st.integers(0, 40), blocks=st.integers(0, 5), name=st.sampled_from(CODECS),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_compiled_repack_equals_reference(n, blocks, name, threads, seed):
    """The load-time repacking (C, whole words, parallel over panels) writes the reference's
    arrays, every byte of them: the arrays it fills start as random bytes. Awkward sizes: rows
    that leave the last panel part full (the padding rows must come out 0), K of any number of
    GGUF blocks (Q5_0, Q5_1: of 32 values, not only multiples of 256)."""
    k = FORMATS[name].block * blocks
    rng = np.random.default_rng(seed)
    raw = random_blocks(rng, name, n, k)
    _cpu.set_threads(threads)
    got = empty_arrays(name, n, k, rng)
    want = empty_arrays(name, n, k)
    Q.repack_codec(raw, name, (n, k), *got)
    R.repack_codec(raw, name, (n, k), *want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("name", CODECS)
def test_from_gguf_blocks_same_with_either_repacker(name, monkeypatch):
    """from_gguf_blocks leaves its arrays unzeroed (np.empty): the NumPy reference repacker
    must fill every byte as the compiled one does (20 rows: a part-full last panel)."""
    k = 2 * FORMATS[name].block
    raw = random_blocks(np.random.default_rng(7), name, 20, k)
    compiled = quant.from_gguf_blocks(raw, name, (20, k))
    monkeypatch.setattr(quant, "_repacker", lambda: R.repack_codec)
    for _ in range(3):  # fresh np.empty arrays, whatever memory they reuse
        ref = quant.from_gguf_blocks(raw, name, (20, k))
        for field in ("qs", "scales", "mins", "high", "sub"):
            a = getattr(compiled, field)
            b = getattr(ref, field)
            assert (a is None and b is None) or np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_repack_rejects_bad_arguments():
    raw = random_blocks(np.random.default_rng(0), "Q6_K", 20, 512)
    arrays = empty_arrays("Q6_K", 20, 512)
    with pytest.raises(ValueError, match="raw must have shape"):
        Q.repack_codec(raw[:, :-1].copy(), "Q6_K", (20, 512), *arrays)
    with pytest.raises(ValueError, match="layout"):
        Q.repack_codec(raw, "Q6_K", (20, 512), arrays[0][:1], *arrays[1:])
    with pytest.raises(ValueError, match="layout"):
        Q.repack_codec(raw, "Q6_K", (20, 512), *arrays[:3], None, arrays[4])
    with pytest.raises(ValueError, match="unknown codec"):
        Q.repack_codec(raw, "Q7_K", (20, 512), *arrays)
    with pytest.raises(ValueError, match="shape"):
        Q.repack_codec(raw, "Q6_K", (20, 500), *arrays)
    arrays[0].flags.writeable = False
    with pytest.raises(ValueError):
        Q.repack_codec(raw, "Q6_K", (20, 512), *arrays)


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1"])
def test_gguf_quantized_q5_blocks(name):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((37, 320)) * 0.05).astype(np.float32)
    w[0, :32] = 0
    raw = gguf_quantize(w, T[name])
    t = quant.from_gguf_blocks(raw, name, w.shape)
    np.testing.assert_array_equal(t.dequantize(), gguf_dequantize(raw, T[name]))


@pytest.mark.parametrize("isa", QMATMUL_ISAS)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("name", CODECS)  # every (codec, parts, ISA): 15 examples each
@settings(**dict(SETTINGS, max_examples=15))
@given(m=st.integers(1, 15), n=st.integers(1, 50), nsb=st.sampled_from([1, 2, 5]),
       threads=st.sampled_from([1, 2]), accumulate=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 999))
def test_qmatmul_matches_reference(m, n, nsb, name, threads, isa, accumulate, parts, scale,
                                   seed):
    rng = np.random.default_rng(seed)
    k = 256 * nsb if FORMATS[name].block == 256 else 32 * (8 * nsb - seed % 7)
    w, _ = packed(rng, name, n, k, parts, zero_scale=seed % 4 == 0)
    assert w.parts == parts
    assert_qmatmul_matches_reference(rng, w, m, scale, seed % 5 == 0, threads, isa, accumulate)


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("name", CODECS)
def test_batch_thread_and_isa_invariance(name, parts):
    rng = np.random.default_rng(2)
    K, N = 2048, 333
    x = rng.standard_normal((19, K)).astype(np.float32)
    w, _ = packed(rng, name, N, K, parts)
    assert_qmatmul_batch_thread_and_isa_invariant(x, w)


def test_long_rows_and_extreme_blocks():
    """K = 8192 (stack and malloc paths, several row chunks), subnormal and huge blocks of x."""
    rng = np.random.default_rng(3)
    K = 8192
    for name in ("Q4_K", "Q6_K"):
        w, _ = packed(rng, name, 17, K)
        for m in (8, 9, 40):
            x = rng.standard_normal((m, K)).astype(np.float32)
            x[0, :32] = rng.standard_normal(32) * 1e-42
            x[1, 32:64] = rng.standard_normal(32) * 1e30
            got = np.empty((m, 17), np.float32)
            want = np.empty((m, 17), np.float32)
            Q.qmatmul(x, w, got)
            R.qmatmul(x, w, want)
            np.testing.assert_array_equal(got, want)


def test_mixed_codecs_share_x():
    """A Q4_K_M file mixes types in wq/wk/wv: one qmatmul call over (Q4_K, Q6_K, Q5_0, Q8_0 with
    1 part, the codecs' default) gives the same bits as separate calls, and the dispatch sends
    such a tuple to it."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    ws = (packed(rng, "Q4_K", 40, 512)[0], packed(rng, "Q6_K", 7, 512)[0],
          packed(rng, "Q5_0", 16, 512)[0],
          quant.quantize((rng.standard_normal((5, 512)) * 0.05).astype(np.float32), 8, parts=1))
    outs = tuple(np.empty((9, w.shape[0]), np.float32) for w in ws)
    for t in (1, 2):
        _cpu.set_threads(t)
        for impl in (Q, ops(backend)):
            impl.qmatmul(x, ws, outs) if impl is Q else impl.matmul(x, ws, outs)
            for w, o in zip(ws, outs):
                alone = np.empty_like(o)
                Q.qmatmul(x, w, alone)
                np.testing.assert_array_equal(o, alone)
                R.qmatmul(x, w, alone)
                np.testing.assert_array_equal(o, alone)
    # weights of different default parts side by side (int4 with 3 beside the codecs' 1): the
    # dispatch splits the tuple, with the same bits as separate calls
    q4 = quant.quantize((rng.standard_normal((5, 512)) * 0.05).astype(np.float32), 4)
    assert q4.parts == 3 and ws[0].parts == 1
    assert_dispatch_matches_separate_calls(x, (ws[0], q4, ws[2]))


def test_bad_codec_tensors():
    rng = np.random.default_rng(5)
    raw = random_blocks(rng, "Q4_K", 4, 256)
    with pytest.raises(ModelFormatError, match="multiple of 256"):
        quant.from_gguf_blocks(raw, "Q4_K", (8, 128))
    w, _ = packed(rng, "Q6_K", 20, 512)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    with pytest.raises(ModelFormatError, match="sub"):
        quant.QTensor(w.shape, 6, 256, w.qs, w.scales, None, codec="Q6_K", high=w.high,
                      sub=w.sub[:, :1])
    with pytest.raises(ModelFormatError, match="high"):
        quant.QTensor(w.shape, 6, 256, w.qs, w.scales, None, codec="Q6_K", high=None,
                      sub=w.sub)
    with pytest.raises(ModelFormatError, match="codec"):
        quant.QTensor(w.shape, 6, 256, w.qs, w.scales, None, codec="Q7_K", high=w.high,
                      sub=w.sub)
    for field, bad in [("sub", w.sub[:, :, :8]), ("high", w.high[:, :, :64]),
                       ("scales", w.scales.astype(np.float32)), ("codec", "Q5_K"),
                       ("sub", w.sub.view(np.uint8))]:
        corrupt, _ = packed(rng, "Q6_K", 20, 512)
        setattr(corrupt, field, bad)  # corrupted after construction: caught before the kernel
        with pytest.raises(ValueError):
            Q.qmatmul(x, corrupt, np.empty((2, 20), np.float32))


def test_k_quant_row_not_a_multiple_of_256_is_a_clear_error(tmp_path):
    """A GGUF whose Q4_K tensor claims rows of 128 values: ModelFormatError naming the file, the
    tensor and the block size (the reader checks every tensor's dims before any kernel)."""
    from xllm.files.gguf import open_gguf
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = random_blocks(np.random.default_rng(7), "Q4_K", 4, 256)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=T.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    dims = np.array([256, 4], "<u8").tobytes()
    at = data.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4  # after n_dims
    assert data[at:at + 16] == dims
    data[at:at + 8] = np.array([128], "<u8").tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"bad.gguf.*blk.0.attn_q.weight.*Q4_K block \(256\)"):
        open_gguf(str(path))
