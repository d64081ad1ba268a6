"""Many threads, one model: every result must be bitwise what the same call gives alone.

    python tools/stress_threads.py --model smollm2-135m-instruct --threads 8 --calls 25 --reps 20

Each of `--threads` Python threads makes `--calls` mixed calls (generate, streamed generate,
chat, batched generate, logits, seeded sampling or greedy) on one shared model. First every
call runs alone, one after another (the reference results and the sequential time), then all
threads run theirs at once; this repeats `--reps` times. It prints, per repetition, how many
results differed from the reference, the exceptions raised and concurrent / sequential
throughput (above 1: concurrent decode steps were batched together). Exit code 1 on any
difference or exception.
"""
import argparse
import random
import sys
import threading
import time

import numpy as np


PROMPTS = ["Once upon a time", "The little dog", "What is the capital of France?",
           "Tom and Lily went to the park.", "Write a haiku about the sea", "1, 2, 3,"]


def make_calls(model, n, seed, max_new_tokens):
    """n (name, function) pairs of mixed calls; each function returns a comparable result."""
    rng = random.Random(seed)
    calls = []
    for k in range(n):
        kind = rng.choice(["generate", "stream", "chat", "batch", "logits"])
        prompt = rng.choice(PROMPTS)
        kw = dict(max_new_tokens=rng.randint(1, max_new_tokens))
        if rng.random() < 0.5:
            kw.update(temperature=0.8, top_p=0.9, seed=rng.randint(0, 1000))
        calls.append((f"{kind} {k}", _call(model, kind, prompt, kw)))
    return calls


def _call(model, kind, prompt, kw):
    if kind == "generate":
        return lambda: model.generate(prompt, **kw)
    if kind == "stream":
        return lambda: list(model.generate(prompt, stream=True, **kw))
    if kind == "chat":
        from xllm.chat import CHATML
        messages = [{"role": "user", "content": prompt}]
        template = None if model.chat_template else CHATML
        return lambda: model.chat(messages, template=template, **kw)
    if kind == "batch":
        return lambda: model.generate_batch([prompt, prompt[::-1], "Hello"], **kw)
    ids = model.tokenizer.encode(prompt, add_bos=True)
    return lambda: model.logits(ids).tobytes()


def run_concurrently(per_thread):
    """Run each thread's list of calls in its own thread; (results, errors, seconds)."""
    results = [[None] * len(calls) for calls in per_thread]
    errors = []
    start = threading.Barrier(len(per_thread))

    def worker(t):
        start.wait()
        for j, (name, fn) in enumerate(per_thread[t]):
            try:
                results[t][j] = fn()
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"thread {t}, {name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(per_thread))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, errors, time.perf_counter() - t0


def stress(model, threads=8, calls=25, reps=1, max_new_tokens=24, seed=0, log=print):
    """Run the check `reps` times; returns a list of dicts (differences, errors, ratio)."""
    out = []
    for rep in range(reps):
        per_thread = [make_calls(model, calls, seed + 1000 * rep + t, max_new_tokens)
                      for t in range(threads)]
        t0 = time.perf_counter()
        alone = [[fn() for _, fn in thread_calls] for thread_calls in per_thread]
        sequential = time.perf_counter() - t0
        together, errors, concurrent = run_concurrently(per_thread)
        diffs = [f"thread {t}, {per_thread[t][j][0]}"
                 for t in range(threads) for j in range(calls)
                 if together[t][j] is not None and together[t][j] != alone[t][j]]
        row = dict(rep=rep, differences=diffs, errors=errors, sequential=sequential,
                   concurrent=concurrent, speed=sequential / concurrent)
        log(f"rep {rep}: {threads} threads x {calls} calls: {len(diffs)} different, "
            f"{len(errors)} exceptions; sequential {sequential:.2f} s, concurrent "
            f"{concurrent:.2f} s ({row['speed']:.2f}x)")
        for line in (diffs + errors)[:10]:
            log("  " + line)
        out.append(row)
    return out


def main(argv=None):
    import xllm
    from xllm.generate import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a model path or name xllm loads")
    p.add_argument("--tokenizer", help="tokenizer file if the model has none next to it")
    p.add_argument("--threads", type=int, default=8, help="Python threads calling the model")
    p.add_argument("--calls", type=int, default=25, help="calls per thread")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions of the alone-then-together rounds")
    p.add_argument("--max-new-tokens", type=int, default=24, help="new tokens per call at most")
    p.add_argument("--kernel-threads", type=int, help="the model's kernel threads")
    a = p.parse_args(argv)
    model = xllm.load(a.model, tokenizer=a.tokenizer, threads=a.kernel_threads)
    rows = stress(model, a.threads, a.calls, a.reps, a.max_new_tokens)
    bad = sum(len(r["differences"]) + len(r["errors"]) for r in rows)
    speeds = [r["speed"] for r in rows]
    print(f"{len(rows)} repetitions: {bad} differences or exceptions in all; concurrent/"
          f"sequential speed median {np.median(speeds):.2f}x (min {min(speeds):.2f}, "
          f"max {max(speeds):.2f})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
