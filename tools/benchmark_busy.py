"""Decode and prefill on a quiet and on a busy machine, each run in a fresh process.

    python tools/benchmark_busy.py --model smollm2-135m-instruct --pairs 5 \\
        [--llama-cpp-model M.gguf] [--baseline /path/to/older/xllm/checkout] [--cpuprobe PROBE]

Engines: ``xllm`` (the model's default thread count, all usable cores), ``xllm-t1`` (one kernel
thread), ``llama.cpp`` (llama-cpp-python, same threads as xllm, if --llama-cpp-model is given)
and ``baseline`` (xllm from another checkout with built kernels, if --baseline is given: old
against new code). For each of --pairs pairs the machine is first quiet, then loaded by
--load CPU-bound processes (``while 1: pass``); within a state every engine runs once, in its own
process, in an order that rotates. Prints every run, then per engine and state the medians, the
loaded / quiet ratio and, under load, each engine against ``xllm-t1``; with --baseline, the
quiet xllm / baseline ratios of the pairs (median and spread). --cpuprobe runs the CPU probe
(``../shared/bench/cpuprobe.c`` built) before each state and logs what it prints.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = ("The history of the city begins with a small settlement by the river, where traders "
          "met to exchange grain, salt and cloth. Over the centuries it grew into a market town, ")


def worker(engine, model, threads, prompt_tokens, new_tokens):
    """Measure in this process; returns {"prefill": tok/s, "decode": tok/s}."""
    if engine == "llama.cpp":
        return _llama_cpp(model, threads, prompt_tokens, new_tokens)
    import numpy as np
    import xllm
    m = xllm.load(model, threads=1 if engine == "xllm-t1" else threads)
    ids = (m.tokenizer.encode(PROMPT * 40, add_bos=True))[:prompt_tokens]
    m.logits(ids[:8])  # touch the weights once (page faults are not what is measured)
    t = time.perf_counter()
    m.transformer.forward(np.array(ids), m.transformer.new_cache())
    prefill = len(ids) / (time.perf_counter() - t)
    m.config.eos_token_id = None
    m.generate(ids[:128], max_new_tokens=new_tokens)
    s = m.last_stats
    return {"prefill": prefill, "decode": s["decode_steps"] / s["decode_seconds"]}


def _llama_cpp(model, threads, prompt_tokens, new_tokens):
    from llama_cpp import Llama
    llm = Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    ids = llm.tokenize((PROMPT * 40).encode(), add_bos=True)[:prompt_tokens]
    llm.eval(ids[:8])
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    llm.reset()
    llm.eval(ids[:128])
    t = time.perf_counter()
    for k in range(new_tokens):  # a decode step costs the same whatever the token
        llm.eval([ids[(128 + k) % len(ids)]])
    decode = new_tokens / (time.perf_counter() - t)
    return {"prefill": prefill, "decode": decode}


def _run(engine, a, env_extra=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model",
           a.llama_cpp_model if engine == "llama.cpp" else a.model,
           "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
           "--new-tokens", str(a.new_tokens)]
    env = dict(os.environ)
    if engine == "baseline":
        env["PYTHONPATH"] = a.baseline
        cmd[3] = "xllm"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(a):
    if not a.cpuprobe:
        return ""
    done = subprocess.run([a.cpuprobe], capture_output=True, text=True, timeout=120)
    return " ".join(done.stdout.split())


def main(argv=None):
    # not xllm's HelpFormatter: this process must not import xllm (its OpenMP settings would
    # reach the engines' processes)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a model path or name xllm loads (default: smollm2-135m-instruct)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="kernel threads of xllm and llama.cpp (default: all cores)")
    p.add_argument("--pairs", type=int, default=5,
                   help="quiet/loaded pairs of states (default: 5)")
    p.add_argument("--load", type=int, default=1,
                   help="competing CPU-bound processes (default: 1)")
    p.add_argument("--prompt-tokens", type=int, default=256,
                   help="prompt tokens of the prefill measurement (default: 256)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens of the decode measurement (default: 128)")
    p.add_argument("--llama-cpp-model", help="also run llama.cpp on this GGUF file")
    p.add_argument("--baseline", help="an older xllm checkout (kernels built in place)")
    p.add_argument("--engines", help="comma-separated subset of the engines")
    p.add_argument("--quiet-only", action="store_true", help="no loaded state (old/new pairs)")
    p.add_argument("--cpuprobe", help="the built CPU probe, run before each state")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.threads, a.prompt_tokens, a.new_tokens)))
        return 0
    engines = ["xllm", "xllm-t1"]
    if a.baseline:
        engines.append("baseline")
    if a.llama_cpp_model:
        engines.append("llama.cpp")
    if a.engines:
        engines = [e for e in a.engines.split(",") if e in engines]
    states = ["quiet"] if a.quiet_only else ["quiet", "loaded"]
    runs = []  # (pair, state, engine, result)
    for pair in range(a.pairs):
        for state in states:
            hogs = []
            if state == "loaded":
                hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                        for _ in range(a.load)]
                time.sleep(0.5)
            try:
                probe = _probe(a)
                order = engines[pair % len(engines):] + engines[:pair % len(engines)]
                for engine in order:
                    r = _run(engine, a)
                    runs.append((pair, state, engine, r))
                    print(f"pair {pair} {state:6} {engine:9} prefill {r['prefill']:8.1f} "
                          f"decode {r['decode']:7.1f} tok/s  {probe}", flush=True)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    _report(runs, engines, states, a)
    return 0


def _report(runs, engines, states, a):
    def med(engine, state, what):
        return statistics.median(r[what] for _, s, e, r in runs if e == engine and s == state)

    print(f"\nmedians of {a.pairs} runs, tok/s ({a.threads} threads; load: {a.load} process)")
    for what in ("decode", "prefill"):
        for engine in engines:
            cells = [f"{s} {med(engine, s, what):8.1f}" for s in states]
            line = f"{what:7} {engine:9} " + "  ".join(cells)
            if "loaded" in states:
                line += (f"  loaded/quiet {med(engine, 'loaded', what) / med(engine, 'quiet', what):.2f}"
                         f"  loaded vs xllm-t1 "
                         f"{med(engine, 'loaded', what) / med('xllm-t1', 'loaded', what):.2f}")
            print(line)
    if "baseline" in engines:
        for what in ("decode", "prefill"):
            ratios = []
            for pair in range(a.pairs):
                new = [r[what] for p, s, e, r in runs if p == pair and s == "quiet" and e == "xllm"]
                old = [r[what] for p, s, e, r in runs
                       if p == pair and s == "quiet" and e == "baseline"]
                ratios.append(new[0] / old[0])
            print(f"{what} xllm / baseline, quiet, {len(ratios)} pairs: median "
                  f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    sys.exit(main())
