"""Sliding-window attention (Mistral): the compiled kernel against the NumPy reference, with the
keys and values before every row's window poisoned (NaN) in the kernel's copy, so that a kernel
that read them could not pass; batch invariance and the two ISA paths bit for bit.

Tolerance: 1e-5 absolute on O(1) values, as for full attention (tests/test_kernels.py). The
reference's window itself is checked end to end against transformers' Mistral in
tests/test_architectures.py."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm._kernels import _cpu
from xllm._kernels import reference as R
from xllm._kernels.layout import KV_BLOCK

A = pytest.importorskip("xllm._kernels.attention")
from helpers_kernels import ATTENTION_ISAS, restore_threads_and_isa  # noqa: E402

SETTINGS = dict(deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
THREADS = [1, 2]


_restore_threads = restore_threads_and_isa(A)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def windowed_case(rng, m, start, h, kv, hd, window, kv_dtype):
    """q and caches (clean for the reference, poisoned for the kernel): every key and value
    before the first row's window (position start + 1 - window) and past the last row is NaN
    in the kernel's copy."""
    cap = start + m + 3
    q = randn(rng, m, h * hd)
    k = randn(rng, cap, kv * hd)
    v = randn(rng, cap, kv * hd)
    clean = (R.k_blocks(k).astype(kv_dtype), R.v_blocks(v, kv).astype(kv_dtype))
    first = max(0, start + 1 - window)
    k[:first] = np.nan
    v[:first] = np.nan
    k[start + m:] = np.nan
    v[start + m:] = np.nan
    poisoned = (R.k_blocks(k).astype(kv_dtype), R.v_blocks(v, kv).astype(kv_dtype))
    return q, clean, poisoned


@settings(**SETTINGS)
@given(m=st.sampled_from([1, 1, 2, 5, 17, 40]), start=st.sampled_from([0, 1, 31, 32, 33, 95, 200]),
       window=st.sampled_from([1, 2, 7, 31, 32, 33, 64, 100, 1000]),
       kv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4, 8]),
       hd=st.sampled_from([2, 8, 20, 64, 80, 128]), threads=st.sampled_from(THREADS),
       kv_dtype=st.sampled_from([np.float32, np.float16]), isa=st.sampled_from(ATTENTION_ISAS),
       seed=st.integers(0, 99))
def test_window_matches_reference(m, start, window, kv, group, hd, threads, kv_dtype, isa, seed):
    _cpu.set_threads(threads)
    A.set_isa(isa)
    rng = np.random.default_rng(seed)
    h = kv * group
    q, clean, poisoned = windowed_case(rng, m, start, h, kv, hd, window, kv_dtype)
    want = np.zeros_like(q)
    got = np.zeros_like(q)
    R.attention(q, *clean, want, start, h, kv, hd ** -0.5, window)
    A.attention(q, *poisoned, got, start, h, kv, hd ** -0.5, window)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_reference_window_limits_the_keys():
    """The reference's window, checked against the plain attention of the window's keys alone:
    a row at position p with window w equals full attention over keys p-w+1 .. p."""
    rng = np.random.default_rng(0)
    hd, window, start = 16, 5, 40
    k = randn(rng, start + 1, hd)
    v = randn(rng, start + 1, hd)
    q = randn(rng, 1, hd)
    want = np.zeros_like(q)
    got = np.zeros_like(q)
    R.attention(q, R.k_blocks(k[-window:]), R.v_blocks(v[-window:], 1), want, window - 1, 1, 1,
                0.25)
    R.attention(q, R.k_blocks(k), R.v_blocks(v, 1), got, start, 1, 1, 0.25, window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    full = np.zeros_like(q)
    R.attention(q, R.k_blocks(k), R.v_blocks(v, 1), full, start, 1, 1, 0.25)
    assert np.abs(full - got).max() > 1e-3  # the window changes the result


@settings(**SETTINGS)
@given(rows=st.lists(st.integers(0, 40), min_size=1, max_size=5), window=st.sampled_from(
       [1, 16, 32, 33, 70]), kv=st.sampled_from([1, 3]), group=st.sampled_from([1, 3]),
       hd=st.sampled_from([8, 64]), threads=st.sampled_from(THREADS),
       kv_dtype=st.sampled_from([np.float32, np.float16]), isa=st.sampled_from(ATTENTION_ISAS),
       seed=st.integers(0, 99))
def test_window_batch_is_invariant(rows, window, kv, group, hd, threads, kv_dtype, isa, seed):
    """Several sequences in one call with a window: each row's output equals the reference to
    1e-5 and ``attention`` on its own sequence bit for bit (rows of one sequence in the same
    tile have different windows)."""
    _cpu.set_threads(threads)
    A.set_isa(isa)
    rng = np.random.default_rng(seed)
    h = kv * group
    m = sum(rows)
    starts = rng.integers(0, 120, len(rows))
    bounds = np.concatenate([[0], np.cumsum(rows)])
    q = randn(rng, m, h * hd)
    kn = randn(rng, m, kv * hd)
    vn = randn(rng, m, kv * hd)
    caches = [[R.k_blocks(randn(rng, s + n + 2, kv * hd)).astype(kv_dtype),
               R.v_blocks(randn(rng, s + n + 2, kv * hd), kv).astype(kv_dtype)]
              for s, n in zip(starts, rows)]
    mine = [[c.copy() for c in pair] for pair in caches]
    want = np.zeros_like(q)
    got = np.zeros_like(q)
    R.attention_batch(q, kn, vn, [c[0] for c in caches], [c[1] for c in caches], bounds, starts,
                      want, h, kv, hd ** -0.5, window)
    A.attention_batch(q, kn, vn, [c[0] for c in mine], [c[1] for c in mine], bounds, starts,
                      got, h, kv, hd ** -0.5, window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = np.zeros_like(q[a:b])
        A.attention(q[a:b], mine[s][0], mine[s][1], alone, starts[s], h, kv, hd ** -0.5, window)
        np.testing.assert_array_equal(got[a:b], alone)


@pytest.mark.skipif(len(ATTENTION_ISAS) < 2, reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m, start, h, kv, hd, window", [(1, 76, 9, 3, 64, 32),
                                                         (40, 5, 8, 2, 80, 7),
                                                         (30, 100, 12, 4, 100, 33)])
def test_window_isa_paths_give_the_same_bits(m, start, h, kv, hd, window, kv_dtype):
    rng = np.random.default_rng(m + hd)
    q, _, poisoned = windowed_case(rng, m, start, h, kv, hd, window, kv_dtype)
    got = []
    for isa in ATTENTION_ISAS:
        A.set_isa(isa)
        got.append(np.zeros_like(q))
        A.attention(q, *poisoned, got[-1], start, h, kv, hd ** -0.5, window)
    np.testing.assert_array_equal(got[0], got[1])


@pytest.mark.parametrize("module", [A, R], ids=["compiled", "reference"])
def test_negative_window_is_refused(module):
    q = np.zeros((1, 8), np.float32)
    k = np.zeros((1, 8, KV_BLOCK), np.float32)
    v = np.zeros((1, 1, KV_BLOCK, 8), np.float32)
    with pytest.raises(ValueError, match="window"):
        module.attention(q, k, v, q.copy(), 0, 1, 1, 1.0, -1)
