"""Helpers shared by the tests of the compiled kernels (tests/test_kernels*.py,
tests/test_attention_window.py): the ISA paths each kernel module has on this CPU, a fixture
that puts back the thread count and ISA path a test changes, and the two checks every qmatmul
codec must pass (against the NumPy reference, and invariance to batch, threads and ISA).

Import it only from those tests: it imports the compiled kernels, which conftest.py leaves
uncollected on a CPU without AVX2. The qmatmul checks import xllm._kernels.qmatmul when called,
after the calling test module has imported it (with pytest.importorskip)."""
import numpy as np
import pytest

from xllm._kernels import _cpu
from xllm._kernels import backend
from xllm._kernels import reference as R
from xllm.formats.dispatch import ops

# The ISA paths of attention.pyx and qmatmul.pyx that this CPU can run, the portable one first.
# qmatmul's tile kernels (gemm_amx.h) run on the scalar model of the tiles wherever AVX-512 VNNI
# does ("amx-emulated"), and on the AMX unit where the CPU has it (tests/test_kernels_amx.py).
ATTENTION_ISAS = ["avx2"] + (["avx512"] if _cpu.features()["avx512"] else [])
QMATMUL_ISAS = (["avx2"] + (["avx512vnni", "amx-emulated"] if _cpu.features()["avx512vnni"] else [])
                + (["amx"] if _cpu.features()["amx"] else []))


def restore_threads_and_isa(module):
    """An autouse fixture that puts back, after each test, the kernel thread count and the ISA
    path of `module` (a compiled module with get_isa/set_isa) as they were before it. Bind it
    to a name in the test module: ``_restore = restore_threads_and_isa(Q)``."""

    @pytest.fixture(autouse=True)
    def _restore():
        threads = _cpu.get_threads()
        isa = module.get_isa()
        yield
        _cpu.set_threads(threads)
        module.set_isa(isa)

    return _restore


def assert_qmatmul_matches_reference(rng, w, m, scale, zero_x_block, threads, isa, accumulate):
    """Run qmatmul of random activations x [m, K] (standard normal times `scale`; its first 32
    columns zero if zero_x_block) with the weights `w` [N, K], on `threads` threads and the ISA
    path `isa`, into random out [m, N] (added to if `accumulate`, else overwritten), and assert:

    * the result equals the NumPy reference (reference.qmatmul) bit for bit;
    * it is within |d| <= 1e-4 (|x| @ |W|.T) + 1e-5 (+ 1e-6 |out| when accumulating) of
      float64 x @ W.T, W = w.dequantize(): the bound of the activations' quantization
      (tests/test_kernels_quant.py states it); with one part, each activation is off by at
      most half its block's step dx = amax / 127, so the bound is that of the rounding,
      (dx / 2 per value) @ |W|.T, plus the same float32 allowance.

    x and out are drawn from `rng` in that order (x, then out)."""
    from xllm._kernels import qmatmul as Q
    n, k = w.shape
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    if zero_x_block:
        x[:, :32] = 0  # an all-zero block of x
    out0 = rng.standard_normal((m, n)).astype(np.float32)
    _cpu.set_threads(threads)
    Q.set_isa(isa)
    got = out0.copy()
    Q.qmatmul(x, w, got, accumulate=accumulate)
    want = out0.copy()
    R.qmatmul(x, w, want, accumulate=accumulate)
    np.testing.assert_array_equal(got, want)  # bit-exact
    W = w.dequantize().astype(np.float64)
    exact = x.astype(np.float64) @ W.T + (out0 if accumulate else 0)
    bound = 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(W).T) + 1e-5
    if w.parts == 1:
        amax = np.abs(x.astype(np.float64)).reshape(m, k // 32, 32).max(axis=2)
        half_step = np.repeat(amax / 254, 32, axis=1)  # [m, K]
        bound += half_step @ np.abs(W).T
    assert np.all(np.abs(got - exact) <= bound + 1e-6 * np.abs(out0 if accumulate else 0))


def assert_qmatmul_batch_thread_and_isa_invariant(x, w):
    """Assert that qmatmul of row slices of x (at least 19 rows) with `w` gives the same bits as
    those rows of qmatmul of all of x (on the current path), on every path of QMATMUL_ISAS and
    on 1 and 2 threads: a row's result does not depend on its batch, threads or ISA."""
    from xllm._kernels import qmatmul as Q
    n = w.shape[0]
    full = np.empty((len(x), n), np.float32)
    Q.qmatmul(x, w, full)
    for isa in QMATMUL_ISAS:
        Q.set_isa(isa)
        for threads in (1, 2):
            _cpu.set_threads(threads)
            for m0, m1 in [(0, 1), (3, 4), (5, 12), (2, 19)]:
                part = np.empty((m1 - m0, n), np.float32)
                Q.qmatmul(np.ascontiguousarray(x[m0:m1]), w, part)
                np.testing.assert_array_equal(part, full[m0:m1])


def assert_dispatch_matches_separate_calls(x, ws):
    """Assert that the model's dispatch (ops(backend).matmul) of x with the tuple of weights
    `ws`, into new outputs, gives each output the same bits as qmatmul of x with that weight
    alone. Used with weights of different parts, a tuple that one qmatmul call refuses and the
    dispatch must split."""
    from xllm._kernels import qmatmul as Q
    outs = tuple(np.empty((len(x), w.shape[0]), np.float32) for w in ws)
    ops(backend).matmul(x, ws, outs)
    for w, o in zip(ws, outs):
        alone = np.empty_like(o)
        Q.qmatmul(x, w, alone)
        np.testing.assert_array_equal(o, alone)
