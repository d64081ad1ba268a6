"""Tests of the compiled non-matmul kernels (norm, attention, sampling) against the NumPy
reference, and independent checks of the reference itself (transformers, torch, llama2.c's
formula, sampling statistics) so that a wrong reference cannot make the suite pass.

Tolerances (stated per test):
- rmsnorm: 2 ulp-ish, |d| <= 1e-6 * |ref| + 1e-7 (the kernel sums squares in double like the
  reference; results are usually bit-identical);
- rope: 1e-6 absolute on O(1) values (FMA contraction may change the last bit);
- softmax: 2e-6 relative to the row max; silu_mul: 1e-6 * |ref| + 1e-6 (vectorised exp, ~2 ulp);
- attention: 1e-5 absolute on O(1) values (float32 online softmax vs the float64 reference);
- argmax, repetition penalty: exact; sample: the same token whenever u, top_p, min_p are not
  within 1e-9 of a decision boundary.

matmul and embedding are tested in test_kernels_matmul.py.
"""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.model.rope import rope_tables
from xllm._kernels import _cpu
from xllm._kernels import reference as R

K = pytest.importorskip("xllm._kernels.norm")  # compiled modules (AVX2)
from xllm._kernels import attention as A  # noqa: E402
from xllm._kernels import sampling as S  # noqa: E402
from helpers_kernels import ATTENTION_ISAS, restore_threads_and_isa  # noqa: E402

SETTINGS = dict(deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
THREADS = [1, 2]
AWKWARD = [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 100, 257, 1000, 4999, 5000]


_restore_threads = restore_threads_and_isa(A)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------- rmsnorm ----------------

@settings(**SETTINGS)
@given(m=st.integers(1, 5), d=st.sampled_from(AWKWARD), threads=st.sampled_from(THREADS),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), inplace=st.booleans(), seed=st.integers(0, 99))
def test_rmsnorm_matches_reference(m, d, threads, scale, inplace, seed):
    _cpu.set_threads(threads)
    rng = np.random.default_rng(seed)
    x, w = randn(rng, m, d, scale=scale), randn(rng, d)
    want = np.empty_like(x)
    R.rmsnorm(x, w, 1e-5, want)
    got = x.copy() if inplace else np.empty_like(x)
    K.rmsnorm(got if inplace else x, w, 1e-5, got)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_rmsnorm_reference_vs_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    rng = np.random.default_rng(0)
    x, w = randn(rng, 4, 1000, scale=3.0), randn(rng, 1000)
    norm = LlamaRMSNorm(1000, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        want = norm(torch.from_numpy(x)).numpy()
    got = np.empty_like(x)
    R.rmsnorm(x, w, 1e-6, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------- rope ----------------

def inv_freq(hd, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)


@settings(**SETTINGS)
@given(m=st.integers(1, 6), h=st.integers(1, 5), half=st.sampled_from([1, 3, 4, 32, 40, 50, 128]),
       interleaved=st.booleans(), threads=st.sampled_from(THREADS), seed=st.integers(0, 99))
def test_rope_matches_reference(m, h, half, interleaved, threads, seed):
    _cpu.set_threads(threads)
    rng = np.random.default_rng(seed)
    cos, sin = rope_tables(inv_freq(2 * half), 64)
    pos = rng.integers(0, 64, m)
    cache = randn(rng, m + 5, h * 2 * half)  # rotate a row slice of a bigger array, as the model does
    want = cache.copy()
    R.rope(want[2:2 + m], pos, cos, sin, h, interleaved)
    got = cache.copy()
    K.rope(got[2:2 + m], pos, cos, sin, h, interleaved)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:2], cache[:2])
    np.testing.assert_array_equal(got[2 + m:], cache[2 + m:])


def test_rope_reference_rotate_half_vs_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    h, hd, m = 3, 64, 5
    cfg = LlamaConfig(hidden_size=h * hd, num_attention_heads=h, max_position_embeddings=512,
                      rope_theta=10000.0)
    emb = LlamaRotaryEmbedding(cfg)
    rng = np.random.default_rng(1)
    q = randn(rng, m, h * hd)
    pos = np.array([0, 1, 17, 300, 511])
    tq = torch.from_numpy(q).reshape(1, m, h, hd).transpose(1, 2)  # [B, H, M, hd]
    cos_t, sin_t = emb(tq, torch.from_numpy(pos)[None])
    want, _ = apply_rotary_pos_emb(tq, tq, cos_t, sin_t)
    want = want.transpose(1, 2).reshape(m, h * hd).numpy()
    cos, sin = rope_tables(emb.inv_freq.numpy(), 512)
    np.testing.assert_allclose(cos[pos], cos_t[0, :, :hd // 2].numpy(), atol=1e-6)
    got = q.copy()
    R.rope(got, pos, cos, sin, h, interleaved=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    got = q.copy()
    K.rope(got, pos, cos, sin, h, interleaved=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


def llama2c_rope(x, pos, hd, theta=10000.0):
    """Direct transcription of llama2.c's RoPE loop (interleaved pairs), in float32."""
    x = x.copy()
    for row, p in enumerate(pos):
        for i in range(0, x.shape[1], 2):
            head_dim = i % hd
            freq = np.float32(1.0) / np.float32(theta ** (head_dim / hd))
            val = np.float32(p) * freq
            fcr, fci = np.float32(np.cos(val)), np.float32(np.sin(val))
            v0, v1 = x[row, i], x[row, i + 1]
            x[row, i] = v0 * fcr - v1 * fci
            x[row, i + 1] = v0 * fci + v1 * fcr
    return x


def test_rope_reference_interleaved_vs_llama2c():
    rng = np.random.default_rng(2)
    h, hd, m = 2, 16, 4
    x = randn(rng, m, h * hd)
    pos = np.array([0, 3, 50, 99])
    cos, sin = rope_tables(inv_freq(hd), 100)
    want = llama2c_rope(x, pos, hd)
    for impl in (R.rope, K.rope):
        got = x.copy()
        impl(got, pos, cos, sin, h, True)
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "compiled"])
def test_rope_layouts_agree_after_permutation(impl):
    """Meta weights rotated interleaved == the same weights permuted to HF order, rotate_half."""
    rope = R.rope if impl == "reference" else K.rope
    rng = np.random.default_rng(3)
    h, hd, dim, m = 4, 32, 48, 6
    w = randn(rng, h * hd, dim)  # a q/k projection [H*hd, dim] in Meta (interleaved) order
    w_hf = w.reshape(h, hd // 2, 2, dim).transpose(0, 2, 1, 3).reshape(h * hd, dim)
    x = randn(rng, m, dim)
    pos = rng.integers(0, 200, m)
    cos, sin = rope_tables(inv_freq(hd), 200)
    a, b = x @ w.T, x @ w_hf.T
    rope(a, pos, cos, sin, h, True)
    rope(b, pos, cos, sin, h, False)
    # the same permutation maps the rotated Meta output onto the rotated HF output
    a_perm = a.reshape(m, h, hd // 2, 2).transpose(0, 1, 3, 2).reshape(m, h * hd)
    np.testing.assert_allclose(a_perm, b, atol=1e-4)


# ---------------- softmax, silu_mul ----------------

@settings(**SETTINGS)
@given(m=st.integers(1, 4), d=st.sampled_from(AWKWARD), scale=st.sampled_from([0.1, 3.0, 30.0]),
       inplace=st.booleans(), threads=st.sampled_from(THREADS), seed=st.integers(0, 99))
def test_softmax_matches_reference(m, d, scale, inplace, threads, seed):
    _cpu.set_threads(threads)
    rng = np.random.default_rng(seed)
    x = randn(rng, m, d, scale=scale)
    want = np.empty_like(x)
    R.softmax(x, want)
    got = x.copy() if inplace else np.empty_like(x)
    K.softmax(got if inplace else x, got)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(want.max()))
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@settings(**SETTINGS)
@given(shape=st.sampled_from([(1, 1), (1, 7), (3, 17), (2, 5000), (1, 11008), (40000,)]),
       alias=st.sampled_from(["none", "a", "b"]), threads=st.sampled_from(THREADS),
       seed=st.integers(0, 99))
def test_silu_mul_matches_reference(shape, alias, threads, seed):
    _cpu.set_threads(threads)
    rng = np.random.default_rng(seed)
    a, b = randn(rng, *shape, scale=8.0), randn(rng, *shape)
    a.flat[0] = -100.0  # exp overflow side
    want = np.empty_like(a)
    R.silu_mul(a, b, want)
    a2, b2 = a.copy(), b.copy()
    out = {"none": np.empty_like(a), "a": a2, "b": b2}[alias]
    K.silu_mul(a2, b2, out)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


# ---------------- attention ----------------

def attention_case(rng, m, start, h, kv, hd, extra=3):
    cap = start + m + extra
    q = randn(rng, m, h * hd)
    k, v = randn(rng, cap, kv * hd), randn(rng, cap, kv * hd)
    k[start + m:] = np.nan  # rows past the filled part must never be used
    v[start + m:] = np.nan
    return q, R.k_blocks(k), R.v_blocks(v, kv)


@settings(**SETTINGS)
@given(m=st.sampled_from([1, 1, 2, 5, 17]), start=st.sampled_from([0, 1, 63, 64, 65, 200]),
       kv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4, 8, 16]),
       hd=st.sampled_from([2, 8, 20, 64, 80, 100, 128, 256]), threads=st.sampled_from(THREADS),
       kv_dtype=st.sampled_from([np.float32, np.float16]), isa=st.sampled_from(ATTENTION_ISAS),
       seed=st.integers(0, 99))
def test_attention_matches_reference(m, start, kv, group, hd, threads, kv_dtype, isa, seed):
    """float16 caches: the reference reads the same float16 values, so the bar is the same."""
    _cpu.set_threads(threads)
    A.set_isa(isa)
    rng = np.random.default_rng(seed)
    h = kv * group
    q, k, v = attention_case(rng, m, start, h, kv, hd)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    want, got = np.zeros_like(q), np.zeros_like(q)
    R.attention(q, k, v, want, start, h, kv, hd ** -0.5)
    A.attention(q, k, v, got, start, h, kv, hd ** -0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@settings(**SETTINGS)
@given(rows=st.lists(st.integers(0, 4), min_size=1, max_size=6), kv=st.sampled_from([1, 3]),
       group=st.sampled_from([1, 3]), hd=st.sampled_from([8, 20, 64]),
       threads=st.sampled_from(THREADS), kv_dtype=st.sampled_from([np.float32, np.float16]),
       isa=st.sampled_from(ATTENTION_ISAS), seed=st.integers(0, 99))
def test_attention_batch_matches_reference(rows, kv, group, hd, threads, kv_dtype, isa, seed):
    """Several sequences (some with no rows) in one call: the new rows land in each cache exactly
    as numpy stores them (float16: round to nearest even), and each row's output equals the
    reference to 1e-5, and equals ``attention`` on its own sequence bit for bit."""
    _cpu.set_threads(threads)
    A.set_isa(isa)
    rng = np.random.default_rng(seed)
    h, m = kv * group, sum(rows)
    starts = rng.integers(0, 70, len(rows))
    bounds = np.concatenate([[0], np.cumsum(rows)])
    q, kn, vn = randn(rng, m, h * hd), randn(rng, m, kv * hd), randn(rng, m, kv * hd)
    caches = [[R.k_blocks(randn(rng, st_ + n + 2, kv * hd)).astype(kv_dtype),
               R.v_blocks(randn(rng, st_ + n + 2, kv * hd), kv).astype(kv_dtype)]
              for st_, n in zip(starts, rows)]
    mine = [[c.copy() for c in pair] for pair in caches]
    want, got = np.zeros_like(q), np.zeros_like(q)
    R.attention_batch(q, kn, vn, [c[0] for c in caches], [c[1] for c in caches], bounds, starts,
                      want, h, kv, hd ** -0.5)
    A.attention_batch(q, kn, vn, [c[0] for c in mine], [c[1] for c in mine], bounds, starts,
                      got, h, kv, hd ** -0.5)
    for pair, ref in zip(mine, caches):
        np.testing.assert_array_equal(pair[0], ref[0])
        np.testing.assert_array_equal(pair[1], ref[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = np.zeros_like(q[a:b])
        A.attention(q[a:b], mine[s][0], mine[s][1], alone, starts[s], h, kv, hd ** -0.5)
        np.testing.assert_array_equal(got[a:b], alone)


@pytest.mark.skipif(len(ATTENTION_ISAS) < 2, reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m, start, h, kv, hd", [(1, 76, 9, 3, 64), (1, 31, 4, 1, 20),
                                                 (40, 5, 8, 2, 80), (7, 100, 12, 4, 100)])
def test_attention_isa_paths_give_the_same_bits(m, start, h, kv, hd, kv_dtype):
    """Every lane runs the same chain of FMAs on both paths (tiles of 1-4 rows, partial blocks,
    head_dim not a multiple of 16)."""
    q, k, v = attention_case(np.random.default_rng(m + hd), m, start, h, kv, hd)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    got = []
    for isa in ATTENTION_ISAS:
        A.set_isa(isa)
        got.append(np.zeros_like(q))
        A.attention(q, k, v, got[-1], start, h, kv, hd ** -0.5)
    np.testing.assert_array_equal(got[0], got[1])


def test_attention_batch_bad_input():
    q, kn = np.zeros((3, 128), np.float32), np.zeros((3, 64), np.float32)
    kc = [np.zeros((1, 64, 32), np.float32), np.zeros((1, 64, 32), np.float32)]
    vc = [np.zeros((1, 1, 32, 64), np.float32), np.zeros((1, 1, 32, 64), np.float32)]
    args = (2, 1, 1.0)
    with pytest.raises(ValueError, match="bounds"):  # bounds must end at the 3 rows
        A.attention_batch(q, kn, kn, kc, vc, [0, 1, 2], [0, 0], q.copy(), *args)
    with pytest.raises(ValueError, match="capacity"):  # 31 + 2 rows > the 32 of one block
        A.attention_batch(q, kn, kn, kc, vc, [0, 1, 3], [0, 31], q.copy(), *args)
    with pytest.raises(ValueError, match="S caches"):
        A.attention_batch(q, kn, kn, kc, vc[:1], [0, 1, 3], [0, 0], q.copy(), *args)
    with pytest.raises(TypeError):  # one cache of another dtype
        A.attention_batch(q, kn, kn, [kc[0], kc[1].astype(np.float16)], vc, [0, 1, 3], [0, 0],
                          q.copy(), *args)
    with pytest.raises(ValueError, match="k_new"):
        A.attention_batch(q, kn[:2], kn, kc, vc, [0, 1, 3], [0, 0], q.copy(), *args)
    rows = [np.zeros((32, 64), np.float32)] * 2
    with pytest.raises(ValueError, match="k_cache"):  # K given as rows, not blocks
        A.attention_batch(q, kn, kn, rows, vc, [0, 1, 3], [0, 0], q.copy(), *args)
    with pytest.raises(ValueError, match="v_cache"):  # V given as rows
        A.attention_batch(q, kn, kn, kc, rows, [0, 1, 3], [0, 0], q.copy(), *args)
    with pytest.raises(ValueError, match="v_cache"):  # V blocks of another number of heads
        A.attention_batch(q, kn, kn, kc, [v.reshape(1, 2, 32, 32) for v in vc], [0, 1, 3],
                          [0, 0], q.copy(), *args)


def test_attention_out_may_be_q_and_long_context():
    rng = np.random.default_rng(4)
    q, k, v = attention_case(rng, 3, 3000, 8, 2, 64)
    want = np.zeros_like(q)
    R.attention(q, k, v, want, 3000, 8, 2, 0.125)
    A.attention(q, k, v, q, 3000, 8, 2, 0.125)
    np.testing.assert_allclose(q, want, atol=1e-5)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("isa", ATTENTION_ISAS)
def test_attention_batch_tiles_follow_cost_not_results(threads, isa):
    """A server step: decode rows of long sequences beside a prefill chunk of a short prompt.
    Work items follow the cost of the whole call, so the chunk is cut into longer tiles here
    (13 tokens) than alone (4), and the costliest sequences run first; every row still equals
    its sequence's rows computed alone, bit for bit."""
    _cpu.set_threads(threads)
    A.set_isa(isa)
    rng = np.random.default_rng(6)
    h, kv, hd = 9, 3, 64
    rows = [1] * 8 + [40] + [1] * 3
    starts = np.array([2000 + 7 * i for i in range(8)] + [100] + [5, 0, 61])
    bounds = np.concatenate([[0], np.cumsum(rows)])
    m = int(bounds[-1])
    q, kn, vn = randn(rng, m, h * hd), randn(rng, m, kv * hd), randn(rng, m, kv * hd)
    caches = [[R.k_blocks(randn(rng, st_ + n, kv * hd)).astype(np.float16),
               R.v_blocks(randn(rng, st_ + n, kv * hd), kv).astype(np.float16)]
              for st_, n in zip(starts, rows)]
    got = np.zeros_like(q)
    A.attention_batch(q, kn, vn, [c[0] for c in caches], [c[1] for c in caches], bounds,
                      starts, got, h, kv, hd ** -0.5)
    want = np.zeros_like(q)
    R.attention_batch(q, kn, vn, [c[0].copy() for c in caches], [c[1].copy() for c in caches],
                      bounds, starts, want, h, kv, hd ** -0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = np.zeros_like(q[a:b])
        A.attention(q[a:b], caches[s][0], caches[s][1], alone, starts[s], h, kv, hd ** -0.5)
        np.testing.assert_array_equal(got[a:b], alone)


@pytest.mark.parametrize("h, kv, hd", [(4, 2, 16), (16, 2, 64), (4, 4, 100)])  # 1-5 tiles
@pytest.mark.parametrize("threads", THREADS)
def test_attention_chunked_prefill_equals_whole(h, kv, hd, threads):
    """Prefill in chunks (start_pos > 0, M > 1) == prefill at once == token by token, bit for
    bit: each row goes through the same operations whatever rows share its work item."""
    _cpu.set_threads(threads)
    rng = np.random.default_rng(5)
    m = 40
    q, k, v = attention_case(rng, m, 0, h, kv, hd, extra=0)
    whole = np.zeros_like(q)
    A.attention(q, k, v, whole, 0, h, kv, 0.25)
    parts = np.zeros_like(q)
    for lo, hi in [(0, 13), (13, 14), (14, 40)]:
        A.attention(q[lo:hi], k, v, parts[lo:hi], lo, h, kv, 0.25)
    np.testing.assert_array_equal(parts, whole)
    for i in (0, 21, 39):  # one row alone
        one = np.zeros_like(q[:1])
        A.attention(q[i:i + 1], k, v, one, i, h, kv, 0.25)
        np.testing.assert_array_equal(one, whole[i:i + 1])


def test_attention_reference_vs_torch_sdpa():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    m, h, kv, hd = 7, 8, 2, 32
    q, kb, vb = attention_case(rng, m, 0, h, kv, hd, extra=0)
    k, v = R.k_rows(kb)[:m], R.v_rows(vb)[:m]
    tq = torch.from_numpy(q).reshape(m, h, hd).transpose(0, 1)
    tk = torch.from_numpy(k).reshape(m, kv, hd).transpose(0, 1).repeat_interleave(h // kv, 0)
    tv = torch.from_numpy(v).reshape(m, kv, hd).transpose(0, 1).repeat_interleave(h // kv, 0)
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    want = want.transpose(0, 1).reshape(m, h * hd).numpy()
    for impl in (R.attention, A.attention):
        got = np.zeros_like(q)
        impl(q, kb, vb, got, 0, h, kv, hd ** -0.5)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # start_pos > 0: the last rows of a full causal pass
    start = 4
    got = np.zeros_like(q[start:])
    A.attention(q[start:], kb, vb, got, start, h, kv, hd ** -0.5)
    np.testing.assert_allclose(got, want[start:], atol=1e-5)


# ---------------- argmax, repetition penalty ----------------

@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 1000, 32001])
def test_argmax(n):
    rng = np.random.default_rng(n)
    x = randn(rng, n)
    assert S.argmax(x) == R.argmax(x)
    x[n // 3] = x[n - 1] = 50.0  # ties: first index
    assert S.argmax(x) == R.argmax(x) == n // 3
    x[:] = -np.inf
    assert S.argmax(x) == R.argmax(x) == 0
    x[n - 1] = np.nan  # numpy: the first NaN
    assert S.argmax(x) == R.argmax(x) == n - 1


@pytest.mark.parametrize("dtype", ["int32", "int64", "list"])
def test_repetition_penalty(dtype):
    rng = np.random.default_rng(7)
    logits = randn(rng, 1003, scale=5.0)
    ids = [5, 5, 1002, 0, 7, 5, 999, 7]
    ids = ids if dtype == "list" else np.array(ids, dtype=dtype)
    want, got = logits.copy(), logits.copy()
    R.apply_repetition_penalty(want, ids, 1.3)
    S.apply_repetition_penalty(got, ids, 1.3)
    np.testing.assert_array_equal(got, want)
    S.apply_repetition_penalty(got, np.array([], np.int64), 1.3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [[1, 1003], [-1], [2**40]])
def test_repetition_penalty_out_of_range(bad):
    logits = np.zeros(1003, np.float32)
    for impl in (R.apply_repetition_penalty, S.apply_repetition_penalty):
        with pytest.raises(IndexError):
            impl(logits, np.array(bad, np.int64), 1.3)
        assert not logits.any()  # nothing changed


# ---------------- sample ----------------

def stable_reference(logits, t, k, p, mp, u, eps=1e-9):
    """The reference token, or None if u, top_p or min_p lie within eps of a decision boundary."""
    want = R.sample(logits, t, k, p, mp, u)
    for args in [(t, k, p, mp, max(u - eps, 0.0)), (t, k, p, mp, u + eps),
                 (t, k, p - eps, mp, u), (t, k, p + eps, mp, u),
                 (t, k, p, mp * (1 - eps), u), (t, k, p, mp * (1 + eps), u)]:
        if R.sample(logits, *args) != want:
            return None
    return want


@settings(deadline=None, max_examples=150)
@given(v=st.sampled_from([1, 2, 5, 100, 3000, 40000]), scale=st.sampled_from([0.0, 0.5, 3.0, 30.0]),
       t=st.sampled_from([0.0, 0.3, 1.0, 2.5]), k=st.sampled_from([0, 1, 2, 10, 100, 50000]),
       p=st.sampled_from([1.0, 0.95, 0.5, 0.1, 0.0]), mp=st.sampled_from([0.0, 0.01, 0.2, 1.5]),
       u=st.floats(0.0, 1.0, exclude_max=True), ties=st.booleans(), seed=st.integers(0, 999))
def test_sample_matches_reference(v, scale, t, k, p, mp, u, ties, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, v, scale=scale)
    if ties:  # many exact ties (and -0.0 vs 0.0), plus masked tokens
        logits = np.round(logits)
        logits[rng.random(v) < 0.2] = -0.0
        logits[rng.random(v) < 0.1] = -np.inf
        logits[0] = 1.0
    before = logits.copy()
    want = stable_reference(logits, t, k, p, mp, u)
    got = S.sample(logits, t, k, p, mp, u)
    np.testing.assert_array_equal(logits, before)  # not modified
    if want is not None:
        assert got == want


@pytest.mark.parametrize("case", ["dense", "all_equal", "cold_top_k", "masked", "hot"])
def test_sample_many_u(case):
    """Many u per logit vector, hitting big buckets, partial sorts and the overflow bucket."""
    rng = np.random.default_rng(11)
    v = 3000
    logits, params = randn(rng, v, scale=0.3), [(1.0, 0, 1.0, 0.0), (1.0, 0, 0.7, 0.0),
                                                  (1.0, 700, 0.95, 0.0), (1.0, 0, 1.0, 0.97)]
    if case == "all_equal":
        logits[:] = 1.5
    elif case == "cold_top_k":  # nearly everything lands far below the top
        params = [(0.001, 50, 1.0, 0.0), (0.01, 2000, 0.999, 0.0), (0.003, 0, 1.0, 0.0)]
    elif case == "masked":
        logits[rng.random(v) < 0.9] = -np.inf
    elif case == "hot":
        params = [(1e4, 0, 1.0, 0.0), (1e4, 100, 0.5, 0.0), (50.0, 0, 0.3, 0.5)]
    for t, k, p, mp in params:
        for u in rng.random(60):
            want = stable_reference(logits, t, k, p, mp, float(u))
            if want is not None:
                assert S.sample(logits, t, k, p, mp, float(u)) == want, (t, k, p, mp, u)
    if case == "all_equal":  # ties by lower id: rank floor(u * V)
        assert S.sample(logits, 1.0, 0, 1.0, 0.0, 0.5001) == 1500


def expected_distribution(logits, t, k, p, mp):
    """The filtered distribution, computed from the docstring's definition with a plain sort."""
    z = logits.astype(np.float64) / t
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    if k > 0:
        order = order[:k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    if p < 1.0:
        n, mass = 0, 0.0
        while n < len(order) and (n == 0 or mass < p):
            mass += probs[n]
            n += 1
        order, probs = order[:n], probs[:n] / probs[:n].sum()
    if mp > 0:
        n = max(1, sum(probs >= mp * probs[0]))
        order, probs = order[:n], probs[:n] / probs[:n].sum()
    out = np.zeros(len(z))
    out[order] = probs
    return out


@pytest.mark.parametrize("impl", ["reference", "compiled"])
@pytest.mark.parametrize("t,k,p,mp", [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0),
                                      (1.3, 6, 0.9, 0.1), (1.0, 0, 1.0, 0.15)])
def test_sample_frequencies(impl, t, k, p, mp):
    fn = R.sample if impl == "reference" else S.sample
    logits = np.array([2.0, 1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -3.0, 0.7, 1.0], np.float32)
    want = expected_distribution(logits, t, k, p, mp)
    n = 20000
    us = (np.arange(n) + np.random.default_rng(8).random(n)) / n  # stratified uniforms
    counts = np.bincount([fn(logits, t, k, p, mp, float(u)) for u in us], minlength=logits.size)
    np.testing.assert_allclose(counts / n, want, atol=2e-3)


def test_sample_special_cases():
    rng = np.random.default_rng(9)
    logits = randn(rng, 5000, scale=2.0)
    logits[17] = logits[4000] = logits.max() + 1  # tie at the top: lower id wins
    for u in (0.0, 0.5, 0.999):
        assert S.sample(logits, 1.0, 1, 1.0, 0.0, u) == R.argmax(logits) == 17
        assert S.sample(logits, 0.0, 0, 0.9, 0.0, u) == 17
        assert S.sample(logits, 1.0, 0, 0.0, 0.0, u) == 17   # top_p = 0 keeps the top token
        assert S.sample(logits, 1.0, 0, 1.0, 1.5, u) == 17   # min_p > 1 keeps the top token
        assert R.sample(logits, 1.0, 0, 1.0, 1.5, u) == 17
    assert S.sample(np.array([3.0], np.float32), 1.0, 0, 0.5, 0.1, 0.9) == 0
    # u = 1 (out of contract) and u = NaN return the last candidate instead of crashing
    assert S.sample(logits, 1.0, 3, 1.0, 0.0, 1.0) == R.sample(logits, 1.0, 3, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_sample_rejects_non_finite(value):
    logits = np.zeros(10, np.float32)
    logits[3] = value
    for fn in (R.sample, S.sample):
        with pytest.raises(ValueError):
            fn(logits, 1.0, 0, 1.0, 0.0, 0.5)
        with pytest.raises(ValueError):
            fn(np.full(4, -np.inf, np.float32), 1.0, 0, 1.0, 0.0, 0.5)
        with pytest.raises(ValueError):
            fn(np.zeros(4, np.float32), float("nan"), 0, 1.0, 0.0, 0.5)


# ---------------- bad inputs ----------------

def test_bad_inputs_raise():
    f = np.zeros((2, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(TypeError):
        K.rmsnorm(f.astype(np.float64), w, 1e-5, f)
    with pytest.raises(TypeError):
        K.rmsnorm([[1.0] * 8], w, 1e-5, f)
    with pytest.raises(ValueError):
        K.rmsnorm(np.zeros((8, 2), np.float32).T, w, 1e-5, f)  # not C-contiguous
    with pytest.raises(ValueError):
        K.rmsnorm(f, np.ones(7, np.float32), 1e-5, f)
    with pytest.raises(ValueError):
        K.rmsnorm(f, w, 1e-5, np.zeros((3, 8), np.float32))
    ro = f.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        K.softmax(f, ro)
    big = np.zeros(24, np.float32)
    with pytest.raises(ValueError):  # partial overlap
        K.silu_mul(big[:16], big[:16], big[8:])
    cos, sin = rope_tables(inv_freq(4), 10)
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(IndexError):
        K.rope(x, np.array([0, 10]), cos, sin, 2, True)
    with pytest.raises(IndexError):
        K.rope(x, np.array([-1, 0]), cos, sin, 2, True)
    with pytest.raises(IndexError):
        R.rope(x, np.array([-1, 0]), cos, sin, 2, True)
    with pytest.raises(ValueError):
        K.rope(x, np.array([0, 1]), cos, sin, 3, True)
    with pytest.raises(ValueError):
        K.rope(x, np.array([0]), cos, sin, 2, True)
    with pytest.raises(TypeError):
        K.rope(x, np.array([0.0, 1.0]), cos, sin, 2, True)
    q = np.zeros((1, 4 * 64), np.float32)
    rows = np.zeros((10, 2 * 64), np.float32)
    kc, vc = R.k_blocks(rows), R.v_blocks(rows, 2)
    with pytest.raises(ValueError):  # n_heads not a multiple of n_kv_heads
        A.attention(q, kc, vc, q.copy(), 0, 4, 3, 1.0)
    with pytest.raises(ValueError):  # past the cache (one block of 32 rows)
        A.attention(q, kc, vc, q.copy(), 32, 4, 2, 1.0)
    with pytest.raises(ValueError):
        A.attention(q, kc, vc, q.copy(), -1, 4, 2, 1.0)
    with pytest.raises(ValueError):  # head_dim 512 > 256
        A.attention(np.zeros((1, 512), np.float32), np.zeros((1, 512, 32), np.float32),
                    np.zeros((4, 512), np.float32), np.zeros((1, 512), np.float32), 0, 1, 1, 1.0)
    with pytest.raises(ValueError):  # cache width mismatch
        A.attention(q, np.ascontiguousarray(kc[:, :100]), vc, q.copy(), 0, 4, 2, 1.0)
    with pytest.raises(ValueError, match="overlaps"):  # out overlaps the cache
        A.attention(q[:, :128].copy(), kc, vc, vc.reshape(-1, 128)[:1], 0, 2, 2, 1.0)
    with pytest.raises(ValueError):
        S.argmax(np.zeros(0, np.float32))
    with pytest.raises(TypeError):
        S.sample(np.zeros(5, np.float64), 1.0, 0, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError):
        S.sample(np.zeros((2, 5), np.float32), 1.0, 0, 1.0, 0.0, 0.5)
    with pytest.raises(TypeError):
        S.apply_repetition_penalty(np.zeros(5, np.float32), np.array([1.0]), 1.2)


# ---------------- timings (printed with -s; no assertions) ----------------

def test_print_timings():
    rng = np.random.default_rng(10)

    def best_us(fn, n=20):
        fn()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n)
        return best * 1e6

    h, kv, hd, t = 32, 4, 64, 2048
    q, k = randn(rng, 1, h * hd), R.k_blocks(randn(rng, t, kv * hd))
    v = R.v_blocks(randn(rng, t, kv * hd), kv)
    out = np.empty_like(q)
    for threads in THREADS:
        _cpu.set_threads(threads)
        us = best_us(lambda: A.attention(q, k, v, out, t - 1, h, kv, hd ** -0.5))
        print(f"\nattention decode H=32 KV=4 hd=64 T=2048 threads={threads}: {us:.0f} us")
    logits = randn(rng, 32000, scale=3.0)
    us = best_us(lambda: S.sample(logits, 1.0, 0, 0.9, 0.0, 0.5))
    print(f"sample V=32000 top_p=0.9: {us:.0f} us")
