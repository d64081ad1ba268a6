"""python -m xllm.serve --ray: the same OpenAI API served by Ray Serve replicas (docs/scaling.rst).

The command starts a Ray instance of its own on 127.0.0.1 (small object store, no dashboard),
with 2 replicas of 1 thread on the default model; the module's tests share it, and the last one
stops it with SIGTERM and checks that no process of it is left. Answers are compared with
those of ``python -m xllm.serve`` for the same requests, sent before Ray starts."""
import concurrent.futures
import os
import re
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from test_serve import CHAT, server_log, start_server, stop_server  # noqa: E402
from xllm.hub import DEFAULT_MODEL  # noqa: E402

pytestmark = pytest.mark.slow

REPLICAS = 2
RAY_START = ("--ray", "--replicas", str(REPLICAS), "--threads", "1")

# greedy and seeded requests of both endpoints, streamed and not: (endpoint, stream, body)
SAME_ANSWERS = [
    ("chat", False, dict(messages=CHAT, temperature=0, max_tokens=24)),
    ("chat", True, dict(messages=CHAT, temperature=0, max_tokens=24)),
    ("chat", False, dict(messages=[{"role": "system", "content": "You answer briefly."},
                                   {"role": "user", "content": "Name a color."}],
                         temperature=0.9, seed=11, n=2, max_tokens=16)),
    ("chat", True, dict(messages=[{"role": "user", "content": "Tell me a story."}],
                        temperature=0.7, seed=5, max_tokens=20)),
    ("completions", False, dict(prompt="Once upon a time", temperature=0, max_tokens=24)),
    ("completions", True, dict(prompt="The history of the city", temperature=0.7, seed=5,
                               max_tokens=20)),
    ("completions", False, dict(prompt=["def add(a, b):", "List three colors:"],
                                temperature=1.0, seed=9, top_p=0.9, max_tokens=12,
                                extra_body={"top_k": 20})),
    ("completions", True, dict(prompt="A long time ago in a galaxy", temperature=0,
                               max_tokens=16, stop=["\n"])),
]


def answer(client, endpoint, stream, body):
    """(text of each choice, finish reason of each choice, completion tokens) of one call."""
    create = client.chat.completions.create if endpoint == "chat" else \
        client.completions.create
    if not stream:
        r = create(model=DEFAULT_MODEL, **body)
        texts = [c.message.content if endpoint == "chat" else c.text for c in r.choices]
        return texts, [c.finish_reason for c in r.choices], r.usage.completion_tokens
    texts = {}
    finishes = {}
    usage = None
    for chunk in create(model=DEFAULT_MODEL, stream=True,
                        stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            piece = (c.delta.content or "") if endpoint == "chat" else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    order = sorted(texts)
    return [texts[i] for i in order], [finishes[i] for i in order], usage


@pytest.fixture(scope="module")
def plain_answers():
    """The answers of python -m xllm.serve (1 thread), stopped before Ray starts."""
    url, process = start_server("--threads", "1")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        return [answer(client, *request) for request in SAME_ANSWERS]
    finally:
        assert stop_server(process) == 0


def children_of(pids):
    """Every process descending from `pids` (read from /proc), as {pid: start time}."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry)] = (int(fields[1]), fields[19])  # ppid, start time
    found = {}
    frontier = set(pids)
    while frontier:
        frontier = {pid for pid, (ppid, _) in parents.items()
                    if ppid in frontier and pid not in found}
        for pid in frontier:
            found[pid] = parents[pid][1]
    return found


def alive(pid, started):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


class RayServer:
    """The command's process and every process it started (recorded as they appear), so that
    whatever happens they are all stopped."""

    def __init__(self, plain_answers):
        self.url, self.process = start_server(*RAY_START)
        self.seen = {}
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        self.wait_for_replicas(REPLICAS)

    def record(self):
        self.seen.update(children_of([self.process.pid]))

    def wait_for_replicas(self, n, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.record()
            r = httpx.get(self.url + "/health", timeout=10)
            if r.status_code == 200 and r.json()["replicas"].get("RUNNING") == n and \
                    set(r.json()["replicas"]) == {"RUNNING"}:
                return
            time.sleep(0.5)
        raise AssertionError(f"{n} replicas are not running: {r.json()}")

    def replica_requests(self):
        """{replica name ("<id> pid <pid>"): requests it took}, from the ingress's metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        counts = {}
        for line in text.splitlines():
            m = re.match(r'xllm_replica_requests_total\{replica="([^"]+)"\} (\S+)', line)
            if m:
                counts[m.group(1)] = float(m.group(2))
        return counts

    def leftovers(self):
        return {pid: started for pid, started in self.seen.items() if alive(pid, started)}

    def kill_everything(self):
        if self.process.poll() is None:
            self.record()
            self.process.kill()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def ray_server(plain_answers):
    server = RayServer(plain_answers)
    try:
        yield server
    finally:
        server.kill_everything()  # after the shutdown test, nothing is left to kill
        server.process.log.close()


def test_same_answers_as_the_plain_server(ray_server, plain_answers):
    got = [answer(ray_server.client, *request) for request in SAME_ANSWERS]
    for request, want, have in zip(SAME_ANSWERS, plain_answers, got):
        assert have == want, request


def test_both_replicas_serve_and_the_api_is_the_same(ray_server):
    before = ray_server.replica_requests()
    chats = [[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": f"Count to {i}."}] for i in range(12)]

    def one(messages):
        return ray_server.client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=4)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(one, chats))
    after = ray_server.replica_requests()
    served = [name for name in after if after[name] > before.get(name, 0)]
    assert len(served) == REPLICAS, after  # a shared system prompt is no affinity key
    # the errors, models, tokenizer and request ids of python -m xllm.serve
    with pytest.raises(openai.BadRequestError) as e:
        ray_server.client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                  max_tokens="5")
    assert set(e.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        ray_server.client.chat.completions.create(model="gpt-17", messages=CHAT)
    assert [m.id for m in ray_server.client.models.list()] == [DEFAULT_MODEL]
    r = httpx.post(ray_server.url + "/tokenize", json={"prompt": "Hello world"})
    r = httpx.post(ray_server.url + "/detokenize", json={"tokens": r.json()["tokens"]})
    assert r.json()["prompt"] == "Hello world"
    r = httpx.post(ray_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"


def test_turns_of_a_conversation_stay_on_one_replica(ray_server):
    opening = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Tell me about the sea."}]
    before = ray_server.replica_requests()
    reply = ray_server.client.chat.completions.create(model=DEFAULT_MODEL, messages=opening,
                                                      temperature=0, max_tokens=8)
    turns = opening + [{"role": "assistant", "content": reply.choices[0].message.content}]
    questions = ("And the mountains?", "And the rivers?", "And the lakes?", "And the sky?",
                 "And the forests?", "And the deserts?", "Thanks.")
    for question in questions:  # by chance alone, all on one replica: 1 in 2**7
        turns = turns + [{"role": "user", "content": question}]
        ray_server.client.chat.completions.create(model=DEFAULT_MODEL, messages=turns,
                                                  temperature=0, max_tokens=4)
    after = ray_server.replica_requests()
    grew = {name: after[name] - before.get(name, 0) for name in after
            if after[name] > before.get(name, 0)}
    assert list(grew.values()) == [1 + len(questions)], grew


def metric(url, name):
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_clients_that_leave_cancel_their_requests(ray_server):
    def start_and_leave(i):
        with httpx.stream("POST", ray_server.url + "/v1/completions",
                          json={"prompt": f"Story {i}:", "max_tokens": 500, "stream": True,
                                "temperature": 0.8, "seed": i, "ignore_eos": True},
                          timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    return  # closes the connection mid-stream
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(start_and_leave, range(6)))
    deadline = time.monotonic() + 2.0
    while metric(ray_server.url, "xllm_running_sequences") > 0 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(ray_server.url, "xllm_running_sequences") == 0
    assert metric(ray_server.url, "xllm_queue_length") == 0
    # and on the replicas: their engines are idle (six streams of 500 tokens would keep them
    # busy for many seconds)
    pids = [int(name.rpartition(" pid ")[2]) for name in ray_server.replica_requests()]
    time.sleep(0.5)
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(1.0)
    busy = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    assert max(busy.values()) < 0.3, busy


def cpu_seconds(pid):
    """User and system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_20(client, streamed_started=None):
    """20 concurrent requests, half streamed, of 160 tokens each: {index: "ok" or the
    exception}. `streamed_started` is set when every streamed one has had a token."""
    started = threading.Barrier(11) if streamed_started is not None else None

    def one(i):
        body = dict(model=DEFAULT_MODEL, prompt=f"Story number {i}:", max_tokens=160,
                    temperature=0.8, seed=i, extra_body={"ignore_eos": True})
        try:
            if i % 2:
                client.completions.create(**body)
                return "ok"
            first = True
            for _ in client.completions.create(stream=True, **body):
                if first and started is not None:
                    first = False
                    started.wait(timeout=120)
            return "ok"
        except Exception as error:
            return error
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(one, i) for i in range(20)]
        if started is not None:
            started.wait(timeout=120)
            streamed_started.set()
        return {i: f.result(timeout=300) for i, f in enumerate(futures)}


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(ray_server):
    before = ray_server.replica_requests()
    started = threading.Event()
    killed = {}

    def kill_one():
        started.wait(timeout=120)
        counts = ray_server.replica_requests()
        killed["name"] = max(counts, key=lambda name: counts[name] - before.get(name, 0))
        os.kill(int(killed["name"].rpartition(" pid ")[2]), signal.SIGKILL)
    killer = threading.Thread(target=kill_one)
    killer.start()
    results = run_20(ray_server.client, started)
    killer.join()
    counts = ray_server.replica_requests()
    took = counts[killed["name"]] - before.get(killed["name"], 0)
    failed = {i: r for i, r in results.items() if r != "ok"}
    assert len(failed) == took and 0 < len(failed) < 20, (killed, took, results)
    for i, error in failed.items():
        # a clean OpenAI error: the status (not streamed) or the error event of the stream
        assert isinstance(error, openai.APIError), repr(error)
        if i % 2:
            assert isinstance(error, openai.InternalServerError) and error.status_code == 503
        assert error.body["code"] == "replica_failed", error.body
        assert "replica" in error.body["message"]
    for i in range(4):  # new requests go to the live replica meanwhile
        ray_server.client.completions.create(model=DEFAULT_MODEL, prompt=f"Hello {i}",
                                             max_tokens=4, temperature=0)
    ray_server.wait_for_replicas(REPLICAS)  # Ray Serve starts another
    # the ingress's router learns of the new replica a little after it runs (Ray's long poll;
    # on a loaded machine after the next 20 requests or more): batches until it serves too
    before = ray_server.replica_requests()
    served = set()
    deadline = time.monotonic() + 120
    while len(served) < REPLICAS and time.monotonic() < deadline:
        results = run_20(ray_server.client)
        assert list(results.values()) == ["ok"] * 20, results
        after = ray_server.replica_requests()
        served = {name for name in after if after[name] > before.get(name, 0)}
        assert killed["name"] not in served, after
    assert len(served) == REPLICAS, after  # the new one too


def test_sigterm_stops_the_replicas_and_ray(ray_server):
    ray_server.record()
    assert len(ray_server.seen) > 5  # Ray's processes and the replicas
    log = server_log(ray_server.process)
    assert "prompt_tokens=" in log  # the ingress's line per request reaches the command's log
    assert stop_server(ray_server.process) == 0
    deadline = time.monotonic() + 30
    while ray_server.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_server.leftovers(), log[-3000:]


class _Engine:
    """An engine's figures, as check_health reads them."""
    steps = 0
    running = 0
    waiting = 0


def test_health_check_fails_an_engine_that_stalls_with_work(monkeypatch):
    from xllm.serve import ray as xray
    clock = [1000.0]
    monkeypatch.setattr(xray.time, "monotonic", lambda: clock[0])
    replica = object.__new__(xray.XLLMReplica)  # the check alone: no model, no Ray
    replica.engine = _Engine()
    replica._steps = 0
    replica._progress = clock[0]
    clock[0] += 10 * xray.STALL_SECONDS
    replica.check_health()  # idle: healthy however long
    replica.engine.running = 3
    clock[0] += xray.STALL_SECONDS / 2
    replica.check_health()  # busy, within the limit
    replica.engine.steps = 5
    clock[0] += xray.STALL_SECONDS
    replica.check_health()  # busy and stepping
    clock[0] += xray.STALL_SECONDS + 1
    with pytest.raises(RuntimeError, match="no step"):
        replica.check_health()  # busy, no step for longer than the limit
    replica.engine = None  # __del__ of a replica without an engine does nothing
