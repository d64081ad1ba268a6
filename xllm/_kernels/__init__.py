"""Kernel backends: the compiled Cython kernels, or the NumPy reference (``XLLM_BACKEND=reference``
forces it). On a CPU without AVX2/FMA/F16C the compiled modules are never imported (they would
fault with "Illegal instruction"); xllm warns and uses the reference instead."""
import ctypes
import os
import warnings

from . import reference
from ._cpu import default_threads, features, get_threads, set_threads

# An OpenMP thread that waits at a barrier spins GOMP_SPINCOUNT times before it sleeps. With
# libgomp's default, 300,000, a step collapses while another process holds a core: the waiting
# threads spin through the time slices of the one they wait for (docs/sharing.rst has the
# figures). A short spin covers the microsecond waits of a quiet machine; xllm/model/governor.py
# then drops to fewer threads while the machine stays busy.
SPIN_COUNT = "1000"
# libgomp spins only 100 times (its "throttled" count) while it manages more threads than there
# are CPUs, which happens as soon as a second thread runs kernels (each thread that starts a
# parallel region gets its own pool: a server's engine thread after a pass in the main thread,
# the callers of a StepBatcher): every barrier then sleeps and wakes, and a decode step of 8
# rows took 26 ms instead of 12. OMP_WAIT_POLICY=active with an explicit GOMP_SPINCOUNT makes
# libgomp use SPIN_COUNT in both cases (the policy changes nothing else).
WAIT_POLICY = "active"


def _load_openmp():
    """Load libgomp (which reads its settings from the environment once, as it loads) with
    GOMP_SPINCOUNT=SPIN_COUNT and OMP_WAIT_POLICY=WAIT_POLICY, unless the environment already says how OpenMP threads wait;
    then restore the environment, so that child processes and other libraries do not inherit
    the setting. No effect if libgomp was loaded before xllm."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    try:
        ctypes.CDLL("libgomp.so.1")  # the kernels link it; later loads share this one
    except OSError:
        pass  # another OpenMP runtime, or none
    finally:
        del os.environ["GOMP_SPINCOUNT"]
        del os.environ["OMP_WAIT_POLICY"]


_load_openmp()

KERNEL_NAMES = ("matmul", "embedding", "rmsnorm", "rope", "softmax", "silu_mul", "attention",
                "attention_batch", "argmax", "apply_repetition_penalty", "sample")
QUANT_NAMES = ("qmatmul", "qembedding")


def _compiled():
    try:
        from . import attention, matmul, norm, qmatmul, sampling  # AVX2 code inside
    except ImportError as e:
        raise ImportError(f"xllm's compiled kernels are missing or broken ({e}); reinstall xllm "
                          "(pip install .) or set XLLM_BACKEND=reference") from e
    # each kernel from the module that defines it (matmul.matmul, matmul.embedding, norm.rope, ...)
    functions = {}
    for module in (matmul, norm, attention, sampling, qmatmul):
        for name in KERNEL_NAMES + QUANT_NAMES:
            if hasattr(module, name):
                functions[name] = getattr(module, name)
    return functions


class Backend:
    """The kernel functions of one backend as attributes (``backend.matmul(x, w, out)``), as the
    backend defines them: float weights to ``matmul``/``embedding``, packed quantized weights to
    ``qmatmul``/``qembedding`` (xllm/formats/dispatch.py picks one by the weight's format)."""

    def __init__(self, name, functions):
        self.name = name
        for kernel in KERNEL_NAMES + QUANT_NAMES:
            setattr(self, kernel, functions[kernel])

    def __repr__(self):
        return f"<xllm kernel backend {self.name!r}>"


REFERENCE = Backend("reference", {kernel: getattr(reference, kernel)
                                  for kernel in KERNEL_NAMES + QUANT_NAMES})


def _select():
    want = os.environ.get("XLLM_BACKEND", "cython").lower()
    if want == "reference":
        return REFERENCE
    cpu = features()
    if not (cpu["avx2"] and cpu["f16c"]):
        warnings.warn("xllm: this CPU lacks AVX2/FMA/F16C; using the slow NumPy reference kernels")
        return REFERENCE
    return Backend("cython", _compiled())


_backend = None


def __getattr__(name):
    # `backend` is chosen on first use, so the compiled modules can be imported one by one.
    global _backend
    if name == "backend":
        if _backend is None:
            _backend = _select()
        return _backend
    raise AttributeError(name)


__all__ = ["backend", "Backend", "REFERENCE", "reference", "features", "set_threads",
           "get_threads", "default_threads"]
