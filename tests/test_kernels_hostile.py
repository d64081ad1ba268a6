"""Hostile input to every kernel (issue 13): hostile integers (0, -1, 2**31 - 1, 2**31, 2**32,
2**62, 2**63 - 1, -2**63, Python ints past int64) as sizes, counts, positions, starts and ids,
and hostile arrays (wrong dtypes, non-native byte order, non-contiguous, misaligned, read-only
outputs, zero-size, overlapping inputs and outputs) must raise TypeError, ValueError, IndexError
or OverflowError (or, where the input is merely unusual, give the right answer): never crash,
never read or write out of bounds.

The calls that crashed the code before these checks (a start near 2**63 in attention: "double
free or corruption" or a segfault; n_heads past 2**62 in rope: a segfault; a QTensor with K = 0:
SIGFPE) and sweeps of every integer argument over the hostile list run in a fresh interpreter
(`isolated`), so that a crash fails the test instead of killing pytest. The hypothesis tests run
in this process: bad input is validated with the GIL held before any nogil code, so an example
that got past the checks would crash here, and fail the run all the same.

Both backends are tested where the reference can give the same error (byte order, ids and
positions out of range, starts past the cache); layout requirements (C-contiguous, aligned,
exact dtypes) are the compiled kernels' own: NumPy handles such arrays correctly.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.model.rope import rope_tables
from xllm.formats import qtensor as quant
from xllm._kernels import _cpu
from xllm._kernels import reference as R

N = pytest.importorskip("xllm._kernels.norm")  # compiled modules (AVX2)
from xllm._kernels import attention as A  # noqa: E402
from xllm._kernels import matmul as MM  # noqa: E402
from xllm._kernels import qmatmul as Q  # noqa: E402
from xllm._kernels import sampling as S  # noqa: E402

ERRORS = (TypeError, ValueError, IndexError, OverflowError)
HOSTILE = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -2**63, 2**63, 2**64 - 1, 2**64,
           2**70, -2**70]
hostile_ints = st.sampled_from(HOSTILE) | st.integers()
hostile_floats = st.sampled_from([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"),
                                  float("-inf"), 5e-324, 1e-300, 1e300, 2.0**63]) | st.floats()
SETTINGS = dict(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
COMPILED = {"matmul": MM.matmul, "embedding": MM.embedding, "qmatmul": Q.qmatmul,
            "qembedding": Q.qembedding, "rmsnorm": N.rmsnorm, "rope": N.rope,
            "softmax": N.softmax, "silu_mul": N.silu_mul, "attention": A.attention,
            "attention_batch": A.attention_batch, "argmax": S.argmax, "sample": S.sample,
            "apply_repetition_penalty": S.apply_repetition_penalty}
BACKENDS = {"compiled": COMPILED, "reference": {k: getattr(R, k) for k in COMPILED}}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = _cpu.get_threads()
    yield
    _cpu.set_threads(n)


# ---------------- valid calls, to be spoilt one argument at a time ----------------

def rng_f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def qtensor(bits=8, n=16, k=64):
    return quant.quantize(rng_f32(n, k, seed=1) * 0.1, bits=bits)


def valid_calls():
    """{kernel: argument list} of small valid calls (fresh arrays on each call)."""
    rows = rng_f32(40, 64, seed=2)
    cos, sin = rope_tables(np.ones(2, np.float32), 10)
    return {
        "matmul": [rng_f32(2, 32), rng_f32(8, 32, seed=3), np.zeros((2, 8), np.float32)],
        "embedding": [rng_f32(10, 8), np.array([1, 9]), np.zeros((2, 8), np.float32)],
        "qmatmul": [rng_f32(2, 64), qtensor(), np.zeros((2, 16), np.float32)],
        "qembedding": [qtensor(), np.array([0, 15]), np.zeros((2, 64), np.float32)],
        "rmsnorm": [rng_f32(2, 8), np.ones(8, np.float32), 1e-5, np.zeros((2, 8), np.float32)],
        "rope": [rng_f32(2, 8), np.array([0, 9]), cos, sin, 2, True],
        "softmax": [rng_f32(2, 8), np.zeros((2, 8), np.float32)],
        "silu_mul": [rng_f32(2, 8), rng_f32(2, 8, seed=4), np.zeros((2, 8), np.float32)],
        "attention": [rng_f32(2, 128), R.k_blocks(rows), R.v_blocks(rows, 1),
                      np.zeros((2, 128), np.float32), 38, 2, 1, 0.125],
        "attention_batch": [rng_f32(3, 128), rng_f32(3, 64), rng_f32(3, 64),
                            [R.k_blocks(rows), R.k_blocks(rows)],
                            [R.v_blocks(rows, 1), R.v_blocks(rows, 1)],
                            np.array([0, 1, 3]), np.array([5, 30]),
                            np.zeros((3, 128), np.float32), 2, 1, 0.125],
        "argmax": [rng_f32(50)],
        "sample": [rng_f32(50), 1.0, 0, 0.9, 0.0, 0.5],
        "apply_repetition_penalty": [rng_f32(50), np.array([3, 3, 49]), 1.3],
    }


# (kernel, argument index) of every array argument that is written
OUTPUTS = {("matmul", 2), ("embedding", 2), ("qmatmul", 2), ("qembedding", 2), ("rmsnorm", 3),
           ("rope", 0), ("softmax", 1), ("silu_mul", 2), ("attention", 3),
           ("attention_batch", 7), ("apply_repetition_penalty", 0)}


def array_args():
    """(kernel, index, array) of every ndarray argument of the valid calls, including the caches
    inside attention_batch's lists (index (i, j))."""
    for name, args in valid_calls().items():
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                yield name, i, a
            elif isinstance(a, list):
                for j, b in enumerate(a):
                    yield name, (i, j), b


def call(fn, args, i, value):
    """fn(*args) with argument i (or (i, j): element j of list argument i) replaced by value."""
    args = list(args)
    if isinstance(i, tuple):
        args[i[0]] = list(args[i[0]])
        args[i[0]][i[1]] = value
    else:
        args[i] = value
    return fn(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", COMPILED)
def test_valid_calls_work(backend, name):
    BACKENDS[backend][name](*valid_calls()[name])  # (what the other tests spoil is valid)


# ---------------- byte order ----------------

def swapped(a):
    """a with the same values in non-native byte order (a copy)."""
    return a.astype(a.dtype.newbyteorder())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, i, a", [c for c in array_args() if c[2].dtype.itemsize > 1],
                         ids=lambda v: str(v) if not isinstance(v, np.ndarray) else "")
def test_non_native_byte_order_is_refused(backend, name, i, a):
    """Issue 13's reproducer "big-endian float32 arrays passed to kernels": accepted before (the
    compiled kernels read the bytes swapped: garbage), now TypeError on both backends; also
    float16, int64 ids/positions/bounds and the weights."""
    with pytest.raises(TypeError, match="native"):
        call(BACKENDS[backend][name], valid_calls()[name], i, swapped(a))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_non_native_weights_are_refused(backend, dtype):
    x, w, out = valid_calls()["matmul"]
    with pytest.raises(TypeError, match="native"):
        BACKENDS[backend]["matmul"](x, swapped(w.astype(dtype)), out)
    table, ids, out = valid_calls()["embedding"]
    with pytest.raises(TypeError, match="native"):
        BACKENDS[backend]["embedding"](swapped(table.astype(dtype)), ids, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits, field", [(8, "scales"), (4, "scales"), (4, "mins")])
@pytest.mark.parametrize("kernel", ["qmatmul", "qembedding"])
def test_non_native_quantized_weights_are_refused(backend, bits, field, kernel):
    w = quant.quantize(rng_f32(16, 64) * 0.1, bits=bits, asymmetric=field == "mins")
    setattr(w, field, swapped(getattr(w, field)))  # (QTensor() itself refuses it; fields change)
    args = valid_calls()[kernel]
    with pytest.raises(TypeError, match="native"):
        call(BACKENDS[backend][kernel], args, 1 if kernel == "qmatmul" else 0, w)


# ---------------- layout: dtypes, contiguity, alignment, read-only, overlap ----------------

def misaligned(a):
    """A copy of a whose data starts one byte past an aligned address."""
    buf = np.empty(a.nbytes + 1, np.uint8)
    b = buf[1:].view(a.dtype).reshape(a.shape)
    b[...] = a
    assert not b.flags.aligned
    return b


def strided(a):
    """A non-contiguous array with a's values (every other element of a wider array)."""
    b = np.repeat(a[..., None], 2, axis=-1)[..., 0]
    assert not b.flags.c_contiguous or a.size <= 1
    return b


FLOAT_ARGS = [c for c in array_args() if c[2].dtype.kind in "fu" and c[2].dtype.itemsize > 1]


@pytest.mark.parametrize("name, i, a", FLOAT_ARGS,
                         ids=lambda v: str(v) if not isinstance(v, np.ndarray) else "")
def test_layout_is_checked(name, i, a):
    fn, args = COMPILED[name], valid_calls()[name]
    with pytest.raises(ValueError):
        call(fn, args, i, misaligned(a))
    if a.size > 1:
        with pytest.raises(ValueError, match="contiguous"):
            call(fn, args, i, strided(a))
    with pytest.raises(TypeError):
        call(fn, args, i, a.astype(np.float64))
    with pytest.raises(TypeError):
        call(fn, args, i, a.tolist())
    if (name, i) in OUTPUTS or (name == "attention_batch" and isinstance(i, tuple)):
        ro = a.copy()  # outputs, and the caches that k_new is stored into
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            call(fn, args, i, ro)


@pytest.mark.parametrize("name", ["embedding", "qembedding"])
@pytest.mark.parametrize("ids", [np.array([1.0]), np.array([True]), np.array(["1"]),
                                 np.array([1], np.uint8), np.array([[1]]), np.int64(1),
                                 [1.5], "1", None, [2**70], [-2**70], [2**63]])
def test_bad_ids_are_refused(name, ids):
    table, _, out = valid_calls()[name]
    with pytest.raises(ERRORS):
        COMPILED[name](table, ids, out[:1])


def _at(buf, i, values):
    """buf[i:i + len(values)] set to values (a view)."""
    buf[i:i + len(values)] = values
    return buf[i:i + len(values)]


def test_index_arrays_that_share_memory_with_the_output():
    """An index array in the memory a kernel writes would change under it (ids, positions or
    starts pointing far outside: a wild read or write). The kernels check and use a private
    copy, so the result is that of the indices as they were at the call."""
    def same_as_with_copies(fn, args, *written):
        """fn(*args) writes into its arguments `written` what it writes with all copied."""
        want = [a.copy() if isinstance(a, np.ndarray) else
                [c.copy() for c in a] if isinstance(a, list) else a for a in args]
        fn(*want)
        fn(*args)
        for i in written:
            np.testing.assert_array_equal(args[i], want[i])

    buf = np.zeros(64, np.int64)
    f32 = buf.view(np.float32)
    buf[:8] = [1, 2, 3, 4, 5, 6, 7, 8]
    table = rng_f32(10, 2) * 1e30  # rows that are ids far outside, as int64
    out = f32[4:20].reshape(8, 2)  # over ids[2:]
    same_as_with_copies(MM.embedding, [table, buf[:8], out], 2)
    buf[:2] = [3, 15]
    same_as_with_copies(Q.qembedding, [qtensor(k=32), buf[:2], f32[2:66].reshape(2, 32)], 2)
    cos, sin = rope_tables(np.ones(2, np.float32), 10)
    buf[:2] = [3, 5]  # positions inside x
    same_as_with_copies(N.rope, [f32[:16].reshape(2, 8), buf[:2], cos, sin, 2, True], 0)
    buf[:3] = [3, 5, 0]
    same_as_with_copies(S.apply_repetition_penalty, [f32[:50], buf[:3], 1e-30], 0)
    args = valid_calls()["attention_batch"]
    ints = np.zeros(1024, np.int64)
    out = ints.view(np.float32)[:384].reshape(3, 128)
    bounds, starts = _at(ints, 10, [0, 1, 3]), _at(ints, 100, [5, 30])  # inside out
    same_as_with_copies(A.attention_batch, args[:5] + [bounds, starts, out] + args[8:], 3, 4, 7)
    kc = args[3][0]  # starts inside a cache, which is written first
    starts = _at(kc.reshape(-1).view(np.int64), 0, [5, 30])
    same_as_with_copies(A.attention_batch, args[:6] + [starts] + args[7:], 3, 4, 7)
    with pytest.raises(ValueError, match="overlap"):  # k_new inside the cache it is stored in
        A.attention_batch(args[0], kc.reshape(-1)[:192].reshape(3, 64), *args[2:])


@pytest.mark.parametrize("name", ["matmul", "rmsnorm", "softmax", "silu_mul", "attention",
                                  "qmatmul"])
def test_outputs_that_partly_overlap_an_input_are_refused(name):
    args = valid_calls()[name]
    src = args[0]
    big = np.zeros(src.size + src.shape[-1] + 64, np.float32)
    moved = big[:src.size].reshape(src.shape)
    moved[...] = src
    out_i = next(i for (n, i) in OUTPUTS if n == name)
    shape = args[out_i].shape
    out = big[src.shape[-1]:src.shape[-1] + int(np.prod(shape))].reshape(shape)
    args[0] = moved
    with pytest.raises(ValueError, match="overlap"):
        call(COMPILED[name], args, out_i, out)


def test_weights_that_overlap_the_output_are_refused():
    x, w, out = valid_calls()["matmul"]
    with pytest.raises(ValueError, match="overlap"):
        MM.matmul(x, w, w.reshape(-1)[:16].reshape(2, 8))
    table, ids, _ = valid_calls()["embedding"]
    with pytest.raises(ValueError, match="overlap"):
        MM.embedding(table, ids, table[:2])
    x, qt, out = valid_calls()["qmatmul"]
    with pytest.raises(ValueError, match="overlap"):
        Q.qmatmul(x, qt, qt.qs.reshape(-1).view(np.float32)[:32].reshape(2, 16))
    with pytest.raises(ValueError, match="overlap"):
        Q.qmatmul(x, (qt, qtensor()), (out, out))  # two outputs in one place
    w = valid_calls()["rmsnorm"][1]
    with pytest.raises(ValueError, match="overlap"):
        N.rmsnorm(np.ones((1, 8), np.float32), w, 1e-5, w.reshape(1, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    """Empty batches work (or are refused cleanly); nothing crashes."""
    K = BACKENDS[backend]
    e = np.zeros((0, 8), np.float32)
    K["matmul"](np.zeros((0, 32), np.float32), rng_f32(8, 32), e)
    K["matmul"](rng_f32(2, 32), np.zeros((0, 32), np.float32), np.zeros((2, 0), np.float32))
    out = np.ones((2, 8), np.float32)
    K["matmul"](np.zeros((2, 0), np.float32), np.zeros((8, 0), np.float32), out)
    np.testing.assert_array_equal(out, 0)
    K["embedding"](rng_f32(10, 8), np.zeros(0, np.int64), e)
    K["embedding"](rng_f32(10, 8), [], e)
    K["rmsnorm"](e, np.ones(8, np.float32), 1e-5, e)
    K["softmax"](e, e)
    K["silu_mul"](e, e, e)
    cos, sin = rope_tables(np.ones(2, np.float32), 10)
    K["rope"](e, np.zeros(0, np.int64), cos, sin, 2, True)
    K["apply_repetition_penalty"](rng_f32(5), [], 1.2)
    q = np.zeros((0, 128), np.float32)
    K["attention"](q, np.zeros((0, 64, 32), np.float32), np.zeros((0, 1, 32, 64), np.float32),
                   q.copy(), 0, 2, 1, 1.0)
    K["attention_batch"](q, None, None, [], [], [0], [], q.copy(), 2, 1, 1.0)
    with pytest.raises(ERRORS):  # one row, no room in a cache of 0 blocks
        K["attention"](np.zeros((1, 128), np.float32), np.zeros((0, 64, 32), np.float32),
                       np.zeros((0, 1, 32, 64), np.float32), np.zeros((1, 128), np.float32),
                       0, 2, 1, 1.0)
    if backend == "compiled":
        with pytest.raises(ValueError):
            S.argmax(np.zeros(0, np.float32))
        with pytest.raises(ValueError):
            N.rope(np.zeros((1, 0), np.float32), [0], np.zeros((10, 0), np.float32),
                   np.zeros((10, 0), np.float32), 1, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_k0(backend, bits):
    """A QTensor with K = 0 is valid (QTensor accepts it): the product is 0. The compiled
    qmatmul divided by its number of blocks: SIGFPE before (see test_issue_reproducers)."""
    w = quant.QTensor((16, 0), bits, 32, np.zeros((1, 0, 512 if bits == 8 else 256), np.uint8),
                      np.zeros((1, 0, 16), np.float16))
    out = np.ones((3, 16), np.float32)
    BACKENDS[backend]["qmatmul"](np.zeros((3, 0), np.float32), w, out)
    np.testing.assert_array_equal(out, 0)
    out[...] = 1
    BACKENDS[backend]["qmatmul"](np.zeros((3, 0), np.float32), w, out, accumulate=True)
    np.testing.assert_array_equal(out, 1)


@pytest.mark.parametrize("field, value", [
    ("shape", (2**70, 64)), ("shape", (-16, 64)), ("shape", (16, -64)), ("shape", (16, 2**64)),
    ("shape", (2**63 - 1, 64)), ("shape", (16.0, 64.0)), ("shape", (17, 64)), ("shape", (32, 64)),
    ("group", 2**70), ("group", 16), ("group", 48), ("group", -32), ("group", 64.0),
    ("bits", 5), ("bits", 2**64), ("parts", 4), ("parts", 2**63), ("parts", None),
    ("qs", None), ("scales", np.zeros((1, 2, 16), np.float64)), ("mins", "x")])
@pytest.mark.parametrize("kernel", ["qmatmul", "qembedding"])
def test_mutated_qtensor_fields(field, value, kernel):
    """A QTensor's fields are plain attributes: changed after construction, every kernel call
    re-validates them (ModelFormatError is a ValueError)."""
    args = valid_calls()[kernel]
    w = args[1] if kernel == "qmatmul" else args[0]
    setattr(w, field, value)
    with pytest.raises(ERRORS):
        COMPILED[kernel](*args)


def read_only(a):
    b = a.copy()
    b.flags.writeable = False
    return b


SPOILERS = {"swapped": swapped, "misaligned": misaligned, "strided": strided,
            "float64": lambda a: a.astype(np.float64), "float16": lambda a: a.astype(np.float16),
            "int32": lambda a: a.astype(np.int32), "uint64": lambda a: a.astype(np.uint64),
            "bool": lambda a: a.astype(bool), "object": lambda a: a.astype(object),
            "read-only": read_only, "empty": lambda a: a[:0], "one row": lambda a: a[:1],
            "transposed": lambda a: a.T, "flat": lambda a: a.reshape(-1),
            "extra axis": lambda a: a[None], "0-d": lambda a: a.reshape(-1)[:1].reshape(()),
            "list": lambda a: a.tolist(), "None": lambda a: None, "scalar": lambda a: 3}
ARRAY_ARGS = {name: [i for n, i, _ in array_args() if n == name] for name in COMPILED}


@settings(**SETTINGS)
@given(name=st.sampled_from(sorted(COMPILED)),
       spoils=st.lists(st.tuples(st.integers(0, 99), st.sampled_from(sorted(SPOILERS))),
                       min_size=1, max_size=3))
def test_spoilt_arrays(name, spoils):
    """Any kernel with one to three of its array arguments spoilt (wrong dtype, byte order,
    layout, shape, a non-array ...): the call works or raises one of ERRORS, nothing else."""
    args = valid_calls()[name]
    chosen = {ARRAY_ARGS[name][k % len(ARRAY_ARGS[name])]: spoil for k, spoil in spoils}
    for i, spoil in chosen.items():  # (each argument spoilt once)
        if isinstance(i, tuple):
            args[i[0]] = list(args[i[0]])
            args[i[0]][i[1]] = SPOILERS[spoil](args[i[0]][i[1]])
        else:
            args[i] = SPOILERS[spoil](args[i])
    try:
        COMPILED[name](*args)
    except ERRORS:
        pass


# ---------------- hostile integers (in process, hypothesis) ----------------

def attention_case(m=2, blocks=2, h=2, kv=1, hd=64):
    rows = rng_f32(blocks * 32, kv * hd)
    return (rng_f32(m, h * hd), R.k_blocks(rows), R.v_blocks(rows, kv),
            np.zeros((m, h * hd), np.float32))


@settings(**SETTINGS)
@given(start=hostile_ints, h=hostile_ints, kv=hostile_ints, m=st.integers(0, 3))
def test_attention_hostile_ints(start, h, kv, m):
    q, kc, vc, out = attention_case(m)
    valid_start = 0 <= start <= 64 - m
    assert raises(A.attention, q, kc, vc, out, start, h, kv, 0.125) != (
        valid_start and (h, kv) == (2, 1))
    if (h, kv) == (2, 1):  # (the reference does not compare the heads with the caches' shapes)
        assert raises(R.attention, q, kc, vc, out, start, h, kv, 0.125) != valid_start


@settings(**SETTINGS)
@given(starts=st.lists(hostile_ints, min_size=2, max_size=2),
       bounds=st.lists(hostile_ints, min_size=3, max_size=3), store=st.booleans())
def test_attention_batch_hostile_ints(starts, bounds, store):
    args = valid_calls()["attention_batch"]
    if not store:
        args[1] = args[2] = None
    args[5], args[6] = bounds, starts
    valid = (bounds[0] == 0 and bounds[2] == 3 and 0 <= bounds[1] <= 3 and
             all(0 <= s <= 64 - n for s, n in zip(starts, (bounds[1], 3 - bounds[1]))))
    for K in BACKENDS.values():
        assert raises(K["attention_batch"], *args) != valid


@settings(**SETTINGS)
@given(pos=st.lists(hostile_ints, min_size=2, max_size=2), h=hostile_ints)
def test_rope_hostile_ints(pos, h):
    x, _, cos, sin, _, _ = valid_calls()["rope"]
    for K in BACKENDS.values():
        assert raises(K["rope"], x, pos, cos, sin, h, True) != (
            h == 2 and all(0 <= p < 10 for p in pos))


def raises(fn, *args):
    """Whether fn(*args) raises one of ERRORS (anything else propagates)."""
    try:
        fn(*args)
    except ERRORS:
        return True
    return False


@settings(**SETTINGS)
@given(ids=st.lists(hostile_ints, min_size=1, max_size=3))
def test_ids_hostile_ints(ids):
    for K in BACKENDS.values():
        out = np.zeros((len(ids), 8), np.float32)
        assert raises(K["embedding"], rng_f32(10, 8), ids, out) != all(0 <= i < 10 for i in ids)
        out = np.zeros((len(ids), 64), np.float32)
        assert raises(K["qembedding"], qtensor(), ids, out) != all(0 <= i < 16 for i in ids)
        assert raises(K["apply_repetition_penalty"], rng_f32(50), ids, 1.2) != all(
            0 <= i < 50 for i in ids)


@settings(**SETTINGS)
@given(t=hostile_floats, k=hostile_ints, p=hostile_floats, mp=hostile_floats, u=hostile_floats)
def test_sample_hostile_arguments(t, k, p, mp, u):
    logits = rng_f32(50)
    try:
        r = S.sample(logits, t, k, p, mp, u)
    except ERRORS:
        return
    assert 0 <= r < 50


@settings(**SETTINGS)
@given(n=hostile_ints)
def test_set_threads_hostile(n):
    try:
        _cpu.set_threads(n)
    except ValueError:
        assert not 1 <= n <= _cpu.MAX_THREADS
    else:
        assert _cpu.get_threads() == n


# ---------------- in a fresh interpreter: the reproducers and the sweeps ----------------

PRELUDE = """
import numpy as np
from xllm.formats import qtensor as quant
from xllm.model.rope import rope_tables
from xllm._kernels import attention as A, matmul as MM, norm as N, qmatmul as Q
from xllm._kernels import sampling as S, reference as R, _cpu
OK = (TypeError, ValueError, IndexError, OverflowError)
def expect(what, fn, *args):
    try:
        fn(*args)
    except OK as e:
        print("RAISED", what, type(e).__name__, flush=True)
    else:
        print("RETURNED", what, flush=True)
"""


def isolated(code):
    """Run PRELUDE + code in a fresh interpreter; fail if it crashes (a signal, an uncaught
    exception); return its output lines."""
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout.splitlines()


def test_issue_reproducers():
    """Each of these crashed before (checked against the previous build: the start near 2**63
    with k_new stored "free(): invalid pointer" then SIGSEGV, exit -11; rope with
    n_heads = 2**62 + 1: SIGSEGV, since n_heads * 2 * half wrapped to x's 4 columns; qmatmul
    with K = 0: SIGFPE, exit -8). Each must now raise the error named."""
    lines = isolated("""
        q, kc, vc = np.zeros((1, 128), np.float32), np.zeros((1, 64, 32), np.float32), \\
            np.zeros((1, 1, 32, 64), np.float32)
        kn = np.zeros((1, 64), np.float32)
        for s in (2**63 - 1, 2**63 - 2, 2**63 - 33, 2**62):
            expect("attention", A.attention, q, kc, vc, q.copy(), s, 2, 1, 1.0)
            expect("attention_batch", A.attention_batch, q, kn, kn, [kc], [vc], [0, 1], [s],
                   q.copy(), 2, 1, 1.0)
        cos, sin = rope_tables(np.ones(2, np.float32), 4)
        expect("rope", N.rope, np.zeros((1, 4), np.float32), np.array([0]), cos, sin,
               2**62 + 1, True)
        w = quant.QTensor((16, 0), 8, 32, np.zeros((1, 0, 512), np.uint8),
                          np.zeros((1, 0, 16), np.float16))
        expect("qmatmul K=0", Q.qmatmul, np.zeros((1, 0), np.float32), w,
               np.zeros((1, 16), np.float32))
        """)
    assert lines == ["RAISED attention ValueError", "RAISED attention_batch ValueError"] * 4 + [
        "RAISED rope ValueError", "RETURNED qmatmul K=0"]


def test_sweep_hostile_ints_isolated():
    """Every integer argument of every kernel over the hostile list (and pairs of them where
    they interact), in a fresh interpreter: only TypeError, ValueError, IndexError or
    OverflowError, or a normal return for the values that are valid."""
    lines = isolated(f"""
        H = {HOSTILE!r}
        rows = np.ones((64, 64), np.float32)
        kc, vc = R.k_blocks(rows), R.v_blocks(rows, 1)
        for m in (1, 2):
            q, kn = np.ones((m, 128), np.float32), np.ones((m, 64), np.float32)
            for a in H:
                for b in H:
                    expect("att", A.attention, q, kc, vc, q.copy(), a, b, 1, 1.0)
                    expect("att", A.attention, q, kc, vc, q.copy(), a, 2, b, 1.0)
                    expect("attb", A.attention_batch, q, kn, kn, [kc], [vc], [0, m], [a],
                           q.copy(), 2, 1, 1.0)
                    expect("attb", A.attention_batch, q, kn, kn, [kc, kc.copy()],
                           [vc, vc.copy()], [0, a, m], [b, a], q.copy(), 2, 1, 1.0)
                    expect("attb", A.attention_batch, q, None, None, [kc], [vc], [a, b],
                           [0], q.copy(), 2, 1, 1.0)
        cos, sin = rope_tables(np.ones(2, np.float32), 10)
        for a in H:
            for b in H:
                expect("rope", N.rope, np.ones((2, 8), np.float32), [a, b], cos, sin, 2, True)
            expect("rope", N.rope, np.ones((2, 8), np.float32), [0, 1], cos, sin, a, True)
            expect("emb", MM.embedding, np.ones((10, 8), np.float32), [a],
                   np.zeros((1, 8), np.float32))
            expect("emb", MM.embedding, np.ones((10, 8), np.float32), np.array([a % 2**64],
                   np.uint64) if a >= 0 else [a], np.zeros((1, 8), np.float32))
            qt = quant.quantize(np.ones((16, 32), np.float32))
            expect("qemb", Q.qembedding, qt, [a], np.zeros((1, 32), np.float32))
            expect("pen", S.apply_repetition_penalty, np.ones(50, np.float32), [a, 1], 1.2)
            expect("pen", S.apply_repetition_penalty, np.ones(50, np.float32),
                   np.array([a % 2**64], np.uint64), 1.2)
            expect("sample", S.sample, np.ones(50, np.float32), 1.0, a, 0.9, 0.0, 0.5)
            expect("threads", _cpu.set_threads, a)
            for f in ("shape", "group", "bits", "parts"):
                w = quant.quantize(np.ones((16, 64), np.float32))
                setattr(w, f, (a, 64) if f == "shape" else a)
                expect("qmat", Q.qmatmul, np.ones((1, 64), np.float32), w,
                       np.zeros((1, 16), np.float32))
                expect("qemb", Q.qembedding, w, [0], np.zeros((1, 64), np.float32))
        print("DONE")
        """)
    assert lines[-1] == "DONE"
    assert len(lines) > 2000


def test_attention_all_hostile_starts_raise_isolated():
    """Every start near the int64 limits raises ValueError, with and without k_new, in decode
    (1 row) and in a batch of sequences."""
    lines = isolated(f"""
        H = [h for h in {HOSTILE!r} if h < 0 or h > 64] + [2**63 - k for k in range(1, 70)]
        rows = np.ones((64, 64), np.float32)
        kc, vc = R.k_blocks(rows), R.v_blocks(rows, 1)
        q, kn = np.ones((3, 128), np.float32), np.ones((3, 64), np.float32)
        for s in H:
            expect("a", A.attention, q[:1], kc, vc, q[:1].copy(), s, 2, 1, 1.0)
            expect("b", A.attention_batch, q, kn, kn, [kc, kc.copy()], [vc, vc.copy()],
                   [0, 1, 3], [0, s], q.copy(), 2, 1, 1.0)
            expect("c", A.attention_batch, q, None, None, [kc, kc], [vc, vc], [0, 2, 3], [s, 3],
                   q.copy(), 2, 1, 1.0)
        """)
    assert lines and all(line.startswith("RAISED") and line.endswith("Error") for line in lines)
    assert not any("RETURNED" in line for line in lines)
