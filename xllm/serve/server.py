"""The server's command line: load the model, start the engine, serve with uvicorn.

    python -m xllm.serve [--model PATH|NAME] [--host 127.0.0.1] [--port 8000] [--threads N]
        [--max-running N] [--max-queue N] [--kv-budget-mb MB] [--api-key KEY]
        [--served-model-name NAME] [--shutdown-timeout S] [--log-prompts]
"""
import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from ..errors import XLLMError

DEFAULT_MAX_RUNNING = 32
DEFAULT_MAX_QUEUE = 256
MEMORY_SHARE = 0.5  # of the memory available at start, at most, for the KV budget


def _parser():
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


def build(args):
    """(engine, app) for parsed arguments. When the server stops, the engine cancels what is
    left (uvicorn has waited --shutdown-timeout for the connections by then)."""
    from .. import load
    from ..engine.scheduler import Engine
    from .app import ServerSettings, create_app
    model = load(args.model, threads=args.threads)
    if args.kv_budget_mb is None:
        budget = default_kv_budget(model, args.max_running)
    else:
        budget = int(args.kv_budget_mb * 2**20)
    engine = Engine(model, max_running=args.max_running, max_queue=args.max_queue,
                    kv_budget=budget, prefix_cache=not args.no_prefix_cache)
    settings = ServerSettings(served_model_name=args.served_model_name or args.model,
                              api_key=args.api_key or None, log_prompts=args.log_prompts)
    return engine, create_app(engine, settings, on_shutdown=lambda: engine.close(timeout=1.0))


def main(argv=None):
    args = _parser().parse_args(argv)
    for name in ("max_running", "max_queue", "port"):
        if getattr(args, name) < 1:
            print(f"xllm.serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        engine, app = build(args)
    except (XLLMError, OSError, ValueError) as error:
        print(f"xllm.serve: {error}", file=sys.stderr)
        return 2
    import uvicorn
    _Server = _uvicorn_server()
    logging.getLogger("xllm.serve").info(
        "serving %s on http://%s:%d (threads %d, max running %d, KV budget %.0f MiB)",
        args.served_model_name or args.model, args.host, args.port, engine.model.threads,
        args.max_running, engine.kv_budget / 2**20)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, log_level="info")
    _Server(config).run()
    return 0


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that after a graceful shutdown on SIGTERM or SIGINT the
        process exits with status 0 (uvicorn raises the signal again, which kills it)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return Server
