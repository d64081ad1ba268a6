"""Batched generation speed of xllm: B prompts of a file run as one batch (greedy).

    python tools/benchmark_batch.py --model /tmp/q/smollm2-int8 --file benchmarks/prompts.txt \\
        --batch 16 --max-new-tokens 64 --single --threads 2
    python tools/benchmark_batch.py --random tiny --batch 8 --max-new-tokens 16 --raw --profile

The first B lines of --file (cycled when B is larger) are rendered with the model's chat template
(unless --raw or the model has none) and generated together by xllm.engine.generation.generate_ids,
greedy, stopping at the end-of-sequence ids or after --max-new-tokens. Every token is timestamped:

- prefill tok/s = prompt tokens of all sequences / time from the start until every sequence has
  its first token (the first forward_batch over all prompts, plus sampling the first tokens);
- decode tok/s = tokens generated after each sequence's first / time from then to the end (one
  forward_batch per step over the sequences still running, plus sampling);
- overall tok/s = all generated tokens / wall time;
- per sequence: time to first token and total time (until its last token was sampled, or the
  end-of-sequence id that stopped it), as median / p90 / max over the sequences.

Sequences that stop at an end-of-sequence id count only the tokens they generated. --single also
runs the same prompts one at a time (batch 1, same limits) after each batch run (batch, singles,
batch, singles, ... for --reps repetitions; medians are printed) and prints the aggregate/single
ratios, and whether the batch produced the same tokens as the single runs. --profile adds one
batch run with every kernel timed (prefill and decode separately; the rest is Python).
--llama-cpp-model GGUF runs the same prompt ids through llama.cpp's batch API after each xllm
run (tools/llama_cpp_batch.py; with --single, also one prompt at a time). Each engine runs in a
process of its own (benchmark.EngineProcess), so neither finds the other's threads beside it.
--json PATH also writes the medians, the host and its CPU flags as a JSON record
(tools/plot_benchmarks.py draws batch throughput against batch size from such records).
"""
import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

import xllm
from xllm import _kernels
from xllm.engine.generation import generate_ids
from xllm.engine.sampling import Sampler, SamplingParams
from xllm.hub import resolve

from xllm.generate import HelpFormatter

from benchmark import EngineProcess, path_bytes, random_model_dir, record_header, write_record

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks",
                            "prompts.txt")


def read_prompts(path, n):
    """The first n non-empty lines of `path`, cycling through the file when n is larger."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"{path}: no prompts")
    return [lines[i % len(lines)] for i in range(n)], len(lines)


def encode_prompts(model, texts, raw):
    """Token ids of each prompt: the chat template with one user message, or the raw text."""
    tok = model.tokenizer
    if tok is None:
        raise SystemExit("this model has no tokenizer")
    if not raw and model.chat_template:
        return [model.chat_ids([{"role": "user", "content": t}]) for t in texts]
    add_bos = getattr(tok, "add_bos_default", True)
    return [tok.encode(t, add_bos=add_bos) for t in texts]


class TimedSampler:
    """Greedy sampler that remembers when it was last called and what it returned."""

    def __init__(self):
        self.sampler = Sampler(SamplingParams())
        self.last_time, self.last_token = None, None

    def __call__(self, logits, history):
        self.last_token = token = self.sampler(logits, history)
        self.last_time = time.perf_counter()
        return token


PHASE = ["prefill"]  # which phase the kernel profile is charging (see profile_kernels)


def run_batch(model, prompts, max_new_tokens, stop_ids):
    """Generate `prompts` (lists of token ids) as one batch; the timings of every token."""
    tr = model.transformer
    calls, kv_peak = [], [0]
    forward_batch = tr.forward_batch

    def timed_forward_batch(seqs, kvs, out):
        PHASE[0] = "prefill" if not calls else "decode"
        t = time.perf_counter()
        r = forward_batch(seqs, kvs, out)
        calls.append((t, time.perf_counter(), len(seqs)))
        kv_peak[0] = max(kv_peak[0], sum(kv.nbytes for kv in kvs))
        return r

    n = len(prompts)
    samplers = [TimedSampler() for _ in range(n)]
    first, last = [None] * n, [None] * n
    tokens = [[] for _ in range(n)]
    tr.forward_batch = timed_forward_batch  # an instance attribute shadows the method
    try:
        t0 = time.perf_counter()
        for i, token in generate_ids(tr, prompts, max_new_tokens, samplers, stop_ids):
            now = time.perf_counter()
            if first[i] is None:
                first[i] = now
            last[i] = now
            tokens[i].append(int(token))
        t_end = time.perf_counter()
    finally:
        del tr.forward_batch
    # Every first token is sampled before the second forward_batch starts.
    boundary = calls[1][0] if len(calls) > 1 else t_end
    generated = [len(t) for t in tokens]
    started = sum(g > 0 for g in generated)
    decode_tokens = sum(generated) - started
    decode_seconds = t_end - boundary
    ends = [s.last_time if s.last_time is not None else t_end for s in samplers]
    eos = sum(s.last_token in stop_ids for s in samplers)
    return {
        "prompt_tokens": sum(len(p) for p in prompts),
        "generated": sum(generated),
        "prefill_seconds": boundary - t0,
        "prefill_forward_seconds": calls[0][1] - calls[0][0] if calls else 0.0,
        "decode_seconds": decode_seconds,
        "decode_tokens": decode_tokens,
        "decode_forward_seconds": sum(b - a for a, b, _ in calls[1:]),
        "decode_steps": len(calls) - 1,
        "wall_seconds": t_end - t0,
        "ttft": [f - t0 for f in first if f is not None],
        "total": [e - t0 for e in ends],
        "eos": eos,
        "empty": n - started,
        "kv_peak": kv_peak[0],
        "tokens": tokens,
    }


def rates(r):
    """tok/s figures of one run_batch result (nan where there was nothing to time)."""
    def div(a, b):
        return a / b if b > 0 and a > 0 else float("nan")
    return {"prefill": div(r["prompt_tokens"], r["prefill_seconds"]),
            "decode": div(r["decode_tokens"], r["decode_seconds"]),
            "overall": div(r["generated"], r["wall_seconds"]),
            "wall": r["wall_seconds"]}


def run_singles(run, prompts):
    """The prompts one at a time (run([prompt]) is a batch of 1): summed tokens and times, as
    one result."""
    runs = [run([p]) for p in prompts]
    s = {k: sum(r[k] for r in runs) for k in ("prompt_tokens", "generated", "prefill_seconds",
                                              "decode_seconds", "decode_tokens", "wall_seconds")}
    s["total"] = [r["total"][0] for r in runs]
    s["tokens"] = [r["tokens"][0] for r in runs]
    return s


def latency(values):
    """(median, p90, max) of a list of seconds (nan if empty)."""
    if not values:
        return (float("nan"),) * 3
    return (statistics.median(values), float(np.percentile(values, 90)), max(values))


def profile_kernels(model, prompts, max_new_tokens, stop_ids):
    """One batch run with every kernel timed: {phase: {kernel: [calls, seconds]}}, and the run."""
    K = _kernels.backend
    names = [k for k in _kernels.KERNEL_NAMES + _kernels.QUANT_NAMES if hasattr(K, k)]
    saved = {k: getattr(K, k) for k in names}
    prof = {"prefill": {}, "decode": {}}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            r = fn(*args, **kwargs)
            entry = prof[PHASE[0]].setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            return r
        return timed

    for k in names:
        setattr(K, k, wrap(k, saved[k]))
    try:
        r = run_batch(model, prompts, max_new_tokens, stop_ids)
    finally:
        for k, fn in saved.items():
            setattr(K, k, fn)
    return prof, r


def print_profile(prof, r):
    print("kernel profile (one extra batch run, timers around every kernel call):")
    for phase, wall in (("prefill", r["prefill_seconds"]), ("decode", r["decode_seconds"])):
        if wall <= 0:
            continue
        kernels = sorted(prof[phase].items(), key=lambda kv: -kv[1][1])
        inside = sum(s for _, (_, s) in kernels)
        print(f"  {phase}: {wall:.3f} s; kernels {inside / wall:.1%}, Python and the rest "
              f"{1 - inside / wall:.1%}")
        for name, (calls, secs) in kernels:
            if secs / wall >= 0.001:
                print(f"    {name:25s} {secs:8.3f} s {secs / wall:6.1%}  {calls:7d} calls  "
                      f"{secs / calls * 1e6:8.1f} us/call")


class XllmBatch:
    """xllm's side of the benchmark, built in its EngineProcess: the model, the prompts' ids
    (info["prompts"]) and the runs."""

    def __init__(self, path, threads, kv_dtype, texts, raw):
        model = xllm.load(path, threads=threads, **({"kv_dtype": kv_dtype} if kv_dtype else {}))
        self.model = model
        c = model.config
        self.stop_ids = frozenset(i for i in (c.eos_token_id, *c.extra_eos_token_ids)
                                  if i is not None)
        self.info = {"threads": model.threads, "max_seq_len": c.max_seq_len,
                     "templated": not raw and model.chat_template is not None,
                     "prompts": encode_prompts(model, texts, raw)}

    def run(self, prompts, max_new_tokens):
        return run_batch(self.model, prompts, max_new_tokens, self.stop_ids)

    def profile(self, prompts, max_new_tokens):
        return profile_kernels(self.model, prompts, max_new_tokens, self.stop_ids)

    def peak_rss(self):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH|NAME",
                     help="a model path xllm loads (or a registered model name)")
    src.add_argument("--random", choices=sorted(xllm.config.PRESETS), help="random model shape")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight dtype of the --random model")
    p.add_argument("--file", default="benchmarks/prompts.txt", metavar="PATH",
                   help="prompts, one per line")
    p.add_argument("--batch", type=int, default=16, metavar="N",
                   help="number of prompts run together")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="new tokens per sequence at most (greedy)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="kernel threads (default: all usable cores)")
    p.add_argument("--kv-dtype", default=None, choices=["float32", "float16"],
                   help="KV-cache storage (default: xllm.load's)")
    p.add_argument("--raw", action="store_true", help="plain text prompts (no chat template)")
    p.add_argument("--reps", type=int, default=1, metavar="N",
                   help="repetitions (medians are printed)")
    p.add_argument("--single", action="store_true",
                   help="also run the prompts one at a time and print aggregate/single ratios")
    p.add_argument("--profile", action="store_true",
                   help="add one batch run with per-kernel timers (prefill and decode)")
    p.add_argument("--llama-cpp-model", metavar="GGUF",
                   help="also run the same prompt ids through llama.cpp's batch API (and alone "
                        "with --single), side by side with xllm in every repetition")
    p.add_argument("--json", metavar="PATH",
                   help="also write the figures and the host as a JSON record to PATH")
    p.add_argument("--note", default="", metavar="TEXT",
                   help="a remark stored in the JSON record (e.g. 'shared machine')")
    a = p.parse_args(argv)
    if a.batch < 1 or a.max_new_tokens < 1 or a.reps < 1:
        p.error("--batch, --max-new-tokens and --reps must be >= 1")

    path = a.model or random_model_dir(a.random, a.dtype)
    if a.file == "benchmarks/prompts.txt" and not os.path.exists(a.file):
        a.file = DEFAULT_FILE  # the repository's, from any working directory
    texts, n_lines = read_prompts(a.file, a.batch)
    engines = {"xllm": EngineProcess(XllmBatch, path, a.threads, a.kv_dtype, texts, a.raw)}
    try:
        figures = report(a, path, n_lines, engines)
    finally:
        for engine in engines.values():
            engine.close()
    if a.json:
        record = record_header("benchmark_batch", a, a.note)
        record["model"] = {"name": a.model or f"random {a.random} {a.dtype}"}
        record.update(figures)
        write_record(a.json, record)


def report(a, path, n_lines, engines):
    """Start llama.cpp beside engines["xllm"] if asked, run the repetitions, print the tables."""
    xw = engines["xllm"]
    threads, templated = xw.info["threads"], xw.info["templated"]
    room = xw.info["max_seq_len"] - a.max_new_tokens
    if room < 1:
        raise SystemExit(f"--max-new-tokens {a.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {xw.info['max_seq_len']}")
    cut = sum(len(q) > room for q in xw.info["prompts"])
    prompts = [np.asarray(q[:room], np.int64) for q in xw.info["prompts"]]

    def runner(engine):  # a batch of prompts in one engine process: run_batch's result
        return lambda prompts: engine.call("run", prompts, a.max_new_tokens)

    xw.call("run", prompts[:2], 2)  # warm up (page in the weights)
    batch_runs, single_runs, lc_runs, lc_single_runs = [], [], [], []
    lc = None
    if a.llama_cpp_model:
        from llama_cpp_batch import LlamaCppBatch
        lc = engines["llama.cpp"] = EngineProcess(
            LlamaCppBatch, a.llama_cpp_model, a.batch,
            max(len(q) for q in prompts) + a.max_new_tokens, threads,
            sum(len(q) for q in prompts))
        lc.call("run", prompts[:2], 2)
    for rep in range(a.reps):
        r = runner(xw)(prompts)
        batch_runs.append(r)
        x = rates(r)
        print(f"rep {rep}: batch {a.batch:3d}  prefill {x['prefill']:8.1f} tok/s  decode "
              f"{x['decode']:8.1f} tok/s  wall {x['wall']:6.2f} s", file=sys.stderr)
        if a.single:
            s = run_singles(runner(xw), prompts)
            single_runs.append(s)
            x = rates(s)
            print(f"rep {rep}: single     prefill {x['prefill']:8.1f} tok/s  decode "
                  f"{x['decode']:8.1f} tok/s  wall {x['wall']:6.2f} s", file=sys.stderr)
        if lc is not None:
            lc_runs.append(runner(lc)(prompts))
            if a.single:
                lc_single_runs.append(run_singles(runner(lc), prompts))
            x = rates(lc_runs[-1])
            print(f"rep {rep}: llama.cpp batch prefill {x['prefill']:8.1f} tok/s  decode "
                  f"{x['decode']:8.1f} tok/s", file=sys.stderr)

    def med(runs, f):
        return statistics.median(f(r) for r in runs)

    lens = sorted(len(q) for q in prompts)
    r0 = batch_runs[0]
    label = (a.model or f"random {a.random} {a.dtype}")
    print(f"model: {label}  threads: {threads}  batch: {a.batch} (of {n_lines} prompts in "
          f"{os.path.basename(a.file)})  {'chat template' if templated else 'raw text'}  "
          f"max new tokens: {a.max_new_tokens}  reps: {a.reps}" + (" (medians)" if a.reps > 1
                                                                  else ""))
    print(f"prompt tokens: {r0['prompt_tokens']} (per sequence min {lens[0]}, median "
          f"{statistics.median(lens):g}, max {lens[-1]})"
          + (f"; {cut} prompts cut to {room} tokens" if cut else ""))
    print(f"generated: {r0['generated']} tokens ({a.batch - r0['eos']} sequences reached the "
          f"limit, {r0['eos']} stopped at end-of-sequence"
          + (f", {r0['empty']} of them at once" if r0["empty"] else "") + ")")
    cols = ("prefill", "decode", "overall", "wall")
    print(f"  {'':22s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'overall tok/s':>14s} "
          f"{'wall s':>8s}")
    def medians(runs, label):  # print one row of medians, return them
        x = {k: med(runs, lambda r: rates(r)[k]) for k in cols}
        print(f"  {label:22s} {x['prefill']:14.1f} {x['decode']:13.1f} {x['overall']:14.1f} "
              f"{x['wall']:8.2f}")
        return x

    def ratios(label, x, y, faster=""):
        print(f"  {label:22s} {x['prefill'] / y['prefill']:13.2f}x "
              f"{x['decode'] / y['decode']:12.2f}x {x['overall'] / y['overall']:13.2f}x" + faster)

    b = medians(batch_runs, f"aggregate (batch {a.batch})")
    figures = {"threads": threads, "batch": a.batch, "max_new_tokens": a.max_new_tokens,
               "templated": templated, "prompt_tokens": r0["prompt_tokens"],
               "generated": r0["generated"], "reps": a.reps, "xllm_batch": _json_rates(b)}
    if single_runs:
        s = medians(single_runs, "single (batch 1)")
        ratios("aggregate / single", b, s, f" {s['wall'] / b['wall']:7.2f}x faster")
        figures["xllm_single"] = _json_rates(s)
    if lc_runs:
        lb = medians(lc_runs, f"llama.cpp batch {a.batch}")
        figures["llama_cpp_batch"] = _json_rates(lb)
        if lc_single_runs:
            ls = medians(lc_single_runs, "llama.cpp single")
            ratios("llama.cpp batch/single", lb, ls)
            figures["llama_cpp_single"] = _json_rates(ls)
        ratios("xllm / llama.cpp batch", b, lb)
    print(f"  {'latency per sequence':22s} {'median':>8s} {'p90':>8s} {'max':>8s}")
    rows = [("time to first token s", [latency(r["ttft"]) for r in batch_runs]),
            ("total time s", [latency(r["total"]) for r in batch_runs])]
    if single_runs:
        rows.append(("alone: total s", [latency(r["total"]) for r in single_runs]))
    for name, lat in rows:
        m = [statistics.median(x[j] for x in lat) for j in range(3)]
        print(f"  {name:22s} {m[0]:8.3f} {m[1]:8.3f} {m[2]:8.3f}")
    steps = r0["decode_steps"]
    share = med(batch_runs, lambda r: r["decode_forward_seconds"] / r["decode_seconds"]
                if r["decode_seconds"] > 0 else float("nan"))
    print(f"decode: {steps} steps, {r0['decode_tokens'] / max(steps, 1):.1f} sequences per step "
          f"on average; forward_batch {share:.1%} of decode time (the rest: sampling, Python); "
          f"first forward_batch {med(batch_runs, lambda r: r['prefill_forward_seconds']):.3f} s "
          f"of prefill {med(batch_runs, lambda r: r['prefill_seconds']):.3f} s")
    if single_runs:
        same = all(r["tokens"] == s["tokens"] for r in batch_runs for s in single_runs)
        print(f"batch tokens identical to the single runs: {'yes' if same else 'NO'}")
    if a.profile:
        print_profile(*xw.call("profile", prompts, a.max_new_tokens))
    rss = xw.call("peak_rss")
    files = path_bytes(resolve(path))
    print(f"peak RSS (xllm's process): {rss / 2**20:.0f} MiB (model files "
          f"{files / 2**20:.0f} MiB; KV-cache capacity reserved by the batch at its peak "
          f"{r0['kv_peak'] / 2**20:.0f} MiB, of which only the rows written are resident)")
    figures["xllm_peak_rss_bytes"] = rss
    return figures


def _json_rates(x):
    """A medians row (tok/s and wall seconds) as JSON numbers (NaN becomes None)."""
    return {f"{k}_tok_s" if k != "wall" else "wall_s": (None if v != v else round(v, 3))
            for k, v in x.items()}


if __name__ == "__main__":
    main()
