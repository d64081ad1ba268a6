"""xllm as a Ray Serve application: replicas of the engine behind the OpenAI API of app.py.

    python -m xllm.serve --ray [--replicas N | --autoscale MIN:MAX] [--ray-address auto|HOST:PORT]
    serve run xllm.serve.ray:app model=smollm2-135m-instruct replicas=2 threads=1

Two deployments make the application (docs/scaling.rst):

* ``XLLMReplica``: one :class:`~xllm.engine.scheduler.Engine` per replica, each replica a Ray
  actor process with its own kernel threads (``ray_actor_options={"num_cpus": threads}``).
  ``generate(job)`` streams the events of one engine request, those of one engine step in one
  message.
* ``XLLMIngress``: the FastAPI application of app.py, the very one ``python -m xllm.serve``
  runs, over a :class:`RemoteEngine` that sends each engine request to a replica through a Ray
  Serve handle: the same endpoints, parsing, errors and streams. Its router
  (:class:`AffinityRouter`) sends the turns of one conversation to one replica, whose prefix
  cache holds the earlier turns, unless that replica runs IMBALANCE more requests than the least
  busy one; other requests go by load (the power of two choices, as Ray Serve's own router).

A replica that dies fails the requests it was running with a 503 in OpenAI's error JSON (inside
the stream when one has started); Ray Serve starts another, and new requests go to the live
ones. A replica whose engine stops taking steps while it has work fails its health check and is
replaced."""
import asyncio
import contextvars
import dataclasses
import hashlib
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import RequestRouter

from ..engine.scheduler import (EngineClosedError, FinishEvent, QueueFullError,
                                Request as EngineRequest, TokenEvent)
from ..errors import XLLMError
from .app import EventRelay, ServerSettings, create_app, refusal
from .protocol import APIError

log = logging.getLogger("xllm.serve")

APP_NAME = "xllm"  # the Ray Serve application's name under python -m xllm.serve --ray
OBJECT_STORE_BYTES = 256 << 20  # of a Ray instance started here: no tensors travel, only events
IMBALANCE = 4  # a conversation leaves its replica when it runs this many more than the least busy
AFFINITY_WAIT = 1.0  # seconds a request waits for its conversation's replica before any will do
HEALTH_PERIOD = 5.0  # seconds between Ray Serve's health checks of a replica
HEALTH_TIMEOUT = 30.0  # a check that takes longer fails
STALL_SECONDS = 60.0  # an engine with requests that takes no step for this long is unhealthy
STATUS_SECONDS = 1.0  # GET /health asks Ray Serve for the replicas' states at most this often
INGRESS_SPARE = 64  # requests the ingress takes beyond the replicas' (health, metrics, 429s)


# the fields of an engine request that stay in the ingress: its callback and the engine's
# state of it; every other field travels to the replica
LOCAL_FIELDS = ("emit", "cancelled", "matcher")


@dataclass
class Job:
    """One engine request as it travels to a replica: its fields but LOCAL_FIELDS, and the
    affinity key that AffinityRouter reads."""
    fields: dict
    affinity: Optional[str]

    @classmethod
    def of(cls, request) -> "Job":
        names = [f.name for f in dataclasses.fields(EngineRequest) if f.name not in LOCAL_FIELDS]
        return cls({name: getattr(request, name) for name in names},
                   getattr(request, "affinity", None))

    @property
    def prompt_tokens(self) -> int:
        return len(self.fields["prompt"])

    def engine_request(self, emit) -> EngineRequest:
        return EngineRequest(emit=emit, **self.fields)


@dataclass
class Reply:
    """One message of a replica's stream: the events of about one engine step, and the
    replica's KV figures at that moment (the ingress's gauges add them up)."""
    replica: str
    events: list
    kv_bytes: int
    prefix_bytes: int


def replica_threads(args) -> int:
    """Kernel threads per replica: --threads, else this machine's cores shared by the most
    replicas there may be."""
    if args.threads is not None:
        return args.threads
    return max(1, (os.cpu_count() or 1) // max_replicas(args))


def max_replicas(args) -> int:
    if args.autoscale is not None:
        return args.autoscale[1]
    return args.replicas


class XLLMReplica:
    """One engine: the model loaded with its own kernel threads, and its continuous batch."""

    def __init__(self, args):
        from .. import load
        from ..engine.scheduler import Engine
        from .options import default_kv_budget
        _log_to_stderr()
        model = load(args.model, threads=replica_threads(args),
                     activation_parts=args.activation_parts)
        if args.kv_budget_mb is None:  # the replicas may share this machine
            budget = default_kv_budget(model, args.max_running) // max_replicas(args)
        else:
            budget = int(args.kv_budget_mb * 2**20)
        self.engine = Engine(model, max_running=args.max_running, max_queue=args.max_queue,
                             kv_budget=budget, prefix_cache=not args.no_prefix_cache)
        self.name = f"{serve.get_replica_context().replica_id.unique_id} pid {os.getpid()}"
        self._relay = None
        self._steps = self.engine.steps
        self._progress = time.monotonic()
        log.info("replica %s: %d threads, KV budget %.0f MiB", self.name, model.threads,
                 budget / 2**20)

    async def generate(self, job: Job):
        """Replies with the events of `job` until its FinishEvent; the engine request is
        cancelled if the caller goes away first."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = EventRelay(loop)
        relay = self._relay
        queue = asyncio.Queue()
        request = job.engine_request(lambda event: relay.post(queue, event))
        try:
            self.engine.submit(request)
        except (XLLMError, ValueError) as error:
            failed = FinishEvent("error", "", job.prompt_tokens, 0, 0, error=refusal(error))
            yield self._reply([failed])
            return
        yield self._reply([])  # taken: the ingress learns which replica runs the request
        finished = False
        try:
            while not finished:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                finished = isinstance(events[-1], FinishEvent)
                yield self._reply([_portable(event) for event in events])
        finally:
            if not finished:
                request.cancel()
                self.engine.wake()

    def _reply(self, events) -> Reply:
        return Reply(self.name, events, self.engine.kv_bytes, self.engine.prefix_cache.nbytes)

    def check_health(self):
        """Ray Serve's health check (every HEALTH_PERIOD seconds): raises, and so has the
        replica replaced, when the engine has had requests and taken no step for
        STALL_SECONDS."""
        now = time.monotonic()
        busy = self.engine.running + self.engine.waiting
        if self.engine.steps != self._steps or not busy:
            self._steps = self.engine.steps
            self._progress = now
            return
        if now - self._progress > STALL_SECONDS:
            raise RuntimeError(f"the engine has taken no step for {now - self._progress:.0f} s "
                               f"with {busy} requests")

    def __del__(self):
        # Ray Serve calls it once the replica's requests have finished (or the graceful
        # shutdown timeout has passed)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=1.0)


def _log_to_stderr():
    """xllm's log lines (one per request, as python -m xllm.serve writes them) to the replica's
    stderr, which Ray keeps in its log files and shows the driver."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _portable(event):
    """`event` fit to be pickled: an engine's failure becomes the APIError it is answered
    with."""
    if isinstance(event, FinishEvent) and event.error is not None and \
            not isinstance(event.error, APIError):
        error = APIError(500, f"generation failed: {event.error!r}", type="server_error")
        return replace(event, error=error)
    return event


class _PrefixCacheFigure:
    """``prefix_cache.nbytes`` of a RemoteEngine: the replicas' prefix caches together."""

    def __init__(self, engine):
        self._engine = engine

    @property
    def nbytes(self) -> int:
        return sum(prefix for _, prefix in self._engine.figures.values())


class RemoteEngine:
    """What app.py needs of an engine, over Ray Serve replicas of one.

    ``submit`` starts a task on the event loop that sends the request to a replica and hands
    the events it streams back to ``request.emit``; ``wake`` cancels the tasks of cancelled
    requests, which cancels them on their replicas. The gauges: ``waiting``, requests that no
    replica has taken yet; ``running``, the others not finished; ``kv_bytes`` and
    ``prefix_cache.nbytes``, the sum of each replica's figures as of its latest message. Call
    it on the event loop only."""

    def __init__(self, model, handle, *, max_in_flight):
        self.model = model
        self.max_in_flight = max_in_flight
        self.figures = {}  # replica name -> (kv bytes, prefix cache bytes)
        self.prefix_cache = _PrefixCacheFigure(self)
        self._handle = handle.options(stream=True, method_name="generate")
        self._tasks = {}  # id(request) -> (request, task)
        self._started = set()  # id(request) of those that have had an event
        self._closing = False
        self._replica_requests = None
        self._states = None
        self._states_time = 0.0

    def count_requests_in(self, registry):
        """Count the requests each replica takes in `registry` (the app's metrics):
        ``xllm_replica_requests_total{replica}``."""
        from prometheus_client import Counter
        self._replica_requests = Counter("xllm_replica_requests",
                                         "engine requests by the replica that ran them",
                                         ["replica"], registry=registry)

    def submit(self, request):
        if self._closing:
            raise EngineClosedError("the server is shutting down")
        if len(self._tasks) >= self.max_in_flight:
            raise QueueFullError(f"{len(self._tasks)} requests are running or waiting already")
        # a context of its own: Ray Serve gives a handle call made while serving a request that
        # request's id, and its router pairs replicas with calls by id, so the choices of one
        # API call would share one id and all but one would wait forever
        task = asyncio.get_running_loop().create_task(self._run(request),
                                                      context=contextvars.Context())
        self._tasks[id(request)] = (request, task)

    def wake(self):
        for request, task in list(self._tasks.values()):
            if request.cancelled:
                task.cancel()

    @property
    def running(self) -> int:
        return len(self._started)

    @property
    def waiting(self) -> int:
        return len(self._tasks) - len(self._started)

    @property
    def kv_bytes(self) -> int:
        return sum(kv for kv, _ in self.figures.values())

    async def _run(self, request):
        job = Job.of(request)
        stream = self._handle.remote(job)
        replica = None
        tokens = 0
        finished = False
        try:
            async for reply in stream:
                if replica is None:
                    replica = reply.replica
                    self._started.add(id(request))
                    if self._replica_requests is not None:
                        self._replica_requests.labels(replica).inc()
                self.figures[replica] = (reply.kv_bytes, reply.prefix_bytes)
                for event in reply.events:
                    tokens += isinstance(event, TokenEvent)
                    finished = isinstance(event, FinishEvent)
                    request.emit(event)
            if not finished:
                raise RuntimeError("the replica's stream ended before its request did")
        except asyncio.CancelledError:  # the client went away (wake)
            stream.cancel()
        except Exception as error:
            if replica is not None:
                self.figures.pop(replica, None)  # it may be gone; its successor reports anew
            log.warning("replica %s failed a request: %r", replica or "(none yet)", error)
            request.emit(FinishEvent("error", "", job.prompt_tokens, tokens, 0,
                                     error=replica_failure(error)))
        finally:
            self._tasks.pop(id(request), None)
            self._started.discard(id(request))

    async def health(self):
        """(200, body) while at least one replica runs, else (503, body); the body counts the
        replicas by state (Ray Serve's: RUNNING, STARTING, UNHEALTHY ...)."""
        now = time.monotonic()
        if self._states is None or now - self._states_time > STATUS_SECONDS:
            self._states = await asyncio.to_thread(_replica_states)
            self._states_time = now
        running = self._states.get("RUNNING", 0)
        body = {"status": "ok" if running else "unavailable", "replicas": self._states}
        return (200 if running else 503), body

    def close(self, timeout=1.0):
        """Take no new requests and cancel those on their way."""
        self._closing = True
        for _, task in list(self._tasks.values()):
            task.cancel()


def _replica_states() -> dict:
    """Replicas of this application's XLLMReplica deployment by state."""
    context = serve.get_replica_context()
    status = serve.status().applications[context.app_name]
    return dict(status.deployments[XLLMReplica.__name__].replica_states)


def replica_failure(error) -> APIError:
    """The API's answer for a request its replica could not finish (`error` from Ray)."""
    if isinstance(error, BackPressureError):
        return APIError(429, "every replica is full; try again later", type="rate_limit_error",
                        headers={"Retry-After": "1"})
    return APIError(503, f"the replica running this request failed ({type(error).__name__}); "
                         f"sending it again goes to a live replica", type="server_error",
                    code="replica_failed")


class AffinityRouter(RequestRouter):
    """Ray Serve's routing for XLLMReplica. A request with an affinity key (a chat: the hash
    of its opening, app.py) goes to the replica that the key ranks first (rendezvous hashing:
    a replica that goes away moves only its own keys), or to the least busy replica when that
    one runs IMBALANCE requests more, or does not take the request within AFFINITY_WAIT
    seconds (full, or slow to answer Ray Serve's queue-length probe). A request without a key
    goes to the less busy of two random replicas."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        key = _affinity(pending_request)
        if key is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: _rank(key, r.replica_id.unique_id),
                        reverse=True)
        busy = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0
                for r in ranked}
        waited = time.time() - pending_request.created_at
        if busy[ranked[0].replica_id] >= min(busy.values()) + IMBALANCE or \
                waited > AFFINITY_WAIT:
            return [ranked]  # one rank: Ray Serve takes its least busy replica
        return [[ranked[0]]]  # Ray Serve asks again (after a short wait) if it cannot take it


def _affinity(pending_request) -> Optional[str]:
    """The affinity key of the Job a pending request carries, or None."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "affinity", None)


def _rank(key, replica) -> int:
    digest = hashlib.sha256(f"{key}/{replica}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


@serve.ingress()
class XLLMIngress:
    """The HTTP side: app.py's application over the replicas. It loads the model too, for its
    tokenizer, chat template and configuration (it runs no forward pass)."""

    def __init__(self, replicas, args):
        from .. import load
        _log_to_stderr()
        model = load(args.model, threads=1)
        in_flight = (args.max_running + args.max_queue) * max_replicas(args)
        self.engine = RemoteEngine(model, replicas, max_in_flight=in_flight)
        self.settings = ServerSettings(served_model_name=args.served_model_name or args.model,
                                       api_key=args.api_key or None,
                                       log_prompts=args.log_prompts,
                                       echo_request_id=False)  # Ray Serve's proxy does

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, self.settings, on_shutdown=self.engine.close,
                         health=self.engine.health)
        self.engine.count_requests_in(app.state.metrics.registry)
        return app


def build_application(args):
    """The Ray Serve application for parsed command-line arguments (server.py's)."""
    threads = replica_threads(args)
    options = dict(ray_actor_options={"num_cpus": threads},
                   max_ongoing_requests=args.max_running + args.max_queue,
                   health_check_period_s=HEALTH_PERIOD, health_check_timeout_s=HEALTH_TIMEOUT,
                   graceful_shutdown_timeout_s=args.shutdown_timeout,
                   request_router_config=RequestRouterConfig(  # imported, not pickled
                       request_router_class=f"{__name__}.{AffinityRouter.__name__}"))
    if args.autoscale is not None:
        low, high = args.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1, args.max_running // 2)}
    else:
        options["num_replicas"] = args.replicas
    replica = serve.deployment(XLLMReplica).options(**options)
    in_flight = (args.max_running + args.max_queue) * max_replicas(args)
    ingress = serve.deployment(XLLMIngress).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=in_flight + INGRESS_SPARE,
        graceful_shutdown_timeout_s=args.shutdown_timeout)
    return ingress.bind(replica.bind(args), args)


def app(args: dict):
    """The application builder of ``serve run xllm.serve.ray:app key=value ...``: the keys are
    the options of ``python -m xllm.serve`` without their dashes (``model``, ``replicas``,
    ``autoscale``, ``threads``, ``max_running``, ``kv_budget_mb``, ``log_prompts=true`` ...)."""
    from .options import parser
    argv = ["--ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() in ("true", "false"):
            if str(value).lower() == "true":
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return build_application(parser().parse_args(argv))


def local_ray_options() -> dict:
    """ray.init's arguments for a Ray instance of this machine alone: on 127.0.0.1, no
    dashboard, a small object store, as many CPUs as there are cores."""
    return dict(num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False, _node_ip_address="127.0.0.1")


def run(args) -> int:
    """``python -m xllm.serve --ray``: serve until SIGINT or SIGTERM, then delete the
    application, and stop the Ray instance if this command started it. 0 on a clean stop."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not address
    if started_here:
        cpus = os.cpu_count() or 1
        need = max_replicas(args) * replica_threads(args)
        if need > cpus:
            print(f"xllm.serve: {max_replicas(args)} replicas of {replica_threads(args)} "
                  f"threads need {need} CPUs; this machine has {cpus}", file=sys.stderr)
            return 2
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: interrupt whatever waits
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        if started_here:
            ray.init(**local_ray_options())
        else:
            ray.init(address=address)
        for sig in signals:  # ray.init may have installed its own
            signal.signal(sig, on_signal)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(args), name=APP_NAME, route_prefix="/")
        serving.set()
        log.info("serving %s on http://%s:%d with Ray Serve (%s replicas of %d threads)",
                 args.served_model_name or args.model, args.host, args.port,
                 "%d:%d" % args.autoscale if args.autoscale else args.replicas,
                 replica_threads(args))
        while not stop.wait(0.5):
            pass
        log.info("stopping")
        return 0
    except KeyboardInterrupt:
        print("xllm.serve: stopped before serving", file=sys.stderr)
        return 1
    except (XLLMError, OSError, ValueError, RuntimeError) as error:
        print(f"xllm.serve: {error}", file=sys.stderr)
        return 2
    finally:
        _stop(started_here)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(started_here):
    """Delete the application (its replicas finish their requests first, within
    --shutdown-timeout); stop Serve and Ray too if this command started them."""
    if not ray.is_initialized():
        return
    try:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
