"""Benchmark xllm's group-quantized matmul (qmatmul) on SmolLM2-135M and TinyLlama-1.1B shapes.

Prints median GOP/s (2*M*N*K over the median time) per weight format, activation parts
(QTensor.parts: 2 or 3 int8 parts per block of x; "def" is the default for the bits: int8 2,
int4 3), shape (K -> N) and M.

    python benchmarks/bench_qmatmul.py [--threads 2] [--reps 7] [--m 1,4,13,16,64,512]
                                       [--model smollm2,tinyllama] [--fmt int8,int4a] [--isa ...]
                                       [--parts def|2|3|2,3]
"""
import argparse
import itertools

import numpy as np

from xllm.formats import qtensor as quant
from xllm._kernels import _cpu
from xllm._kernels import qmatmul as Q

from bench_matmul import median_time  # noqa: E402 (same directory)

SHAPES = {"smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)],
          "tinyllama": [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)]}  # (K, N)
FORMATS = {"int8": dict(bits=8), "int4a": dict(bits=4, asymmetric=True)}  # all g32 fp16


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--m", default="1,4,13,16,64,512")
    ap.add_argument("--model", default="smollm2,tinyllama")
    ap.add_argument("--fmt", default="int8,int4a")
    ap.add_argument("--isa", default=None, help="avx2 or avx512vnni (default: the best)")
    ap.add_argument("--parts", default="def",
                    help="activation parts to time, comma-separated: 2, 3 or def (by bits)")
    args = ap.parse_args()
    _cpu.set_threads(args.threads)
    if args.isa:
        Q.set_isa(args.isa)
    ms = [int(m) for m in args.m.split(",")]
    rng = np.random.default_rng(0)
    print(f"qmatmul GOP/s, threads={args.threads}, isa={Q.get_isa()}, median of {args.reps}")
    print(f"{'fmt':6s} {'parts':>5s} {'K->N':>11s}" + "".join(f"{'M=' + str(m):>8s}" for m in ms))
    for fmt, model, parts in itertools.product(args.fmt.split(","), args.model.split(","),
                                               args.parts.split(",")):
        for k, n in SHAPES[model]:
            w = quant.quantize(rng.standard_normal((n, k), dtype=np.float32) * 0.05, group=32,
                               parts=None if parts == "def" else int(parts), **FORMATS[fmt])
            row = []
            for m in ms:
                x = rng.standard_normal((m, k), dtype=np.float32)
                out = np.empty((m, n), np.float32)
                # at least ~20 ms of work per timing, so that small cases are not all noise
                inner = max(1, int(2e7 / (m * n * k)))

                def run():
                    for _ in range(inner):
                        Q.qmatmul(x, w, out)
                t = median_time(run, args.reps) / inner
                row.append(2 * m * n * k / t / 1e9)
            print(f"{fmt:6s} {w.parts:5d} {f'{k}->{n}':>11s}" + "".join(f"{g:8.1f}" for g in row),
                  flush=True)


if __name__ == "__main__":
    main()
