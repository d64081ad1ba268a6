"""Tests of the AMX tile kernels of the quantized matrix multiply (xllm/_kernels/gemm_amx.h).

* The scalar model of the tile operations ("amx-emulated") does what Intel documents: the int8
  dot products (signed and unsigned operands, 32-bit wraparound) against NumPy, and tdpbf16ps as
  gemm_amx.h states its model (float32 fused multiply-adds in a fixed order, denormals as zero).
* qmatmul on the tile kernels equals the AVX-512 VNNI path and the NumPy reference
  (reference.qmatmul) BIT FOR BIT for every format and codec, 1, 2 and 3 activation parts, M from 2
  to 600, awkward N and K, 1 and 2 threads: the emulated tiles everywhere (and a counter proves
  the tile path ran, not the vector path it falls back to), the real AMX unit where the CPU has
  it (skipped otherwise, saying why).
* Dispatch: "amx" is the default only where features()["amx"] (CPUID and the Linux XTILEDATA
  permission); XLLM_ISA=amx is refused with the reason elsewhere; XLLM_ISA=amx-emulated and
  XLLM_ISA=avx512 select what they name; the emulation is never a default.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm._kernels import _cpu
from xllm._kernels import reference as R
from xllm.formats import qtensor as quant

gguf = pytest.importorskip("gguf")
Q = pytest.importorskip("xllm._kernels.qmatmul")

from helpers_kernels import restore_threads_and_isa  # noqa: E402
from test_kernels_kquant import CODECS, packed  # noqa: E402
from test_kernels_quant import FORMATS, weights  # noqa: E402

HAS_VNNI = _cpu.features()["avx512vnni"]
HAS_AMX = _cpu.features()["amx"]
NO_AMX = (f"this CPU has no AMX (amx_tile/amx_int8) or the kernel refused XTILEDATA "
          f"({_cpu.amx_status()})")
SETTINGS = dict(deadline=None, max_examples=10,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
TILE_ISAS = [pytest.param("amx-emulated",
                          marks=pytest.mark.skipif(not HAS_VNNI, reason="needs AVX-512 VNNI")),
             pytest.param("amx", marks=pytest.mark.skipif(not HAS_AMX, reason=NO_AMX))]
# M: small batches, one 16-row tile and its edges, and the row chunks of qmatmul (128 rows)
ROWS = st.one_of(st.integers(2, 40), st.sampled_from([127, 128, 129, 257, 600]))

_restore = restore_threads_and_isa(Q)


# ---- the model of the tile operations


def _int8_dot(a, b, c, signed_a, signed_b):
    """C [M, N] int32 += A [M, 4K] bytes . B [K, 4N] bytes, as Intel documents tdpb*d."""
    m, k, n = a.shape[0], b.shape[0], c.shape[1]
    av = a.view(np.int8) if signed_a else a
    bv = b.view(np.int8) if signed_b else b
    av = av.astype(np.int64).reshape(m, k, 4)
    bv = bv.astype(np.int64).reshape(k, n, 4)
    s = c.astype(np.int64) + np.einsum("mki,kni->mn", av, bv)
    return ((s + 2**31) % 2**32 - 2**31).astype(np.int32)  # 32-bit wraparound


@pytest.mark.skipif(not HAS_VNNI, reason="the tile kernels need AVX-512 VNNI")
@pytest.mark.parametrize("op,sa,sb", [("dpbssd", 1, 1), ("dpbsud", 1, 0), ("dpbusd", 0, 1),
                                      ("dpbuud", 0, 0)])
@settings(**dict(SETTINGS, max_examples=25))
@given(m=st.integers(1, 16), k=st.integers(1, 16), n=st.integers(1, 16), big=st.booleans(),
       seed=st.integers(0, 999))
def test_emulated_int8_tile_dots(op, sa, sb, m, k, n, big, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, 4 * k), dtype=np.uint8)
    b = rng.integers(0, 256, (k, 4 * n), dtype=np.uint8)
    lim = 2**31 - 1 if big else 1000  # big: the sums wrap around
    c = rng.integers(-lim, lim, (m, n), dtype=np.int32)
    want = _int8_dot(a, b, c, sa, sb)
    got = c.copy()
    Q._emulated_tile_dot(op, a, b, got.view(np.uint8))
    np.testing.assert_array_equal(got, want)


def _bf16(x):
    """float32 -> bfloat16 bits, rounded to nearest even (x finite)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7fff + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_dot(a, b, c):
    """The model gemm_amx.h states for tdpbf16ps: per C element, pairs kk in order, element 0 then
    1 of the pair, float32 products (exact) added one by one with rounding, denormals as zero."""
    def f32(bits):
        v = (bits.astype(np.uint32) << 16).view(np.float32)
        return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0) * v, v)
    m, k, n = a.shape[0], b.shape[0], c.shape[1]
    av = f32(a).reshape(m, k, 2)
    bv = f32(b).reshape(k, n, 2)
    out = c.copy()
    for i in range(m):
        for j in range(n):
            s = out[i, j]
            for kk in range(k):
                for e in range(2):
                    s = np.float32(s + av[i, kk, e] * bv[kk, j, e])
            out[i, j] = s
    return out


@pytest.mark.skipif(not HAS_VNNI, reason="the tile kernels need AVX-512 VNNI")
@settings(**dict(SETTINGS, max_examples=15))
@given(m=st.integers(1, 6), k=st.integers(1, 8), n=st.integers(1, 6), denormal=st.booleans(),
       seed=st.integers(0, 999))
def test_emulated_bf16_tile_dot(m, k, n, denormal, seed):
    rng = np.random.default_rng(seed)
    a = _bf16(rng.standard_normal((m, 2 * k)) * 3)
    b = _bf16(rng.standard_normal((k, 2 * n)))
    if denormal:  # a denormal input is read as 0 (DAZ): its products vanish
        a[0, 0] = 0x0001
        b[0, 0] = 0x8003
    c = rng.standard_normal((m, n)).astype(np.float32)
    got = c.copy()
    Q._emulated_tile_dot("dpbf16ps", a.view(np.uint8).reshape(m, 4 * k),
                         b.view(np.uint8).reshape(k, 4 * n), got.view(np.uint8))
    np.testing.assert_array_equal(got, _bf16_dot(a, b, c))


def test_emulated_tile_dot_rejects_bad_shapes():
    a = np.zeros((2, 8), np.uint8)
    with pytest.raises(ValueError, match="op"):
        Q._emulated_tile_dot("dpbxxd", a, np.zeros((2, 4), np.uint8), np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="tile shapes"):
        Q._emulated_tile_dot("dpbssd", a, np.zeros((3, 4), np.uint8), np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="tile shapes"):
        Q._emulated_tile_dot("dpbssd", np.zeros((17, 8), np.uint8), np.zeros((2, 4), np.uint8),
                             np.zeros((17, 4), np.uint8))


# ---- the quantized matrix multiply on tiles: the VNNI path's bits


def _check_same_bits(x, w, n, isa, threads, accumulate, rng):
    out0 = rng.standard_normal((x.shape[0], n)).astype(np.float32)
    _cpu.set_threads(threads)
    Q.set_isa("avx512vnni")
    vnni = out0.copy()
    Q.qmatmul(x, w, vnni, accumulate=accumulate)
    Q.set_isa(isa)
    ran = Q._emulated_panels()
    got = out0.copy()
    Q.qmatmul(x, w, got, accumulate=accumulate)
    if isa == "amx-emulated":
        assert Q._emulated_panels() > ran  # the tile kernels ran
    np.testing.assert_array_equal(got, vnni)
    want = out0.copy()
    R.qmatmul(x, w, want, accumulate=accumulate)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", TILE_ISAS)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS)
@settings(**SETTINGS)
@given(m=ROWS, n=st.integers(1, 50), nb=st.sampled_from([1, 2, 5, 12]),
       threads=st.sampled_from([1, 2]), accumulate=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 999))
def test_tile_qmatmul_equals_vnni_and_reference(m, n, nb, fmt, parts, isa, threads, accumulate,
                                                scale, seed):
    bits, group, asym, sdt = fmt
    k = 32 * nb if (32 * nb) % group == 0 else group * nb
    rng = np.random.default_rng(seed)
    w = quant.quantize(weights(rng, n, k, seed % 4 == 0), bits, group, asym, sdt, parts)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    if seed % 5 == 0:
        x[:, :32] = 0  # an all-zero block of x
    _check_same_bits(x, w, n, isa, threads, accumulate, rng)


@pytest.mark.parametrize("isa", TILE_ISAS)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("name", CODECS)
@settings(**SETTINGS)
@given(m=ROWS, n=st.integers(1, 50), nsb=st.sampled_from([1, 2]),
       threads=st.sampled_from([1, 2]), accumulate=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 999))
def test_tile_codecs_equal_vnni_and_reference(m, n, nsb, name, parts, isa, threads, accumulate,
                                              scale, seed):
    rng = np.random.default_rng(seed)
    k = 256 * nsb if name.endswith("_K") else 32 * (8 * nsb - seed % 7)
    w, _ = packed(rng, name, n, k, parts, zero_scale=seed % 4 == 0)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    if seed % 5 == 0:
        x[:, :32] = 0
    _check_same_bits(x, w, n, isa, threads, accumulate, rng)


@pytest.mark.parametrize("isa", TILE_ISAS)
def test_tile_batch_invariance_and_shared_x(isa):
    """A row gets the same bits in any batch on the tile path (one row runs on the VNNI path),
    extreme blocks included; several weights sharing x equal separate calls."""
    rng = np.random.default_rng(7)
    K, N = 1024, 45
    x = rng.standard_normal((37, K)).astype(np.float32)
    x[0, :32] = rng.standard_normal(32) * 1e-42  # subnormal block scale
    x[1, 32:64] = rng.standard_normal(32) * 1e30
    ws = [quant.quantize(weights(rng, N, K), 8, 64, parts=3),
          quant.quantize(weights(rng, N + 3, K), 4, 32, True, parts=3),
          packed(rng, "Q6_K", N, K, parts=3)[0]]
    Q.set_isa(isa)
    for w in ws:
        n = w.shape[0]
        full = np.empty((37, n), np.float32)
        Q.qmatmul(x, w, full)
        want = np.empty((37, n), np.float32)
        R.qmatmul(x, w, want)
        np.testing.assert_array_equal(full, want)
        for t in (1, 2):
            _cpu.set_threads(t)
            for m0, m1 in [(0, 1), (3, 5), (5, 21), (2, 37)]:
                part = np.empty((m1 - m0, n), np.float32)
                Q.qmatmul(np.ascontiguousarray(x[m0:m1]), w, part)
                np.testing.assert_array_equal(part, full[m0:m1])
    outs = tuple(np.empty((37, w.shape[0]), np.float32) for w in ws)
    Q.qmatmul(x, tuple(ws), outs)
    for w, o in zip(ws, outs):
        alone = np.empty_like(o)
        Q.qmatmul(x, w, alone)
        np.testing.assert_array_equal(o, alone)


@pytest.mark.skipif(not HAS_VNNI, reason="the tile kernels need AVX-512 VNNI")
def test_model_logits_same_bits_on_the_tile_path(smollm2_gguf):
    """The default model (Q4_1, several weights sharing x) gives the same logits, bit for bit,
    with its prompt's products on the emulated tiles as on the VNNI path."""
    import xllm
    model = xllm.load(smollm2_gguf)
    ids = list(range(100, 124))
    Q.set_isa("avx512vnni")
    want = np.array(model.logits(ids), copy=True)
    Q.set_isa("amx-emulated")
    ran = Q._emulated_panels()
    got = np.array(model.logits(ids), copy=True)
    assert Q._emulated_panels() > ran
    np.testing.assert_array_equal(got, want)


# ---- bfloat16 weights on tdpbf16ps (matmul; gemm_amx_bf16.h): within a bound, not bits


MM = pytest.importorskip("xllm._kernels.matmul")
_restore_matmul = restore_threads_and_isa(MM)


def _bf16_weights(rng, n, k):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # cut: any bfloat16 will do
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _tile_bf16_bound(x, W, k):
    """The error bound of the tile path: x split into two bfloat16 parts (|v - h1 - h2| <=
    2^-16 |v|), then 2 Kp exact products summed in float32 (Kp: K rounded up to 32), each sum
    rounded (2^-24 relative, first order): (2^-16 + 2 Kp 2^-24) (|x| @ |W|.T)."""
    kp = -(-k // 32) * 32
    return (2.0**-16 + 2 * kp * 2.0**-24) * (np.abs(x).astype(np.float64) @ np.abs(W).T)


@pytest.mark.parametrize("isa", TILE_ISAS)
@settings(**dict(SETTINGS, max_examples=40))
@given(m=st.one_of(st.integers(1, 40), st.sampled_from([127, 128, 129, 300])),
       n=st.integers(1, 50), k=st.integers(0, 300), threads=st.sampled_from([1, 2]),
       accumulate=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 999))
def test_tile_bf16_matmul_within_bound(isa, m, n, k, threads, accumulate, scale, seed):
    rng = np.random.default_rng(seed)
    w, W = _bf16_weights(rng, n, k)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    out0 = rng.standard_normal((m, n)).astype(np.float32)
    _cpu.set_threads(threads)
    MM.set_isa(isa)
    ran = MM._emulated_tile_items()
    got = out0.copy()
    MM.matmul(x, w, got, accumulate=accumulate)
    if isa == "amx-emulated" and k:
        assert MM._emulated_tile_items() > ran  # the tile kernel ran, for every M
    exact = x.astype(np.float64) @ W.T
    sums = got.astype(np.float64) - (out0 if accumulate else 0)
    # (accumulating adds one rounding of out + C: half an ulp of the result)
    slack = np.abs(got) * 2.0**-24 if accumulate else 0
    assert np.all(np.abs(sums - exact) <= _tile_bf16_bound(x, W, k) + slack + 1e-30)


@pytest.mark.parametrize("isa", TILE_ISAS)
def test_tile_bf16_batch_invariance_and_special_values(isa):
    """A row's bits on the tile path do not depend on its batch (one row included: the tile path
    serves every M) or the thread count; infinities and NaN propagate as in float arithmetic."""
    rng = np.random.default_rng(11)
    K, N = 200, 37
    w, W = _bf16_weights(rng, N, K)
    x = rng.standard_normal((150, K)).astype(np.float32)
    x[3, 5] = np.inf
    x[4, 7] = np.nan
    MM.set_isa(isa)
    full = np.empty((150, N), np.float32)
    MM.matmul(x, w, full)
    exact = x.astype(np.float64) @ W.T
    np.testing.assert_array_equal(np.isnan(full), np.isnan(exact))
    np.testing.assert_array_equal(np.isinf(full), np.isinf(exact))
    for t in (1, 2):
        _cpu.set_threads(t)
        for m0, m1 in [(0, 1), (3, 5), (5, 21), (20, 150), (149, 150)]:
            part = np.empty((m1 - m0, N), np.float32)
            MM.matmul(np.ascontiguousarray(x[m0:m1]), w, part)
            np.testing.assert_array_equal(part, full[m0:m1])


@pytest.mark.skipif(not HAS_VNNI, reason="the tile kernels need AVX-512 VNNI")
def test_tile_paths_leave_float_weights_on_the_vector_path():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((20, 96)).astype(np.float32)
    w = rng.standard_normal((30, 96)).astype(np.float32)
    for wt in (w, w.astype(np.float16)):
        MM.set_isa("avx512")
        want = np.empty((20, 30), np.float32)
        MM.matmul(x, wt, want)
        MM.set_isa("amx-emulated")
        got = np.empty((20, 30), np.float32)
        MM.matmul(x, wt, got)
        np.testing.assert_array_equal(got, want)


# ---- dispatch


def _isa_in_subprocess(value, code="from xllm._kernels import qmatmul; print(qmatmul.get_isa())"):
    import xllm
    root = os.path.dirname(os.path.dirname(os.path.abspath(xllm.__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath)
    env.pop("XLLM_ISA", None)
    if value is not None:
        env["XLLM_ISA"] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_default_path_is_amx_only_where_the_cpu_has_it():
    r = _isa_in_subprocess(None)
    assert r.returncode == 0, r.stderr
    want = "amx" if HAS_AMX else "avx512vnni" if HAS_VNNI else "avx2"
    assert r.stdout.strip() == want  # never "amx-emulated", never "amx" without AMX
    assert _cpu.features()["amx"] == (_cpu.amx_status() == "")


@pytest.mark.skipif(HAS_AMX, reason="this CPU has AMX: XLLM_ISA=amx is accepted")
def test_xllm_isa_amx_is_refused_without_amx():
    r = _isa_in_subprocess("amx")
    assert r.returncode != 0
    assert "XLLM_ISA='amx'" in r.stderr and "AMX" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="AMX"):
        Q.set_isa("amx")


@pytest.mark.skipif(not HAS_VNNI, reason="the tile kernels need AVX-512 VNNI")
def test_xllm_isa_names_the_path():
    code = ("from xllm._kernels import matmul, qmatmul; "
            "print(qmatmul.get_isa(), matmul.get_isa())")
    r = _isa_in_subprocess("amx-emulated", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["amx-emulated", "amx-emulated"]
    attention = "from xllm._kernels import attention; print(attention.get_isa())"
    r = _isa_in_subprocess("amx-emulated", attention)
    assert r.stdout.split() == ["avx512"], r.stderr  # no tile path: its best vector path
    r = _isa_in_subprocess("avx512", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["avx512vnni", "avx512"]
    r = _isa_in_subprocess("avx2", code)
    assert r.stdout.split() == ["avx2", "avx2"], r.stderr
