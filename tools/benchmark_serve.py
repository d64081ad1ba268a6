"""Load benchmark for OpenAI-compatible servers: many concurrent streaming requests.

    python tools/benchmark_serve.py --url http://127.0.0.1:8000 --concurrency 16 --requests 64
        [--prompts benchmarks/prompts.txt] [--max-tokens 128] [--chat]

Or let it start the server (and stop it after), each in its own process, on a free port:

    python tools/benchmark_serve.py --start xllm --model smollm2-135m-instruct --threads 2 ...
    python tools/benchmark_serve.py --start llama-server --llama-server BIN --model M.gguf ...
    python tools/benchmark_serve.py --start llama-cpp-python --model M.gguf ...

and, for the same prompts as one offline batch in this process: ``--offline`` (xllm only).

Scenarios other than plain throughput (``--scenario``):

* ``latency``: 8 streams decode; a new ~1,000-token prompt arrives. Reports the streams'
  inter-token latency p95 during its prefill against their median before it, and its time to
  first token against the same-length prompt's on the idle server.
* ``prefix``: a ~500-token system prompt shared by 16 requests sent one after another: the
  later requests' time to first token against the first's; with ``--start xllm`` also checks
  that the answers equal those of a server without the prefix cache.
* ``soak``: ``--requests`` short requests (``--max-tokens`` <= 16); with ``--start``, the
  server's resident memory after the first quarter and at the end.

Prints output tokens per second (all streams together), time to first token and inter-token
latency (p50 and p95), errors, and this client's own CPU use (it shares the machine with the
server: one asyncio process, httpx, no per-token work but timing). Requests are greedy
(temperature 0); the client goes to 127.0.0.1 only, and every request and the whole run are
bounded in time."""
import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts.txt"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def read_prompts(path, n):
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise SystemExit(f"{path}: no prompts")
    return [lines[i % len(lines)] for i in range(n)]


class Result:
    """What one streamed request measured."""

    def __init__(self):
        self.ttft = None
        self.gaps = []
        self.times = []  # when each piece arrived (perf_counter)
        self.text = ""
        self.tokens = 0
        self.error = None


async def one_request(client, url, prompt, args, result):
    body = prompt if isinstance(prompt, dict) else request_body(prompt, args)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    started = time.perf_counter()
    last = None
    usage_tokens = None
    try:
        async with client.stream("POST", url + path, json=body,
                                 timeout=args.request_timeout) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"].get("message"))
                    return
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices", []):
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    result.times.append(now)
                    result.text += text
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += 1
    except Exception as error:  # a timeout or a broken connection: count it, go on
        result.error = f"{type(error).__name__}: {error}"
    if usage_tokens is not None:
        result.tokens = usage_tokens


def request_body(prompt, args, max_tokens=None, chat=None):
    chat = args.chat if chat is None else chat
    if chat:
        if isinstance(prompt, list):
            body = {"messages": prompt}
        else:
            body = {"messages": [{"role": "user", "content": prompt}]}
    else:
        body = {"prompt": prompt}
    body.update(model=args.model_name, temperature=0.0, stream=True,
                max_tokens=args.max_tokens if max_tokens is None else max_tokens,
                stream_options={"include_usage": True}, ignore_eos=args.ignore_eos)
    return body


async def run_load(url, prompts, args):
    import httpx
    limits = httpx.Limits(max_connections=args.concurrency)
    results = [Result() for _ in prompts]
    gate = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def guarded(prompt, result):
        async with gate:
            await one_request(client, url, prompt, args, result)

    async with httpx.AsyncClient(limits=limits, headers=headers, trust_env=False) as client:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(guarded(p, r)) for p, r in zip(prompts, results)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - started
    for task, result in zip(tasks, results):
        if task in pending:
            result.error = "cut by --max-duration"
    return results, wall


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report(label, results, wall, cpu_seconds):
    tokens = sum(r.tokens for r in results if r.error is None)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps]
    errors = [r.error for r in results if r.error is not None]
    line = {"server": label, "requests": len(results), "errors": len(errors),
            "output_tokens": tokens, "seconds": round(wall, 3),
            "output_tok_per_s": round(tokens / wall, 2) if wall else 0.0,
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
            "ttft_p95_ms": round(1000 * percentile(ttfts, 95), 1),
            "itl_p50_ms": round(1000 * percentile(gaps, 50), 2),
            "itl_p95_ms": round(1000 * percentile(gaps, 95), 2),
            "client_cpu_percent": round(100 * cpu_seconds / wall, 1) if wall else 0.0}
    print(json.dumps(line))
    for error in sorted(set(errors))[:5]:
        print(f"  error: {error}", file=sys.stderr)
    return line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port):
    if args.start == "xllm":
        return [sys.executable, "-m", "xllm.serve", "--model", args.model, "--port", str(port),
                "--threads", str(args.threads), "--served-model-name", args.model_name,
                *getattr(args, "extra_server_args", [])]
    if args.start == "llama-server":
        if not args.llama_server:
            raise SystemExit("--start llama-server needs --llama-server BIN "
                             "(../shared/bench/build-llama-server.sh prints it)")
        return [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.concurrency), "-c", str(args.concurrency * args.slot_context),
                "-t", str(args.threads), "-tb", str(args.threads), "--alias", args.model_name]
    if args.start == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host",
                "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                "--n_threads_batch", str(args.threads), "--n_ctx", str(args.slot_context),
                "--interrupt_requests", "False", "--model_alias", args.model_name]
    raise SystemExit(f"unknown server {args.start!r}")


def start_server(args):
    port = free_port()
    command = server_command(args, port)
    # the server's log goes to a file: a pipe nobody reads would fill and stop the server
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{command[0]} exited with {process.returncode}:\n"
                             f"{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1) as r:
                if r.status == 200:
                    return url, process
        except OSError:
            time.sleep(0.25)
    stop_server(process)
    raise SystemExit(f"{command[0]} did not answer within {args.start_timeout} s")


def stop_server(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.log.close()


def offline(args, prompts):
    """The same prompts generated as one batch in this process (the engine's loop without
    the server), greedy, ignoring the end-of-sequence token unless --stop-at-eos: output
    tokens per second."""
    import xllm
    from xllm.engine.generation import generate_ids
    from xllm.engine.sampling import Sampler, SamplingParams
    model = xllm.load(args.model, threads=args.threads, prefix_cache_mb=0)
    if args.chat:
        ids = [model.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [model.encode_prompt(p) for p in prompts]
    stop_ids = ()
    if not args.ignore_eos:
        c = model.config
        stop_ids = {i for i in (c.eos_token_id, *c.extra_eos_token_ids) if i is not None}
    samplers = [Sampler(SamplingParams()) for _ in ids]
    started = time.perf_counter()
    tokens = sum(1 for _ in generate_ids(model.transformer, ids, args.max_tokens, samplers,
                                         stop_ids))
    wall = time.perf_counter() - started
    line = {"server": "offline batch", "requests": len(prompts), "output_tokens": tokens,
            "seconds": round(wall, 3), "output_tok_per_s": round(tokens / wall, 2)}
    print(json.dumps(line))
    return line


CHARS_PER_TOKEN = 4.5


def long_text(tokens_wanted, seed_sentence):
    """About `tokens_wanted` tokens of English (4.5 characters a token, as SmolLM2's and
    Llama's tokenizers split benchmarks/prompts.txt), beginning with
    `seed_sentence` so that two such texts share no prefix."""
    base = DEFAULT_PROMPTS.read_text(encoding="utf-8").split()
    words = seed_sentence.split()
    i = 0
    while sum(len(w) + 1 for w in words) < CHARS_PER_TOKEN * tokens_wanted:
        words.append(base[i % len(base)])
        i += 1
    return " ".join(words)


async def scenario_latency(url, args, round_=0):
    """Inter-token latency of 8 decoding streams while a ~1,000-token prompt is prefilled.
    Each round's prompts begin with the round's number: no round finds another's prefix in
    the server's cache."""
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(headers=headers, trust_env=False, timeout=None) as client:
        idle = Result()
        await one_request(client, url, request_body(long_text(1000, f"Alpha {round_}."), args,
                                                    1), args, idle)
        streams = [Result() for _ in range(8)]
        tasks = [asyncio.ensure_future(one_request(
            client, url, request_body(f"Story number {i} of round {round_}: once upon a time",
                                      args, 2000, chat=False), args, r))
            for i, r in enumerate(streams)]
        while min(len(r.times) for r in streams) < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        before_end = time.perf_counter()
        new = Result()
        sent = time.perf_counter()
        await one_request(client, url, request_body(long_text(1000, f"Bravo {round_}."), args,
                                                    1), args, new)
        first_token = time.perf_counter()
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        before = [b - a for r in streams for a, b in zip(r.times, r.times[1:])
                  if b <= before_end and a >= before_end - 2.0]
        during = [b - a for r in streams for a, b in zip(r.times, r.times[1:])
                  if sent <= b <= first_token]
    line = {"scenario": "latency", "idle_prefill_ms": round(1000 * idle.ttft, 1),
            "ttft_under_load_ms": round(1000 * new.ttft, 1),
            "ttft_ratio": round(new.ttft / idle.ttft, 2),
            "itl_median_before_ms": round(1000 * statistics.median(before), 2),
            "itl_p95_during_ms": round(1000 * percentile(during, 95), 2),
            "itl_ratio": round(percentile(during, 95) / statistics.median(before), 2),
            "gaps_during": len(during)}
    print(json.dumps(line))
    return line


async def scenario_prefix(url, args):
    """Time to first token of 16 requests that share a ~500-token system prompt."""
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    system = long_text(500, "You are a careful assistant for a public library.")
    questions = read_prompts(args.prompts, 16)
    results = []
    async with httpx.AsyncClient(headers=headers, trust_env=False, timeout=None) as client:
        for question in questions:
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": question}]
            result = Result()
            await one_request(client, url, request_body(messages, args, chat=True), args,
                              result)
            results.append(result)
    first = results[0].ttft
    later = [r.ttft for r in results[1:]]
    line = {"scenario": "prefix", "first_ttft_ms": round(1000 * first, 1),
            "later_ttft_median_ms": round(1000 * statistics.median(later), 1),
            "later_ttft_max_ms": round(1000 * max(later), 1),
            "ratio_median": round(statistics.median(later) / first, 3),
            "ratio_max": round(max(later) / first, 3)}
    print(json.dumps(line))
    return [r.text for r in results]


def resident_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def scenario_soak(url, args, process):
    prompts = read_prompts(args.prompts, args.requests or 2000)
    quarter = len(prompts) // 4
    first = asyncio.run(run_load(url, prompts[:quarter], args))[0]
    rss_quarter = resident_bytes(process.pid) if process else None
    rest = asyncio.run(run_load(url, prompts[quarter:], args))[0]
    rss_end = resident_bytes(process.pid) if process else None
    errors = sum(r.error is not None for r in first + rest)
    line = {"scenario": "soak", "requests": len(prompts), "errors": errors,
            "rss_after_quarter_mb": rss_quarter and round(rss_quarter / 2**20, 1),
            "rss_at_end_mb": rss_end and round(rss_end / 2**20, 1),
            "rss_change_percent": rss_quarter and round(100 * (rss_end / rss_quarter - 1), 2)}
    print(json.dumps(line))
    return line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (127.0.0.1 only)")
    p.add_argument("--start", choices=("xllm", "llama-server", "llama-cpp-python"),
                   help="start this server on a free port, run, stop it")
    p.add_argument("--offline", action="store_true",
                   help="run the prompts as one xllm generate_batch call instead")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model for --start/--offline (a GGUF for the llama.cpp servers)")
    p.add_argument("--model-name", default=None,
                   help="the 'model' field sent (default: the server's first model)")
    p.add_argument("--llama-server", default=None, help="llama-server binary for --start")
    p.add_argument("--threads", type=int, default=2,
                   help="kernel threads of a server it starts, or of --offline (default: "
                        "%(default)s)")
    p.add_argument("--slot-context", type=int, default=1024,
                   help="context per llama.cpp slot (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="streaming requests in flight at once (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests in all (default: the concurrency)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help="a text file, one prompt per line, used in turn (default: "
                        "benchmarks/prompts.txt)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="tokens each request generates (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="/v1/chat/completions (default: "
                                                      "/v1/completions on the raw prompt)")
    p.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--stop-at-eos", dest="ignore_eos", action="store_false",
                   help="let sequences end at the end-of-sequence token (by default every "
                        "request asks for ignore_eos, so that each generates --max-tokens and "
                        "servers do the same work)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may take (default: %(default)s)")
    p.add_argument("--max-duration", type=float, default=900.0,
                   help="cut the whole run after this many seconds (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds a started server may take to answer /health (default: "
                        "%(default)s)")
    p.add_argument("--scenario", choices=("throughput", "latency", "prefix", "soak"),
                   default="throughput",
                   help="what to measure (see the module docstring; default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="latency scenario: rounds on the same server, then the medians of "
                        "their ratios (the machine is shared: one round can be unlucky; "
                        "default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="requests sent (one at a time) before measuring (default: "
                        "%(default)s)")
    return p.parse_args(argv)


def model_name(url, api_key):
    request = urllib.request.Request(url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def main(argv=None):
    args = parse_args(argv)
    n = args.requests or args.concurrency
    prompts = read_prompts(args.prompts, n)
    if args.offline:
        offline(args, prompts)
        return 0
    if bool(args.url) == bool(args.start):
        raise SystemExit("give --url or --start (or --offline)")
    process = None
    if args.start:
        args.model_name = args.model_name or Path(args.model).name
        url, process = start_server(args)
    else:
        url = args.url.rstrip("/")
        if urllib.parse.urlparse(url).hostname not in LOCAL_HOSTS:
            raise SystemExit("this benchmark only drives servers on 127.0.0.1")
    try:
        args.model_name = args.model_name or model_name(url, args.api_key)
        if args.scenario == "latency":
            lines = [asyncio.run(scenario_latency(url, args, i)) for i in range(args.repeat)]
            if args.repeat > 1:
                print(json.dumps({"scenario": "latency", "rounds": args.repeat, **{
                    f"median_{key}": statistics.median(line[key] for line in lines)
                    for key in ("ttft_ratio", "itl_ratio")}}))
            return 0
        if args.scenario == "prefix":
            texts = asyncio.run(scenario_prefix(url, args))
            if args.start == "xllm":
                stop_server(process)
                process = None
                args.extra_server_args = ["--no-prefix-cache"]
                url, process = start_server(args)
                same = asyncio.run(scenario_prefix(url, args)) == texts
                print(json.dumps({"scenario": "prefix", "answers_equal_without_cache": same}))
            return 0
        if args.scenario == "soak":
            scenario_soak(url, args, process)
            return 0
        if args.warmup:
            asyncio.run(run_load(url, prompts[:args.warmup], argparse.Namespace(
                **{**vars(args), "concurrency": 1})))
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        results, wall = asyncio.run(run_load(url, prompts, args))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime -
                                                             cpu_before.ru_stime)
        report(args.start or url, results, wall, cpu)
    finally:
        if process is not None:
            stop_server(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
