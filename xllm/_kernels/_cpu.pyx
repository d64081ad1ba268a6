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

    /* Whether this process may execute AMX tile instructions (gemm_amx.h), probed once:
     * 0 yes; 1 CPUID lacks AMX-TILE, AMX-INT8 or AMX-BF16; 2 the OS does not enable the tile
     * state (XCR0 bits 17, 18); 3 Linux refused the permission request
     * arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 4 not x86-64 Linux with GCC. Without
     * the permission the first tile instruction would kill the process (SIGILL). */
    #if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
    #include <cpuid.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #define XLLM_ARCH_GET_XCOMP_PERM 0x1022
    #define XLLM_ARCH_REQ_XCOMP_PERM 0x1023
    #define XLLM_XFEATURE_XTILEDATA 18
    static int xllm_amx_probe(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
            return 1;
        const unsigned tile = d >> 24 & 1, int8 = d >> 25 & 1, bf16 = d >> 22 & 1;
        if (!(tile && int8 && bf16))
            return 1;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) /* OSXSAVE: xgetbv allowed */
            return 2;
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo >> 17 & 3) != 3)
            return 2;
        if (syscall(SYS_arch_prctl, XLLM_ARCH_REQ_XCOMP_PERM, XLLM_XFEATURE_XTILEDATA) != 0)
            return 3;
        unsigned long perm = 0;
        if (syscall(SYS_arch_prctl, XLLM_ARCH_GET_XCOMP_PERM, &perm) != 0 ||
            !(perm >> XLLM_XFEATURE_XTILEDATA & 1))
            return 3;
        return 0;
    }
    #else
    static int xllm_amx_probe(void) { return 4; }
    #endif
    """
    int xllm_cpu_has(int which) nogil
    int xllm_amx_probe() nogil


_FEATURES = ("avx2", "f16c", "avx512", "avx512bf16", "avx512vnni")  # xllm_cpu_has(0 .. 4)

# AMX, probed once per process at import (the permission request is process-wide and stays
# granted): the reason it is unusable, or "" when the tile kernels may run.
_AMX_REASONS = ("", "this CPU has no AMX (CPUID lacks AMX-TILE, AMX-INT8 or AMX-BF16)",
                "the operating system does not enable the AMX tile state (XCR0)",
                "the Linux kernel refused the AMX permission request "
                "(arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)",
                "AMX is only probed on x86-64 Linux")
_AMX = _AMX_REASONS[xllm_amx_probe()]


def amx_status():
    """Why the AMX tile kernels cannot run in this process, or "" if they can."""
    return _AMX


def features():
    """Instruction-set extensions of this CPU that xllm can use, as a dict of booleans. "amx":
    AMX-TILE, AMX-INT8 and AMX-BF16, enabled by the OS, with Linux's XTILEDATA permission
    granted to this process (amx_status() says what is missing)."""
    found = {name: bool(xllm_cpu_has(i)) for i, name in enumerate(_FEATURES)}
    found["amx"] = not _AMX
    return found


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
