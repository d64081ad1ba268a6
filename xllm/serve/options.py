"""The options of ``python -m xllm.serve`` and the defaults derived from the machine and the
model: one home for the uvicorn server (server.py) and the Ray Serve replicas (ray.py)."""
import argparse
import os

DEFAULT_MAX_RUNNING = 32
DEFAULT_MAX_QUEUE = 256
MEMORY_SHARE = 0.5  # of the memory available at start, at most, for the KV budget


def autoscale_range(text) -> tuple:
    """--autoscale's MIN:MAX as (min, max), 1 <= min <= max."""
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX with 1 <= MIN <= MAX")
    return bounds


def parser() -> argparse.ArgumentParser:
    """The options of python -m xllm.serve (and, without their dashes, of the Ray Serve
    application builder xllm.serve.ray:app)."""
    from ..formats.qtensor import add_activation_parts_option
    from ..hub import DEFAULT_MODEL
    p = argparse.ArgumentParser(prog="python -m xllm.serve",
                                description="An OpenAI-compatible server for one model.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a GGUF file, model directory or known model name (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every "
                        "interface)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: every core this process may use)")
    add_activation_parts_option(p)
    p.add_argument("--max-running", type=int, default=DEFAULT_MAX_RUNNING,
                   help="sequences decoding together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting beyond those; more get 429 (default: %(default)s)")
    p.add_argument("--kv-budget-mb", type=float, default=None,
                   help="KV cache for running sequences and the prefix cache (default: enough "
                        "for --max-running full-context sequences, at most half the memory "
                        "available at start)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not keep finished sequences' KV for later prompts")
    p.add_argument("--api-key", default=os.environ.get("XLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $XLLM_API_KEY; none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish "
                        "(default: %(default)s)")
    p.add_argument("--log-prompts", action="store_true",
                   help="log each request's prompt (off by default: prompts may be private)")
    ray = p.add_argument_group("Ray Serve (pip install -e \".[ray]\"; docs/scaling.rst)")
    ray.add_argument("--ray", action="store_true",
                     help="serve with Ray Serve replicas of the engine, each a process of "
                          "--threads kernel threads (default: the cores shared by the "
                          "replicas)")
    sizes = ray.add_mutually_exclusive_group()
    sizes.add_argument("--replicas", type=int, default=1,
                       help="replicas of the engine (default: %(default)s)")
    sizes.add_argument("--autoscale", type=autoscale_range, default=None, metavar="MIN:MAX",
                       help="let Ray Serve scale the replicas between MIN and MAX on load")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="join this Ray cluster (default: $RAY_ADDRESS, else start a Ray "
                          "instance of this machine alone, on 127.0.0.1, and stop it on exit)")
    return p


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or of physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_kv_budget(model, max_running) -> int:
    """Enough for max_running sequences at the full context, at most MEMORY_SHARE of the
    memory available now."""
    c = model.config
    per_token = 2 * c.num_layers * c.kv_dim * model.transformer.kv_dtype.itemsize
    full = max_running * c.max_seq_len * per_token
    return int(min(full, MEMORY_SHARE * available_memory()))
