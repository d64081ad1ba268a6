# Compiled for the baseline ISA (no -mavx2): safe to import on any x86-64 CPU.
"""CPU feature queries used to pick the kernel backend and instruction-set path."""

cdef extern from *:
    """
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static int xllm_cpu_has(int which) {
        __builtin_cpu_init();
        switch (which) {
            case 0: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
            case 1: return __builtin_cpu_supports("f16c");
            case 2: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
            case 3: return __builtin_cpu_supports("avx512bf16");
            case 4: return __builtin_cpu_supports("avx512vnni");
        }
        return 0;
    }
    #else
    static int xllm_cpu_has(int which) { (void)which; return 0; }
    #endif
    """
    int xllm_cpu_has(int which) nogil


_FEATURES = ("avx2", "f16c", "avx512", "avx512bf16", "avx512vnni")  # xllm_cpu_has(0 .. 4)


def features():
    """Instruction-set extensions of this CPU that xllm can use, as a dict of booleans."""
    return {name: bool(xllm_cpu_has(i)) for i, name in enumerate(_FEATURES)}


# ---- thread count: every kernel's prange reads it through get_num_threads() ----
import os

cdef int _num_threads = 1


cdef int get_num_threads() noexcept nogil:
    return _num_threads


def default_threads() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


MAX_THREADS = 1024  # more would only ask OpenMP for threads it may fail to create (it exits)


def set_threads(n=None):
    """Set the number of threads the kernels use (1 .. MAX_THREADS); None means
    default_threads()."""
    global _num_threads
    if n is None:
        n = min(default_threads(), MAX_THREADS)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS}, got {n!r}")
    _num_threads = n


def get_threads() -> int:
    """The number of threads the kernels use."""
    return _num_threads


set_threads(None)
