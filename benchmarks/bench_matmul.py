"""Benchmark xllm's matmul kernel on TinyLlama-1.1B shapes.

Prints, per ISA path and weight dtype: effective read bandwidth (GB/s) for decode (M=1; bytes
of w plus x per call over the median time), and GFLOP/s (2*M*N*K over the median time) for
prefill (M=512, K=2048, N=5632).

    python benchmarks/bench_matmul.py [--threads 2] [--repeat 9] [--isa avx2,avx512]
"""
import argparse
import time

import numpy as np

from xllm._kernels import _cpu
from xllm._kernels import matmul as mm

DECODE_SHAPES = [(5632, 2048), (2048, 5632), (32000, 2048)]  # (N, K) of w
PREFILL = (512, 2048, 5632)  # M, K, N


def weights(n, k, dtype, rng):
    w = rng.standard_normal((n, k), dtype=np.float32)
    if dtype == "bf16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    return w.astype(dtype)


def median_time(fn, repeat):
    fn()  # warm up (page faults, thread pool start)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=_cpu.default_threads())
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--isa", default=None, help="comma-separated subset of avx2,avx512")
    args = ap.parse_args()
    _cpu.set_threads(args.threads)
    isas = args.isa.split(",") if args.isa else (
        ["avx2", "avx512"] if _cpu.features()["avx512"] else ["avx2"])
    rng = np.random.default_rng(0)
    print(f"threads={args.threads}")
    for isa in isas:
        mm.set_isa(isa)
        for dtype in ("float32", "bf16", "float16"):
            for n, k in DECODE_SHAPES:
                w = weights(n, k, dtype, rng)
                x = rng.standard_normal((1, k), dtype=np.float32)
                out = np.empty((1, n), np.float32)
                # Rotate over copies totalling > 600 MB, so the weights come from memory, not
                # from the (possibly very large) last-level cache.
                copies = [w] + [w.copy() for _ in range(max(0, 600_000_000 // w.nbytes))]

                def run():
                    for c in copies:
                        mm.matmul(x, c, out)
                t = median_time(run, max(3, args.repeat // 3)) / len(copies)
                gbs = (w.nbytes + x.nbytes) / t / 1e9
                print(f"{isa:7s} {dtype:8s} decode M=1  w[{n},{k}]: {t * 1e3:7.3f} ms  "
                      f"{gbs:6.1f} GB/s")
                del copies
            m, k, n = PREFILL
            w = weights(n, k, dtype, rng)
            x = rng.standard_normal((m, k), dtype=np.float32)
            out = np.empty((m, n), np.float32)
            t = median_time(lambda: mm.matmul(x, w, out), args.repeat)
            print(f"{isa:7s} {dtype:8s} prefill M={m} K={k} N={n}: {t * 1e3:7.2f} ms  "
                  f"{2 * m * n * k / t / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
