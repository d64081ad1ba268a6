"""Prefill and decode speed of xllm, optionally side by side with transformers (PyTorch).

    python tools/benchmark.py --random tinyllama-1.1b --dtype bf16 --threads 2 --vs-torch
    python tools/benchmark.py --model int8-dir --vs-torch --torch-model its-hf-source-dir
    python tools/benchmark.py --model DIR --prompt-len 128 --new-tokens 128 --reps 3
    python tools/benchmark.py --model q8.gguf --vs-llama-cpp --prefill-len 512 --bandwidth
    python tools/benchmark.py --model int8-dir --vs-llama-cpp --llama-cpp-model q8.gguf

Each repetition runs xllm then (with --vs-torch) transformers fp32 and bf16 on the same weights,
so the engines alternate and share the machine's state; medians and ratios are printed. Every
engine runs in a fresh process of its own (EngineProcess), loaded and warmed up once: no engine's
threads (OpenMP's or llama.cpp's pool, which keep spinning for a while after their work) exist in
the process of another, and each OpenMP runtime starts with the settings the benchmark was
started with (not xllm's GOMP_SPINCOUNT), so each engine's figures are those it has alone.
Prefill = tokens/s over one forward pass of the prompt; decode = tokens/s of the greedy loop
(one forward + argmax per token) after it. --python-share reruns the decode loop with every
kernel replaced by a no-op to measure the time spent outside the kernels. --prefill-len N adds
a prefill-only measurement with an N-token prompt. --bandwidth measures the memory read
bandwidth (two threads summing 1 GiB) and prints the decode bound it implies: bandwidth /
bytes of weights read per token (every matrix but the embedding table, plus one embedding row).
--json PATH also writes the medians and every repetition, with the host (record_header), as a
JSON record: tools/plot_benchmarks.py draws the docs' figures from such records.
"""
import argparse
import datetime
import functools
import importlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import xllm
from xllm import _kernels
from xllm.formats.qtensor import add_activation_parts_option
from xllm.generate import HelpFormatter
from xllm.random_model import write_random_model
from xllm.hub import resolve


def random_model_dir(shape, dtype):
    """A cached random model of a preset shape (written once under $XLLM_HOME/random)."""
    home = os.environ.get("XLLM_HOME", os.path.join(os.path.expanduser("~"), ".cache", "xllm"))
    path = os.path.join(home, "random", f"{shape}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"writing random {shape} ({dtype}) to {path} ...", file=sys.stderr)
        write_random_model(path + ".tmp", shape, dtype)
        os.replace(path + ".tmp", path)
    return path


KV_BYTES = [0]  # KV-cache bytes of the last xllm run


def run_xllm(model, prompt, new_tokens):
    """(prefill tok/s, decode tok/s) of one prompt + greedy decode loop."""
    tr, K = model.transformer, _kernels.backend
    kv = tr.new_cache()
    ids = np.asarray(prompt, np.int64)
    t0 = time.perf_counter()
    logits = tr.forward(ids, kv)
    t1 = time.perf_counter()
    tok = np.zeros(1, np.int64)
    for _ in range(new_tokens):
        tok[0] = K.argmax(logits)
        logits = tr.forward(tok, kv)
    t2 = time.perf_counter()
    KV_BYTES[0] = kv.nbytes
    return len(ids) / (t1 - t0), new_tokens / (t2 - t1)


def path_bytes(path):
    """Size of a model file, or of all files of a model directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def run_torch(model, prompt, new_tokens):
    import torch
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


def run_llama_cpp(llm, prompt, new_tokens):
    """The same measurement through llama-cpp-python (llama.cpp) on the same GGUF file."""
    import llama_cpp
    n_vocab = llm.n_vocab()
    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), (n_vocab,))
        llm.eval([int(np.argmax(logits))])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


# ----------------------------------------------------------------------------- engine processes

OPENMP_PREFIXES = ("OMP_", "GOMP_", "KMP_")  # settings OpenMP runtimes read when they load

# An engine process: this script's module path, then the modules to load before any other (an
# engine's native libraries, so that their OpenMP runtime starts with the launch settings before
# an import of xllm sets its own), then serve().
WORKER = """
import importlib, sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
sys.path[:0] = conn.recv()
for module in conn.recv():
    importlib.import_module(module)
from benchmark import serve
serve(conn)
"""


def engine_environment():
    """os.environ for an engine process, with the OpenMP settings this process was started with
    (/proc/self/environ): importing xllm sets GOMP_SPINCOUNT for xllm's threads, which would
    make another engine's OpenMP threads sleep at every barrier (llama.cpp's decode lost 2-15%
    of its speed on a quiet machine here, up to half of it while the machine was busy)."""
    try:
        launch = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:  # not Linux: as it is
        return dict(os.environ)
    env = {k: v for k, v in os.environ.items() if not k.startswith(OPENMP_PREFIXES)}
    for item in map(os.fsdecode, launch):
        key, _, value = item.partition("=")
        if key.startswith(OPENMP_PREFIXES):
            env[key] = value
    return env


def serve(conn):
    """An engine process: build the engine the parent names ((module, class name, args)),
    report its `info`, then call its methods as the parent asks ((name, args) -> (True, result)
    or (False, error text)) until None."""
    module, name, args = conn.recv()
    try:
        engine = getattr(importlib.import_module(module), name)(*args)
    except BaseException as e:  # SystemExit too
        conn.send((False, _failure(e)))
        return
    conn.send((True, dict(getattr(engine, "info", {}), pid=os.getpid())))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        method, method_args = request
        try:
            conn.send((True, getattr(engine, method)(*method_args)))
        except Exception as e:
            conn.send((False, _failure(e)))


def _failure(e):
    """What the parent reports of exception `e`: one line for a user's error (a bad path, a
    missing package, a SystemExit's message), else the traceback."""
    if isinstance(e, SystemExit):
        return str(e.code)
    if isinstance(e, (OSError, ValueError, ImportError)):
        return f"{type(e).__name__}: {e}"
    return traceback.format_exc()


def _module_name(cls):
    """The name a fresh interpreter imports `cls`'s module by (a script's file name)."""
    if cls.__module__ != "__main__":
        return cls.__module__
    return Path(sys.modules["__main__"].__file__).stem


class EngineProcess:
    """engine_class(*args) in a fresh Python process of its own, loading engine_class.PRELOAD
    first (see WORKER, engine_environment); `call(name, *args)` runs its method there and returns
    the result. `info`: the engine's info dict, plus its process id. A failure there raises
    SystemExit with its message here."""

    def __init__(self, engine_class, *args):
        self.name = engine_class.__name__
        self.conn, child = multiprocessing.Pipe()
        self.process = subprocess.Popen(  # its stdout to our stderr: ours carries the tables
            [sys.executable, "-c", WORKER, str(child.fileno())], pass_fds=[child.fileno()],
            env=engine_environment(), stdout=2)
        child.close()
        self.conn.send(sys.path)
        self.conn.send(getattr(engine_class, "PRELOAD", ()))
        self.conn.send((_module_name(engine_class), engine_class.__qualname__, args))
        self.info = self._reply()

    def _reply(self):
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise SystemExit(f"{self.name}: its process died (exit {self.process.wait(10)})")
        if not ok:
            raise SystemExit(f"{self.name}: {value}")
        return value

    def call(self, method, *args):
        self.conn.send((method, args))
        return self._reply()

    def close(self):
        if self.process.poll() is None:
            self.conn.send(None)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class XllmEngine:
    """xllm's measurements on one model (built in its EngineProcess)."""

    def __init__(self, path, threads, activation_parts=None):
        self.model = xllm.load(path, threads=threads, activation_parts=activation_parts)
        self.info = {"threads": self.model.threads, "vocab_size": self.model.config.vocab_size}

    def run(self, prompt, new_tokens):
        return run_xllm(self.model, prompt, new_tokens)

    def python_share(self, prompt, new_tokens):
        return python_share(self.model, prompt, new_tokens)

    def weight_bytes_per_token(self):
        return weight_bytes_per_token(self.model)

    def memory(self):
        """(peak RSS of this process, KV-cache bytes of the last run) in bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, KV_BYTES[0]


class TorchEngine:
    """transformers (PyTorch) on a Hugging Face directory, in `dtype` ("float32", "bfloat16")."""
    PRELOAD = ("torch",)

    def __init__(self, path, dtype, threads):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def run(self, prompt, new_tokens):
        return run_torch(self.model, prompt, new_tokens)


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on a GGUF file."""
    PRELOAD = ("llama_cpp",)

    def __init__(self, path, threads, n_ctx, n_batch):
        from llama_cpp import Llama
        self.llm = Llama(path, n_threads=threads, n_threads_batch=threads, verbose=False,
                         n_ctx=n_ctx, n_batch=n_batch)

    def run(self, prompt, new_tokens):
        return run_llama_cpp(self.llm, prompt, new_tokens)


def prefill_only(run, prompt):
    """Prefill tok/s alone (no decode) of engine runner `run`."""
    return run(prompt, 0)[0]


def read_bandwidth(threads, nbytes=1 << 30, reps=5):
    """Memory read bandwidth in bytes/s: `threads` threads each OR-reducing its share of a
    buffer much larger than the caches (numpy releases the GIL in the reduction)."""
    from concurrent.futures import ThreadPoolExecutor
    buf = np.ones(nbytes // 8, np.uint64)
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, parts))
            best = max(best, nbytes / (time.perf_counter() - t))
    return best


def weight_bytes_per_token(model):
    """Bytes of weights one decode step reads: every matrix but the embedding table, one row."""
    tr = model.transformer
    mats = [getattr(layer, n) for layer in tr.layers
            for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")]
    emb = tr.tok_embeddings
    return sum(w.nbytes for w in mats + [tr.output, tr.norm]) + emb.nbytes // emb.shape[0]


def python_share(model, prompt, new_tokens):
    """Fraction of decode time spent outside the kernels (kernels stubbed out vs real)."""
    real = 1 / run_xllm(model, prompt, new_tokens)[1]
    stub = _kernels.Backend("stub", {k: (lambda *a, **kw: 0)
                                      for k in _kernels.KERNEL_NAMES + _kernels.QUANT_NAMES})
    saved, _kernels._backend = _kernels.backend, stub
    try:
        python = 1 / run_xllm(model, prompt, new_tokens)[1]
    finally:
        _kernels._backend = saved
    return python / real


GEMM_SHAPES = [(512, 2048, 2048), (512, 2048, 5632), (512, 5632, 2048), (512, 576, 1536),
               (512, 1536, 576), (16, 576, 1536), (1, 2048, 5632)]  # (M, K, N)


def gemm_table(threads, reps):
    """GFLOP/s (2*M*N*K / median time) of every kernel path on TinyLlama-1.1B and SmolLM2 shapes,
    next to numpy and torch (fp32, bf16) on the same operands."""
    from xllm.formats import qtensor as quant
    from xllm._kernels import matmul as mm, qmatmul as qm
    _kernels.set_threads(threads)
    rng = np.random.default_rng(0)
    rows = {}

    def timed(name, shape, fn):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        m, k, n = shape
        rows.setdefault(name, {})[shape] = 2 * m * n * k / statistics.median(times) / 1e9

    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    for shape in GEMM_SHAPES:
        m, k, n = shape
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.05
        out = np.empty((m, n), np.float32)
        bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)
        for kind, mod, wt, isas in (
                ("fp32", mm, w, ("avx2", "avx512")),
                ("bf16", mm, bf16, ("avx2", "avx512", "amx")),
                ("int8", qm, quant.quantize(w, 8, 32), ("avx2", "avx512vnni", "amx")),
                ("int4", qm, quant.quantize(w, 4, 32, asymmetric=True),
                 ("avx2", "avx512vnni", "amx"))):
            for isa in isas:
                try:
                    mod.set_isa(isa)
                except ValueError:
                    continue  # this CPU lacks the path
                f = mod.matmul if mod is mm else mod.qmatmul
                timed(f"xllm {kind} {isa}", shape, lambda: f(x, wt, out))
            mod._init_isa()  # back to the default path
        timed("numpy fp32", shape, lambda: np.matmul(x, w.T, out=out))
        if torch is not None:
            for name, dt in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
                tx, tw = torch.from_numpy(x).to(dt), torch.from_numpy(w).to(dt)
                timed(name, shape, lambda: torch.matmul(tx, tw.T))
    print(f"GEMM GFLOP/s, {threads} threads, median of {reps} (shapes M x K -> N)")
    print(f"  {'path':24s}" + "".join(f"{f'{m}x{k}->{n}':>16s}" for m, k, n in GEMM_SHAPES))
    for name, r in rows.items():
        print(f"  {name:24s}" + "".join(f"{r.get(sh, float('nan')):16.1f}" for sh in GEMM_SHAPES))


# ----------------------------------------------------------------------------- JSON records


def cpu_description():
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", []) where there is none."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model or platform.processor(), flags


def git_commit():
    """The commit of xllm's checkout (with "+changes" if it has uncommitted edits), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def record_header(tool, args, note):
    """What every JSON record starts with: the tool and its arguments, when, on what host, CPU
    (model, flags, the instruction sets xllm uses), its load average when the record is written
    (other work on the machine) and software, and the caller's note (e.g. "shared machine")."""
    model, flags = cpu_description()
    return {
        "tool": tool,
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "note")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": note,
        "host": {"name": platform.node(), "machine": platform.machine(),
                 "system": f"{platform.system()} {platform.release()}",
                 "cpu": model, "cpu_count": os.cpu_count(),
                 "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count(),
                 "cpu_flags": flags, "xllm_isa": _kernels.features(),
                 "load_average": [round(x, 2) for x in os.getloadavg()]},
        "software": {"python": platform.python_version(), "numpy": np.__version__,
                     "xllm": xllm.__version__, "commit": git_commit()},
    }


def write_record(path, record):
    """Write `record` as indented JSON to `path` (folders created) and say so on stderr."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model path xllm loads")
    src.add_argument("--random", choices=sorted(xllm.config.PRESETS), help="random model shape")
    src.add_argument("--gemm", action="store_true",
                     help="only the GEMM table: GFLOP/s per kernel path and shape, numpy, torch")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight dtype of the --random model")
    p.add_argument("--prompt-len", type=int, default=128, metavar="N",
                   help="prompt tokens (random ids) of each repetition")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N",
                   help="tokens of the greedy decode loop after the prompt")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads of every engine (default: all usable cores)")
    p.add_argument("--reps", type=int, default=3, metavar="N",
                   help="repetitions (engines alternate; medians are printed)")
    p.add_argument("--vs-torch", action="store_true", help="also run transformers fp32 and bf16")
    p.add_argument("--torch-model", metavar="DIR",
                   help="the Hugging Face directory transformers loads (default: the xllm model; "
                        "give the source of a quantized model to compare with it)")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same GGUF file")
    p.add_argument("--llama-cpp-model", metavar="GGUF",
                   help="the GGUF file llama.cpp runs (default: --model)")
    add_activation_parts_option(p)
    p.add_argument("--prefill-len", type=int, default=0, metavar="N",
                   help="also measure prefill alone with a prompt of this many tokens; 0 is off")
    p.add_argument("--bandwidth", action="store_true",
                   help="measure memory read bandwidth and the decode bound it implies")
    p.add_argument("--python-share", action="store_true",
                   help="measure the share of decode time spent outside the kernels")
    p.add_argument("--json", metavar="PATH",
                   help="also write the figures and the host as a JSON record to PATH")
    p.add_argument("--note", default="", metavar="TEXT",
                   help="a remark stored in the JSON record (e.g. 'shared machine')")
    a = p.parse_args(argv)
    if a.gemm:
        return gemm_table(a.threads or _kernels.default_threads(), a.reps)
    path = a.model or random_model_dir(a.random, a.dtype)  # a model name is resolved by load
    engines = {"xllm": EngineProcess(XllmEngine, path, a.threads, a.activation_parts)}
    try:
        figures = report(a, path, engines)
    finally:
        for engine in engines.values():
            engine.close()
    if a.json:
        record = record_header("benchmark", a, a.note)
        record["model"] = {"name": a.model or f"random {a.random}",
                           "format": model_format(path, a)}
        record.update(figures)
        write_record(a.json, record)


def model_format(path, a):
    """A short name of the weights' format: the --random dtype, else the GGUF file's type of
    its larger matrices (e.g. Q4_1), else "HF directory"."""
    if a.random:
        return a.dtype
    local = resolve(path)
    if str(local).endswith(".gguf"):
        from gguf import GGUFReader
        types = {}
        for t in GGUFReader(local).tensors:
            if len(t.shape) > 1:
                name = t.tensor_type.name
                types[name] = types.get(name, 0) + int(t.n_elements)
        return max(types, key=types.get) if types else "GGUF"
    return "HF directory" if os.path.isdir(local) else os.path.basename(local)


def report(a, path, engines):
    """Start the other engines beside engines["xllm"], run the repetitions, print the tables."""
    threads = engines["xllm"].info["threads"]
    vocab_size = engines["xllm"].info["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(3, vocab_size, a.prompt_len)]
    long_prompt = [int(i) for i in rng.integers(3, vocab_size, a.prefill_len)]
    if a.vs_torch:
        for name, dtype in (("torch fp32", "float32"), ("torch bf16", "bfloat16")):
            engines[name] = EngineProcess(TorchEngine, a.torch_model or path, dtype, threads)
    if a.vs_llama_cpp:
        n_ctx = max(a.prompt_len + a.new_tokens, a.prefill_len) + 8
        engines["llama.cpp"] = EngineProcess(LlamaCppEngine, resolve(a.llama_cpp_model or path),
                                             threads, n_ctx, max(512, a.prompt_len, a.prefill_len))
    runners = {name: functools.partial(engine.call, "run") for name, engine in engines.items()}
    for run in runners.values():
        run(prompt[:8], 2)  # warm up (page in the weights)
    results = {k: [] for k in runners}
    for r in range(a.reps):
        for name, run in runners.items():
            pre, dec = run(prompt, a.new_tokens)
            long = prefill_only(run, long_prompt) if a.prefill_len else float("nan")
            results[name].append((pre, dec, long))
            print(f"rep {r}: {name:10s} prefill {pre:8.1f} tok/s  decode {dec:7.2f} tok/s"
                  + (f"  prefill@{a.prefill_len} {long:8.1f} tok/s" if a.prefill_len else ""),
                  file=sys.stderr)
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in results.items()}
    parts = f"  activation parts: {a.activation_parts}" if a.activation_parts else ""
    print(f"model: {a.model or a.random + ' ' + a.dtype}  threads: {threads}  prompt: "
          f"{a.prompt_len}  new tokens: {a.new_tokens}  reps: {a.reps} (medians){parts}")
    for name, (pre, dec, long) in med.items():
        line = f"  {name:10s} prefill {pre:8.1f} tok/s  decode {dec:7.2f} tok/s"
        if a.prefill_len:
            line += f"  prefill@{a.prefill_len} {long:8.1f} tok/s"
        if name != "xllm":
            x = med["xllm"]
            line += f"   xllm/{name}: prefill {x[0] / pre:.2f}x  decode {x[1] / dec:.2f}x"
            if a.prefill_len:
                line += f"  prefill@{a.prefill_len} {x[2] / long:.2f}x"
        print(line)
    xllm_engine = engines["xllm"]
    rss, kv_bytes = xllm_engine.call("memory")
    size = path_bytes(resolve(path))
    print(f"  peak RSS (xllm's process): {rss / 2**20:.0f} MiB; model files {size / 2**20:.0f} "
          f"MiB, KV cache {kv_bytes / 2**20:.0f} MiB: RSS / (1.2 x files + KV) = "
          f"{rss / (1.2 * size + kv_bytes):.2f}")
    if a.bandwidth:
        bw, nb = read_bandwidth(threads), xllm_engine.call("weight_bytes_per_token")
        print(f"  read bandwidth ({threads} threads, 1 GiB): {bw / 1e9:.1f} GB/s; weights read "
              f"per token: {nb / 1e6:.1f} MB; decode bound {bw / nb:.1f} tok/s; xllm decode is "
              f"{med['xllm'][1] / (bw / nb):.0%} of it")
    figures = {"threads": threads, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
               "prefill_len": a.prefill_len, "reps": a.reps,
               "engines": {name: _engine_figures(med[name], results[name])
                           for name in results},
               "xllm_peak_rss_bytes": rss, "model_file_bytes": size}
    if a.python_share:
        shares = [xllm_engine.call("python_share", prompt, a.new_tokens) for _ in range(a.reps)]
        print(f"  python share of decode time (outside kernels): {statistics.median(shares):.1%}")
        figures["python_share"] = statistics.median(shares)
    return figures


def _engine_figures(medians, reps):
    """One engine's figures in a JSON record: medians and every repetition (tok/s; None for a
    prefill-only run that was not asked for)."""
    def number(x):
        return None if x != x else round(x, 3)  # NaN is not JSON
    keys = ("prefill_tok_s", "decode_tok_s", "prefill_only_tok_s")
    return {**{k: number(v) for k, v in zip(keys, medians)},
            "reps": [{k: number(v) for k, v in zip(keys, rep)} for rep in reps]}


if __name__ == "__main__":
    main()
