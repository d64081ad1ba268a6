"""Tests of the group-quantized weights (xllm.formats.qtensor) and their kernels (xllm._kernels.qmatmul).

* The quantizers are bit-exact with the gguf package's Q8_0 / Q4_0 / Q4_1, and repacking GGUF
  blocks gives the same QTensor as quantizing (dequantize == gguf.quants.dequantize, exactly).
* qmatmul must match the NumPy reference (xllm._kernels.reference.qmatmul, which spells out the
  arithmetic) BIT-EXACTLY for every format, M, thread count, ISA path and number of activation
  parts (QTensor.parts, 1, 2 or 3): that is also what makes a row's result independent of the
  batch it is computed in.
* Independently, qmatmul is compared with float64 x @ dequantize(W).T. With 2 parts the
  activations are quantized to about 16 bits per 32-value block (x ~ dx (q1 + q2/256),
  dx = amax/127), so each value is off by at most amax/65024 (plus clamping in degenerate
  blocks; 3 parts are 256 times closer): we allow |d| <= 1e-4 * (|x| @ |W|.T) + 1e-5
  elementwise, an error bound rather than a typical value.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.formats import qtensor as quant
from xllm._kernels import _cpu
from xllm._kernels import reference as R
from xllm.errors import ModelFormatError

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
# (bits, group, asymmetric, scale dtype)
FORMATS = [(8, 32, False, np.float16), (8, 64, False, np.float16), (8, 128, False, np.float32),
           (8, 32, False, np.float32), (4, 32, False, np.float16), (4, 32, True, np.float16),
           (4, 32, True, np.float32)]
GGUF_KINDS = [("Q8_0", 8, False), ("Q4_0", 4, False), ("Q4_1", 4, True)]


_restore = restore_threads_and_isa(Q)


def weights(rng, n, k, zero_block=False):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if zero_block:
        w[0, :32] = 0  # a group whose scale is 0
    return w


@settings(**SETTINGS)
@given(n=st.integers(1, 40), nb=st.integers(1, 8), kind=st.sampled_from(GGUF_KINDS),
       seed=st.integers(0, 999))
def test_quantizers_are_bit_exact_with_gguf(n, nb, kind, seed):
    name, bits, asym = kind
    w = weights(np.random.default_rng(seed), n, 32 * nb, zero_block=seed % 3 == 0)
    raw = gguf_quantize(w, T[name])
    want = gguf_dequantize(raw, T[name])
    mine = quant.quantize(w, bits, 32, asym)
    repacked = quant.from_gguf_blocks(raw, name, w.shape)
    np.testing.assert_array_equal(mine.dequantize(), want)
    np.testing.assert_array_equal(repacked.dequantize(), want)
    for a, b in [(mine.qs, repacked.qs), (mine.scales, repacked.scales)]:
        np.testing.assert_array_equal(a, b)
    rows = np.array([n - 1, 0, n // 2])
    np.testing.assert_array_equal(mine.dequantize(rows), want[rows])


def test_quantize_accuracy_and_groups():
    w = weights(np.random.default_rng(0), 20, 256)
    for g in (32, 64, 128):
        t = quant.quantize(w, 8, g)
        assert t.scales.shape == (2, 256 // g, 16) and t.kind == f"int8 g{g} fp16"
        # symmetric int8: error <= half a step (amax / 254) per group, plus fp16 scale rounding
        step = np.abs(w.reshape(20, -1, g)).max(axis=2, keepdims=True) / 127
        err = np.abs(t.dequantize() - w).reshape(20, -1, g)
        assert np.all(err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7)
    # asymmetric int4: half a step ((max - min) / 15), plus fp16 rounding of the scale and min
    g = w.reshape(20, -1, 32)
    lo, step = g.min(axis=2, keepdims=True), np.ptp(g, axis=2, keepdims=True) / 15
    err = np.abs(quant.quantize(w, 4, 32, asymmetric=True).dequantize() - w).reshape(g.shape)
    assert np.all(err <= step * (0.5 + 15 * 2.0 ** -11) + np.abs(lo) * 2.0 ** -11 + 1e-7)


def test_quantize_rejects_bad_arguments():
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(w, 3)
    with pytest.raises(ValueError, match="group size 64"):
        quant.quantize(w, 8, 64)            # 64 does not divide 96
    with pytest.raises(ValueError, match="group size 48"):
        quant.quantize(np.zeros((4, 96), np.float32), 8, 48)
    with pytest.raises(ValueError, match="group size 64"):
        quant.quantize(np.zeros((4, 128), np.float32), 4, 64)
    t = quant.quantize(np.zeros((4, 128), np.float32), 8, 64)
    with pytest.raises(ModelFormatError, match="scales"):
        quant.QTensor(t.shape, 8, 32, t.qs, t.scales)          # group size does not fit
    with pytest.raises(ModelFormatError, match="qs"):
        quant.QTensor(t.shape, 8, 64, t.qs[:, :2], t.scales)    # truncated quants
    with pytest.raises(ModelFormatError, match="scales"):
        quant.QTensor(t.shape, 8, 64, t.qs, t.scales[:, :1])    # truncated scales
    with pytest.raises(ModelFormatError, match="3-bit"):
        quant.QTensor(t.shape, 3, 64, t.qs, t.scales)


@pytest.mark.parametrize("isa", QMATMUL_ISAS)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS)  # every (format, parts, ISA): 15 examples each
@settings(**dict(SETTINGS, max_examples=15))
@given(m=st.integers(1, 15), n=st.integers(1, 50), nb=st.sampled_from([1, 2, 4, 12, 127]),
       threads=st.sampled_from([1, 2]), accumulate=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 999))
def test_qmatmul_matches_reference(m, n, nb, fmt, threads, isa, accumulate, parts, scale, seed):
    bits, group, asym, sdt = fmt
    k = 32 * nb
    if k % group:
        k = group * nb
    rng = np.random.default_rng(seed)
    w = quant.quantize(weights(rng, n, k, seed % 4 == 0), bits, group, asym, sdt, parts)
    assert w.parts == parts
    assert_qmatmul_matches_reference(rng, w, m, scale, seed % 5 == 0, threads, isa, accumulate)


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS[::2] + [FORMATS[5]])
def test_batch_thread_and_isa_invariance(fmt, parts):
    bits, group, asym, sdt = fmt
    rng = np.random.default_rng(1)
    K, N = 2048, 333
    x = rng.standard_normal((19, K)).astype(np.float32)
    w = quant.quantize(weights(rng, N, K), bits, group, asym, sdt, parts)
    assert_qmatmul_batch_thread_and_isa_invariant(x, w)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_long_rows_stack_boundary_and_extreme_blocks(parts):
    rng = np.random.default_rng(2)
    K = 8192  # 2 * M * K around the on-stack buffer (2 * 8 * 8192): stack and malloc paths;
    # 40 rows: 3 row chunks (at K = 8192 a work item takes 16 rows, XQ_X_BYTES)
    w = quant.quantize(weights(rng, 17, K), 8, 32, parts=parts)
    for m in (8, 9, 40):
        x = rng.standard_normal((m, K)).astype(np.float32)
        x[0, :32] = rng.standard_normal(32) * 1e-42   # subnormal block scale
        x[1, 32:64] = rng.standard_normal(32) * 1e30
        got, want = np.empty((m, 17), np.float32), np.empty((m, 17), np.float32)
        Q.qmatmul(x, w, got)
        R.qmatmul(x, w, want)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qembedding(fmt):
    bits, group, asym, sdt = fmt
    rng = np.random.default_rng(3)
    w = quant.quantize(weights(rng, 37, 256), bits, group, asym, sdt)
    ids = np.array([0, 36, 17, 17, 5])
    out = np.empty((5, 256), np.float32)
    Q.qembedding(w, ids, out)
    np.testing.assert_array_equal(out, w.dequantize(ids))
    with pytest.raises(IndexError, match="37"):
        Q.qembedding(w, np.array([37]), np.empty((1, 256), np.float32))


def test_bad_inputs():
    rng = np.random.default_rng(4)
    w = quant.quantize(weights(rng, 3, 64), 8, 32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="columns"):
        Q.qmatmul(np.zeros((2, 96), np.float32), w, np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        Q.qmatmul(x, w, np.empty((2, 4), np.float32))
    with pytest.raises(TypeError, match="float32"):
        Q.qmatmul(x.astype(np.float64), w, np.empty((2, 3), np.float32))
    with pytest.raises(TypeError, match="QTensor"):
        Q.qmatmul(x, np.zeros((3, 64), np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        Q.qmatmul(np.zeros((2, 128), np.float32)[:, ::2], w, np.empty((2, 3), np.float32))
    w.scales = w.scales[:, :1]  # corrupted after construction: caught before the kernel runs
    # (the kernels raise ValueError: ModelFormatError belongs to the layers above them)
    with pytest.raises(ValueError, match="scales"):
        Q.qmatmul(x, w, np.empty((2, 3), np.float32))


@pytest.mark.parametrize("parts", [2, 3])
def test_several_weights_sharing_x(parts):
    """qmatmul(x, (w1, w2, w3), (o1, o2, o3)): the same bits as three separate calls."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 128)).astype(np.float32)
    ws = (quant.quantize(weights(rng, 40, 128), 8, 64, parts=parts),
          quant.quantize(weights(rng, 7, 128), 4, parts=parts),
          quant.quantize(weights(rng, 16, 128), 4, 32, True, parts=parts))
    outs = tuple(np.empty((9, w.shape[0]), np.float32) for w in ws)
    for t in (1, 2):
        _cpu.set_threads(t)
        Q.qmatmul(x, ws, outs)
        for w, o in zip(ws, outs):
            alone = np.empty_like(o)
            Q.qmatmul(x, w, alone)
            np.testing.assert_array_equal(o, alone)
    with pytest.raises(ValueError, match="same length"):
        Q.qmatmul(x, ws, outs[:2])
    other = quant.quantize(weights(rng, 8, 128), 8, parts=5 - parts)
    for impl in (Q, R):
        with pytest.raises(ValueError, match="equal parts"):
            impl.qmatmul(x, ws[:1] + (other,), outs[:1] + (np.empty((9, 8), np.float32),))
    # the model's dispatch splits such a tuple (a GGUF may mix Q8_0 and Q4_0 in wq/wk/wv)
    assert_dispatch_matches_separate_calls(x, ws[:1] + (other,))


def test_parts_defaults_and_validation():
    rng = np.random.default_rng(6)
    w = weights(rng, 20, 64)
    assert quant.quantize(w, 8).parts == 2 and quant.quantize(w, 8, parts=3).parts == 3
    assert quant.quantize(w, 4).parts == 3 and quant.quantize(w, 4, 32, True, parts=2).parts == 2
    for name, bits, asym in GGUF_KINDS:
        raw = gguf_quantize(w, T[name])
        assert quant.from_gguf_blocks(raw, name, w.shape).parts == (2 if bits == 8 else 3)
        other = 3 if bits == 8 else 2
        assert quant.from_gguf_blocks(raw, name, w.shape, parts=other).parts == other
    q = quant.quantize_weights({"a": w, "n": np.ones(64, np.float32)}, 8, parts=3)
    assert q["a"].parts == 3
    for bad in (4, 0, -1, "2", 2.0, True):
        with pytest.raises(ValueError, match="parts .*must be 1, 2 or 3"):
            quant.QTensor(q["a"].shape, 8, 32, q["a"].qs, q["a"].scales, parts=bad)
    with pytest.raises(ValueError, match="must be 1, 2 or 3, got 4"):
        quant.quantize(w, 4, parts=4)
    assert quant.quantize(w, 8, parts=1).parts == 1
    t = quant.quantize(w, 8)
    t.parts = 0  # corrupted after construction: caught before the kernel runs
    with pytest.raises(ValueError, match="must be 1, 2 or 3, got 0"):
        Q.qmatmul(np.zeros((1, 64), np.float32), t, np.empty((1, 20), np.float32))


def _with_part_counts(fmt, isa, counts, seed):
    """qmatmul of random x [13, 512] with one random weight in format `fmt` (the same codes
    and scales) split into each count of `counts` parts, on path `isa`: (x, the weight
    dequantized as float64, {count: out})."""
    bits, group, asym, sdt = fmt
    rng = np.random.default_rng(seed)
    Q.set_isa(isa)
    x = rng.standard_normal((13, 512)).astype(np.float32)
    w = quant.quantize(weights(rng, 70, 512), bits, group, asym, sdt)
    outs = {}
    for parts in counts:
        wp = quant.QTensor(w.shape, bits, group, w.qs, w.scales, w.mins, parts=parts)
        outs[parts] = np.empty((13, 70), np.float32)
        Q.qmatmul(x, wp, outs[parts])
    return x, w.dequantize().astype(np.float64), outs


@pytest.mark.parametrize("isa", QMATMUL_ISAS)
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[4], FORMATS[5]])
def test_two_parts_differ_from_three_within_bound(fmt, isa):
    """The switch is not a no-op: 2 parts give other bits than 3 on random data (same codes
    and scales), and both stay close to float64 x @ W.T. With 2 parts each activation is off by
    at most amax / 65024 (amax of its block, about 3 |x| on average for Gaussian x), so we
    require |d| <= 3e-5 * (|x| @ |W|.T) (measured: 5e-6); 3 parts, 1e-6 (measured 4e-7, mostly
    the float32 sums), and the 2-part error must be clearly larger than the 3-part one."""
    x, W, o = _with_part_counts(fmt, isa, (2, 3), seed=7)
    assert np.mean(o[2] != o[3]) > 0.5  # most elements differ
    exact, mag = x.astype(np.float64) @ W.T, np.abs(x).astype(np.float64) @ np.abs(W).T
    err2, err3 = np.abs(o[2] - exact) / mag, np.abs(o[3] - exact) / mag
    print(f"{fmt} {isa}: max relative error 2 parts {err2.max():.2e}, 3 parts {err3.max():.2e}")
    assert err2.max() <= 3e-5 and err3.max() <= 1e-6 and err2.max() > 4 * err3.max()


@pytest.mark.parametrize("isa", QMATMUL_ISAS)
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[4], FORMATS[5]])
def test_one_part_differs_from_two_within_its_bound(fmt, isa):
    """One part (activation_parts=1) gives other bits than 2 and stays within the bound of its
    rounding: each activation is off by at most half its block's step amax / 127, so
    |d| <= (amax / 254 per value) @ |W|.T plus 1e-6 of |x| @ |W|.T for the float32 sums
    (measured: about a quarter of the rounding bound), and far more than with 2 parts."""
    x, W, o = _with_part_counts(fmt, isa, (1, 2), seed=8)
    assert np.mean(o[1] != o[2]) > 0.9
    exact, mag = x.astype(np.float64) @ W.T, np.abs(x).astype(np.float64) @ np.abs(W).T
    amax = np.abs(x.astype(np.float64)).reshape(13, 16, 32).max(axis=2)
    rounding = np.repeat(amax / 254, 32, axis=1) @ np.abs(W).T
    err1, err2 = np.abs(o[1] - exact), np.abs(o[2] - exact)
    print(f"{fmt} {isa}: largest error / rounding bound, 1 part {(err1 / rounding).max():.2f}")
    assert np.all(err1 <= rounding + 1e-6 * mag)
    assert err1.max() > 20 * err2.max()
