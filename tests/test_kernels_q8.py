"""Tests of the GGUF Q8_0 matmul kernel (xllm._kernels.qmatmul.matmul_q8_0).

The numpy reference below (ref_*) reproduces the kernel's arithmetic exactly: the same int8
quantization of x per 32-value block (dx = amax / 127 in float32, q = clip(rint(x / dx)),
round half to even), exact integer block dot products, and the same float32 accumulation in
block order (s = dw * dx; t = s * dot; acc = acc + t, no FMA). The kernel must match it
BIT-EXACTLY (assert_array_equal), for every M, thread count and ISA path.

Independently, the result is compared with float64 x @ dequant(W).T: the only difference is
the activation quantization (relative error <= 1/254 per value) plus float32 rounding, so we
allow |d| <= 1e-2 * (|x| @ |W|.T) + 1e-6 elementwise (an error bound, not a typical value;
typical errors are ~100x smaller). The W layout is produced by gguf.quants.quantize, and
ref_dequant is checked against gguf.quants.dequantize.
"""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from xllm._kernels import _cpu  # noqa: E402

Q = pytest.importorskip("xllm._kernels.qmatmul")

SETTINGS = dict(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
ISAS = ["avx2"] + (["avx512vnni"] if _cpu.features()["avx512vnni"] else [])


@pytest.fixture(autouse=True)
def _restore():
    n, isa = _cpu.get_threads(), Q.get_isa()
    yield
    _cpu.set_threads(n)
    Q.set_isa(isa)


# ---------------- numpy reference ----------------

def ref_split_blocks(w_blocks):
    """Q8_0 bytes [N, nb*34] -> (scales float32 [N, nb], quants int8 [N, nb, 32])."""
    N = w_blocks.shape[0]
    b = w_blocks.reshape(N, -1, 34)
    d = b[:, :, :2].copy().view("<f2")[:, :, 0].astype(np.float32)
    q = b[:, :, 2:].view(np.int8)
    return d, q


def ref_dequant(w_blocks):
    """W float32 [N, K] from its Q8_0 bytes."""
    d, q = ref_split_blocks(w_blocks)
    return (d[:, :, None] * q.astype(np.float32)).reshape(w_blocks.shape[0], -1)


def ref_quantize_x(x):
    """The kernel's on-the-fly int8 quantization of x [M, K]: (q int8 [M, nb, 32],
    dx float32 [M, nb])."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(xb / d[:, :, None])
    r = np.where(d[:, :, None] == 0, 0, r)
    q = np.clip(r, -127, 127).astype(np.int8)
    return q, d


def ref_matmul_q8_0(x, w_blocks):
    """Bit-exact model of the kernel: float32 [M, N]."""
    qx, dx = ref_quantize_x(x)
    dw, qw = ref_split_blocks(w_blocks)
    dots = np.einsum("mbi,nbi->mnb", qx.astype(np.int64), qw.astype(np.int64))
    acc = np.zeros((x.shape[0], w_blocks.shape[0]), np.float32)
    for b in range(dx.shape[1]):
        s = dw[None, :, b] * dx[:, None, b]                    # float32
        t = s * dots[:, :, b].astype(np.float32)               # float32, exact conversion
        acc = acc + t                                          # float32, block order
    return acc


def make_w(rng, N, K, scale=0.05):
    w = (rng.standard_normal((N, K)) * scale).astype(np.float32)
    wb = quantize(w, GGMLQuantizationType.Q8_0)
    return np.ascontiguousarray(wb.reshape(N, K // 32 * 34)).view(np.uint8)


# ---------------- tests ----------------

def test_reference_layout_matches_gguf():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 96)).astype(np.float32)
    wb = make_w(rng, 5, 96)
    assert wb.dtype == np.uint8 and wb.shape == (5, 3 * 34)
    np.testing.assert_array_equal(
        ref_dequant(wb), dequantize(wb, GGMLQuantizationType.Q8_0).reshape(5, 96))
    # scale then quants, little-endian fp16: a hand-built block
    blk = np.zeros((1, 34), np.uint8)
    blk[0, :2] = np.frombuffer(np.float16(0.5).astype("<f2").tobytes(), np.uint8)
    blk[0, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    np.testing.assert_array_equal(ref_dequant(blk)[0], np.arange(-16, 16) * 0.5)
    del w


def test_reference_quantization_of_x():
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.linspace(-1, 1, 32)
    x[0, 0] = -2.54  # amax -> dx = 0.02
    q, d = ref_quantize_x(x)
    assert d[0, 1] == 0 and not q[0, 1].any()
    assert q[0, 0, 0] == -127
    assert np.abs(q).max() <= 127
    np.testing.assert_allclose(q[0, 0] * d[0, 0], x[0, :32], atol=d[0, 0] / 2 * 1.0001)


@settings(**SETTINGS)
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.sampled_from([32, 64, 96, 4064]),
       threads=st.sampled_from([1, 2]), accumulate=st.booleans(), isa=st.sampled_from(ISAS),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 999))
def test_matches_reference(m, n, k, threads, accumulate, isa, scale, seed):
    _cpu.set_threads(threads)
    Q.set_isa(isa)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    if seed % 5 == 0:
        x[:, :32] = 0  # an all-zero block of x
    wb = make_w(rng, n, k)
    out0 = rng.standard_normal((m, n)).astype(np.float32)
    got = out0.copy()
    Q.matmul_q8_0(x, wb, got, accumulate=accumulate)
    want = ref_matmul_q8_0(x, wb)
    if accumulate:
        want = out0 + want
    np.testing.assert_array_equal(got, want)  # bit-exact
    # loose check against float64 with dequantized W (activation quantization error)
    W = ref_dequant(wb).astype(np.float64)
    exact = x.astype(np.float64) @ W.T
    bound = 1e-2 * (np.abs(x).astype(np.float64) @ np.abs(W).T) + 1e-6
    delta = got.astype(np.float64) - (out0 if accumulate else 0) - exact
    assert np.all(np.abs(delta) <= bound + 1e-6 * np.abs(out0 if accumulate else 0))


@pytest.mark.parametrize("isa", ISAS)
def test_batch_and_thread_invariance(isa):
    Q.set_isa(isa)
    rng = np.random.default_rng(1)
    K, N = 2048, 333
    x = rng.standard_normal((19, K)).astype(np.float32)
    wb = make_w(rng, N, K)
    _cpu.set_threads(2)
    full = np.empty((19, N), np.float32)
    Q.matmul_q8_0(x, wb, full)
    for t in (1, 2):
        _cpu.set_threads(t)
        for m0, m1 in [(0, 1), (3, 4), (5, 9), (2, 19)]:
            part = np.empty((m1 - m0, N), np.float32)
            Q.matmul_q8_0(np.ascontiguousarray(x[m0:m1]), wb, part)
            np.testing.assert_array_equal(part, full[m0:m1])
    # same bits on every ISA path
    for other in ISAS:
        Q.set_isa(other)
        o = np.empty_like(full)
        Q.matmul_q8_0(x, wb, o)
        np.testing.assert_array_equal(o, full)


def test_large_stack_boundary():
    # M * K around the stack-buffer size (4 * 32768): stack and malloc paths agree
    rng = np.random.default_rng(2)
    K = 32768
    wb = make_w(rng, 9, K)
    for m in (4, 5):
        x = rng.standard_normal((m, K)).astype(np.float32)
        got = np.empty((m, 9), np.float32)
        Q.matmul_q8_0(x, wb, got)
        np.testing.assert_array_equal(got, ref_matmul_q8_0(x, wb))


def test_subnormal_and_huge_blocks():
    rng = np.random.default_rng(3)
    x = np.zeros((2, 96), np.float32)
    x[0, :32] = rng.standard_normal(32) * 1e-42   # subnormal scale: clamped quants
    x[0, 32:64] = rng.standard_normal(32) * 1e30
    x[1, 64:] = 190 * np.float32(1.4e-45) * np.sign(rng.standard_normal(32))
    wb = make_w(rng, 11, 96)
    got = np.empty((2, 11), np.float32)
    Q.matmul_q8_0(x, wb, got)
    np.testing.assert_array_equal(got, ref_matmul_q8_0(x, wb))


def test_bad_inputs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    wb = make_w(rng, 3, 64)
    out = np.empty((2, 3), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.matmul_q8_0(np.zeros((2, 40), np.float32), np.zeros((3, 34), np.uint8), out)
    with pytest.raises(ValueError, match="bytes per row"):
        Q.matmul_q8_0(x, np.zeros((3, 64), np.uint8), out)
    with pytest.raises(ValueError, match="bytes per row"):
        Q.matmul_q8_0(x, np.zeros((3, 70), np.uint8), out)
    with pytest.raises(TypeError, match="uint8"):
        Q.matmul_q8_0(x, wb.view(np.int8), out)
    with pytest.raises(TypeError, match="x must be float32"):
        Q.matmul_q8_0(x.astype(np.float64), wb, out)
    with pytest.raises(TypeError, match="out must be float32"):
        Q.matmul_q8_0(x, wb, out.astype(np.float64))
    with pytest.raises(ValueError, match="out must have shape"):
        Q.matmul_q8_0(x, wb, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        Q.matmul_q8_0(np.asfortranarray(x), wb, out)
    with pytest.raises(ValueError, match="2-D"):
        Q.matmul_q8_0(x[0], wb, out)
    with pytest.raises(TypeError, match="numpy array"):
        Q.matmul_q8_0(x.tolist(), wb, out)
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        Q.matmul_q8_0(x, wb, ro)
    buf = np.zeros(200, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        Q.matmul_q8_0(buf[:128].reshape(2, 64), wb, buf[120:126].reshape(2, 3))
    # read-only weights are fine
    wro = wb.copy()
    wro.flags.writeable = False
    Q.matmul_q8_0(x, wro, out)
    np.testing.assert_array_equal(out, ref_matmul_q8_0(x, wb))
    with pytest.raises(ValueError, match="isa"):
        Q.set_isa("sse2")


def test_empty():
    out = np.ones((0, 3), np.float32)
    Q.matmul_q8_0(np.zeros((0, 64), np.float32), np.zeros((3, 68), np.uint8), out)
    out = np.ones((2, 3), np.float32)
    Q.matmul_q8_0(np.ones((2, 0), np.float32), np.zeros((3, 0), np.uint8), out)
    np.testing.assert_array_equal(out, 0)


def bench(M=1, N=5632, K=2048, threads=2, reps=200):
    """GB/s of w_blocks streamed (for the report; not a test)."""
    rng = np.random.default_rng(0)
    wb = make_w(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    out = np.empty((M, N), np.float32)
    _cpu.set_threads(threads)
    for _ in range(10):
        Q.matmul_q8_0(x, wb, out)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            Q.matmul_q8_0(x, wb, out)
        best = min(best, (time.perf_counter() - t) / reps)
    return wb.nbytes / best / 1e9, best


if __name__ == "__main__":
    for isa in ISAS:
        Q.set_isa(isa)
        for th in (1, 2):
            gbs, t = bench(threads=th)
            print(f"{isa} threads={th}: {gbs:.1f} GB/s ({t * 1e6:.0f} us)")
