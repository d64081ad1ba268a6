"""The server's command line: load the model, start the engine, serve with uvicorn.

    python -m xllm.serve [--model PATH|NAME] [--host 127.0.0.1] [--port 8000] [--threads N]
        [--max-running N] [--max-queue N] [--kv-budget-mb MB] [--api-key KEY]
        [--served-model-name NAME] [--shutdown-timeout S] [--log-prompts]
        [--ray [--replicas N | --autoscale MIN:MAX] [--ray-address auto|HOST:PORT]]

With --ray the same API is served by Ray Serve replicas of the engine (xllm/serve/ray.py,
docs/scaling.rst).
"""
import contextlib
import logging
import os
import signal
import sys
import threading

from ..errors import XLLMError
from .options import default_kv_budget, parser


def build(args):
    """(engine, app) for parsed arguments. When the server stops, the engine cancels what is
    left (uvicorn has waited --shutdown-timeout for the connections by then)."""
    from .. import load
    from ..engine.scheduler import Engine
    from .app import ServerSettings, create_app
    model = load(args.model, threads=args.threads, activation_parts=args.activation_parts)
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
    args = parser().parse_args(argv)
    for name in ("max_running", "max_queue", "port", "replicas"):
        if getattr(args, name) < 1:
            print(f"xllm.serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    ray_only = args.replicas != 1 or args.autoscale is not None or args.ray_address
    if ray_only and not args.ray:
        print("xllm.serve: --replicas, --autoscale and --ray-address need --ray",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.ray:
        if not (args.ray_address or os.environ.get("RAY_ADDRESS")):
            # the Ray instance started here is this machine's alone: Ray then gives its node
            # the loopback address, and its servers listen on 127.0.0.1 only (the variable is
            # read when ray is imported)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            from .ray import run
        except ImportError as error:
            print(f"xllm.serve: --ray needs Ray Serve (pip install -e \".[ray]\"): {error}",
                  file=sys.stderr)
            return 2
        return run(args)
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
