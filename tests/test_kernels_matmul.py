"""Tests of the compiled matmul / embedding kernels against the NumPy reference.

Tolerance (elementwise): |got - ref| <= 1e-5 * (|x| @ |w|.T) + 1e-6, where ref is computed in
float64 and rounded once. float32 accumulation error grows like K * eps * sum|x*w|; with the
vector-lane accumulation used here it stays far below 1e-5 relative to sum|x*w| for K <= ~5000.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm._kernels.layout import to_float32
from xllm._kernels import _cpu, reference
from xllm._kernels import matmul as mm

HAS_AVX512 = _cpu.features()["avx512"]
ISAS = ["avx2", "avx512"] if HAS_AVX512 else ["avx2"]
DTYPES = ["float32", "float16", "bf16"]
AWKWARD = [1, 3, 17, 200, 1000]


@pytest.fixture(autouse=True)
def _restore_state():
    """Each test may change the ISA path, thread count and blocking; put them back afterwards."""
    isa, threads = mm.get_isa(), _cpu.get_threads()
    tuning = mm._tune()
    yield
    mm.set_isa(isa)
    _cpu.set_threads(threads)
    mm._tune(*tuning)


# matmul has two paths: "decode" (few rows; w converted in registers, no K blocking) and
# "prefill" (many rows; w converted per panel, x packed, K blocked). mm._tune forces either.
DEFAULT_KC, _, DEFAULT_PREFILL_MIN_M = mm._tune()
PATHS = {"auto": DEFAULT_PREFILL_MIN_M, "decode": 10**9, "prefill": 1}


def set_path(path, kc=None):
    mm._tune(kc=kc or DEFAULT_KC, prefill_min_m=PATHS[path])


def make_w(rng, n, k, dtype):
    w = rng.standard_normal((n, k), dtype=np.float32)
    if dtype == "bf16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit patterns
    return w.astype(dtype)


def check_close(x, w, got, want):
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(to_float32(w)).T) + 1e-6
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), f"max error {err.max()} (bound there {bound.flat[err.argmax()]})"


def run_case(rng, m, k, n, dtype, accumulate, isa, threads, slice_out=False):
    """Compare one random case against the reference (in the current path and blocking)."""
    mm.set_isa(isa)
    _cpu.set_threads(threads)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = make_w(rng, n, k, dtype)
    w.flags.writeable = False  # weights may be read-only memmaps
    if slice_out:  # out is rows 2 .. 2+m of a larger C-contiguous buffer
        big = rng.standard_normal((m + 5, n), dtype=np.float32)
        out = big[2:2 + m]
    else:
        out = rng.standard_normal((m, n), dtype=np.float32)
    want = out.astype(np.float64)
    ref = np.empty((m, n), np.float32)
    reference.matmul(x, w, ref)
    want = want + ref if accumulate else ref.astype(np.float64)
    before = big.copy() if slice_out else None
    mm.matmul(x, w, out, accumulate=accumulate)
    check_close(x, w, out, want)
    if slice_out:  # rows outside the slice untouched
        np.testing.assert_array_equal(big[:2], before[:2])
        np.testing.assert_array_equal(big[2 + m:], before[2 + m:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", AWKWARD)
@pytest.mark.parametrize("n", [1, 3, 17, 70])
def test_matmul_awkward_shapes(isa, dtype, k, n):
    rng = np.random.default_rng(k * 1000 + n)
    for m in (1, 4, 13, 21):  # 21: prefill path, with row tiles of 8 + a remainder of 5
        run_case(rng, m, k, n, dtype, False, isa, 2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_long_rows_and_prefill(isa, dtype, accumulate, threads):
    rng = np.random.default_rng(7)
    run_case(rng, 2, 5003, 37, dtype, accumulate, isa, threads)  # long row, decode path
    run_case(rng, 19, 5003, 29, dtype, accumulate, isa, threads)  # long row, prefill path
    run_case(rng, 70, 261, 101, dtype, accumulate, isa, threads, slice_out=True)  # prefill
    # prefill with several K blocks and several sub-panels per panel of w
    run_case(rng, 40, 700, 300, dtype, accumulate, isa, threads)


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 300), n=st.integers(1, 80),
       dtype=st.sampled_from(DTYPES), accumulate=st.booleans(), isa=st.sampled_from(ISAS),
       threads=st.sampled_from([1, 2]), slice_out=st.booleans(),
       path=st.sampled_from(sorted(PATHS)), kc=st.sampled_from([16, 48, 512]),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_random(m, k, n, dtype, accumulate, isa, threads, slice_out, path, kc, seed):
    set_path(path, kc)  # small kc: many K blocks even for short rows
    run_case(np.random.default_rng(seed), m, k, n, dtype, accumulate, isa, threads, slice_out)


def test_matmul_m0_and_k0():
    x = np.zeros((0, 5), np.float32)
    mm.matmul(x, np.ones((3, 5), np.float32), np.zeros((0, 3), np.float32))
    for m in (2, 40):  # decode and prefill paths
        out = np.full((m, 3), 7.0, np.float32)
        mm.matmul(np.zeros((m, 0), np.float32), np.zeros((3, 0), np.float16), out)
        np.testing.assert_array_equal(out, 0.0)
        mm.matmul(np.zeros((m, 0), np.float32), np.zeros((3, 0), np.float32), out,
                  accumulate=True)
        np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance(isa, dtype):
    """out[r] must be bitwise the same computed alone, in any batch, with 1 or 2 threads, on
    either path and with any K blocking (with and without accumulate)."""
    mm.set_isa(isa)
    rng = np.random.default_rng(3)
    k, n = 1503, 67  # M * N * K above the serial threshold even for M = 1
    x = rng.standard_normal((70, k), dtype=np.float32)
    w = make_w(rng, n, k, dtype)
    base = rng.standard_normal((70, n), dtype=np.float32)
    _cpu.set_threads(1)
    alone = np.empty((70, n), np.float32)
    alone_acc = base.copy()
    for r in range(70):
        mm.matmul(x[r:r + 1], w, alone[r:r + 1])
        mm.matmul(x[r:r + 1], w, alone_acc[r:r + 1], accumulate=True)
    configs = [(t, "auto", None) for t in (1, 2)] + [(2, "prefill", 16), (1, "prefill", 512),
                                                   (2, "decode", None)]
    for threads, path, kc in configs:
        _cpu.set_threads(threads)
        set_path(path, kc)
        for m in (1, 3, 4, 5, 8, 9, 15, 16, 17, 70):  # around the tile sizes and the paths
            for start in (0, 70 - m):
                what = f"m={m} start={start} threads={threads} path={path} kc={kc}"
                out = np.empty((m, n), np.float32)
                mm.matmul(x[start:start + m], w, out)
                np.testing.assert_array_equal(out, alone[start:start + m], err_msg=what)
                out = base[start:start + m].copy()
                mm.matmul(x[start:start + m], w, out, accumulate=True)
                np.testing.assert_array_equal(out, alone_acc[start:start + m], err_msg=what)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_matches_converted_fp32(isa):
    """bf16/fp16 weights give exactly the bits of the same weights converted to float32."""
    mm.set_isa(isa)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 300), dtype=np.float32)
    for dtype in ("float16", "bf16"):
        w = make_w(rng, 30, 300, dtype)
        a, b = np.empty((20, 30), np.float32), np.empty((20, 30), np.float32)
        mm.matmul(x, w, a)
        mm.matmul(x, to_float32(w).copy(), b)
        np.testing.assert_array_equal(a, b)


# ---- bad input ----

def test_matmul_bad_inputs():
    x = np.ones((2, 4), np.float32)
    w = np.ones((3, 4), np.float32)
    out = np.empty((2, 3), np.float32)
    with pytest.raises(TypeError, match="x"):
        mm.matmul(x.astype(np.float64), w, out)
    with pytest.raises(TypeError, match="w"):
        mm.matmul(x, w.astype(np.int32), out)
    with pytest.raises(TypeError, match="out"):
        mm.matmul(x, w, out.astype(np.float16))
    with pytest.raises(TypeError):
        mm.matmul(x.tolist(), w, out)
    with pytest.raises(ValueError, match="K"):
        mm.matmul(x, np.ones((3, 5), np.float32), out)
    with pytest.raises(ValueError, match="out must have shape"):
        mm.matmul(x, w, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        mm.matmul(x[0], w, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        mm.matmul(np.ones((4, 2), np.float32).T, w, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        mm.matmul(x, np.ones((4, 3), np.float32).T, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        mm.matmul(x, w, np.empty((2, 6), np.float32)[:, ::2])
    ro = np.empty((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        mm.matmul(x, w, ro)
    sq = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        mm.matmul(sq, np.ones((3, 3), np.float32), sq)


def test_matmul_readonly_memmap(tmp_path):
    """Weights straight from a read-only memory map (as the model loaders provide them)."""
    rng = np.random.default_rng(11)
    w = make_w(rng, 40, 100, "bf16")
    path = tmp_path / "w.bin"
    w.tofile(path)
    wm = np.memmap(path, dtype=np.uint16, mode="r", shape=w.shape)
    x = rng.standard_normal((20, 100), dtype=np.float32)
    got, want = np.empty((20, 40), np.float32), np.empty((20, 40), np.float32)
    mm.matmul(x, wm, got)
    mm.matmul(x, w, want)
    np.testing.assert_array_equal(got, want)
    table_out = np.empty((2, 100), np.float32)
    mm.embedding(wm, np.array([0, 39]), table_out)
    np.testing.assert_array_equal(table_out, to_float32(w[[0, 39]]))


def test_isa_selection():
    with pytest.raises(ValueError):
        mm.set_isa("sse2")
    mm.set_isa("avx2")
    assert mm.get_isa() == "avx2"
    if HAS_AVX512:
        mm.set_isa("avx512")
        assert mm.get_isa() == "avx512"
    else:
        with pytest.raises(ValueError):
            mm.set_isa("avx512")


def test_isa_from_environment():
    code = "from xllm._kernels import matmul; print(matmul.get_isa())"
    import xllm
    root = os.path.dirname(os.path.dirname(os.path.abspath(xllm.__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, XLLM_ISA="avx2", PYTHONPATH=pythonpath)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "avx2", r.stderr
    env["XLLM_ISA"] = "sse9"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "XLLM_ISA" in r.stderr


# ---- embedding ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("d", [1, 7, 16, 203])
def test_embedding(dtype, id_dtype, d):
    rng = np.random.default_rng(d)
    table = make_w(rng, 50, d, dtype)
    table.flags.writeable = False
    ids = rng.integers(0, 50, size=9).astype(id_dtype)
    ids[0], ids[1] = 0, 49
    got = np.empty((9, d), np.float32)
    want = np.empty((9, d), np.float32)
    mm.embedding(table, ids, got)
    reference.embedding(table, ids, want)
    np.testing.assert_array_equal(got, want)


def test_embedding_bad_inputs():
    table = np.ones((10, 4), np.float32)
    out = np.empty((2, 4), np.float32)
    with pytest.raises(IndexError, match="10"):
        mm.embedding(table, np.array([1, 10], np.int64), out)
    with pytest.raises(IndexError, match="-1"):
        mm.embedding(table, np.array([-1, 3], np.int32), out)
    with pytest.raises(TypeError, match="ids"):
        mm.embedding(table, np.array([1.0, 2.0]), out)
    with pytest.raises(ValueError, match="ids"):
        mm.embedding(table, np.array([[1, 2]], np.int64), out)
    with pytest.raises(ValueError, match="out must have shape"):
        mm.embedding(table, np.array([1, 2, 3], np.int64), out)
    with pytest.raises(TypeError, match="table"):
        mm.embedding(table.astype(np.float64), np.array([1, 2], np.int64), out)
    mm.embedding(table, np.array([], np.int64), np.empty((0, 4), np.float32))  # no-op
