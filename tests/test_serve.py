"""python -m xllm.serve, checked with the official openai client against the library.

The server runs in its own process on a free 127.0.0.1 port, started and stopped (SIGTERM, exit
status 0) by the fixture."""
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import xllm  # noqa: E402
from xllm.hub import DEFAULT_MODEL  # noqa: E402

API_KEY = "test-key-123"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            process.log.seek(0)
            raise RuntimeError(f"the server exited with {process.returncode}:\n"
                               f"{process.log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def start_server(*extra):
    port = free_port()
    # the log goes to a file: a pipe nobody reads would fill and stop the server
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "xllm.serve", "--model", DEFAULT_MODEL, "--port", str(port),
         "--threads", "2", *extra], stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
    except BaseException:
        process.kill()
        raise
    return url, process


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.log.close()
    return status


def server_log(process):
    process.log.seek(0)
    return process.log.read()


@pytest.fixture(scope="module")
def server():
    url, process = start_server("--api-key", API_KEY, "--max-queue", "64")
    yield url
    log = server_log(process)
    assert stop_server(process) == 0
    assert " 200 " in log and "prompt_tokens=" in log  # one line per request ...
    assert "capital of France" not in log  # ... without the prompt


@pytest.fixture(scope="module")
def model():
    return xllm.load(DEFAULT_MODEL, threads=1)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_chat_equals_the_library(client, model):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, temperature=0,
                                       max_tokens=24)
    want = model.chat(CHAT, temperature=0, max_new_tokens=24)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    ids = model.chat_ids(CHAT)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == model.last_stats["generated"]  # the end token not counted
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == DEFAULT_MODEL and r.object == "chat.completion"


def test_chat_stream_adds_up_to_the_same_text(client, model):
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    text = ""
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == model.chat(CHAT, temperature=0, max_new_tokens=24)
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens == len(model.chat_ids(CHAT))


def test_completions_stop_strings_and_length(client, model):
    prompt = "Once upon a time, there was a little"
    full = model.generate(prompt, max_new_tokens=30)
    stop = full[10:14]
    r = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, temperature=0,
                                  max_tokens=30, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, temperature=0,
                                  max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].text == model.generate(prompt, max_new_tokens=5)


def test_n_choices_use_seed_plus_i(client, model):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, temperature=0.9,
                                       seed=11, n=3, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        want = model.chat(CHAT, temperature=0.9, seed=11 + i, max_new_tokens=16)
        assert choice.message.content == want
    assert r.usage.prompt_tokens == len(model.chat_ids(CHAT))  # the prompt counts once


def test_streamed_completion_n_and_seed(client, model):
    texts = {}
    for chunk in client.completions.create(model=DEFAULT_MODEL, prompt="The little dog",
                                           temperature=0.8, seed=3, n=2, max_tokens=12,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    for i in range(2):
        assert texts[i] == model.generate("The little dog", temperature=0.8, seed=3 + i,
                                          max_new_tokens=12)


def log_softmax(row):
    z = row.astype(np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def test_chat_logprobs_are_log_softmax_of_the_logits(client, model):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, temperature=0,
                                       max_tokens=8, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    ids = model.chat_ids(CHAT)
    generated = model.tokenizer.encode(r.choices[0].message.content)
    logits = model.logits(ids + generated)
    assert len(content) == min(len(generated) + 1, 8) or len(content) >= len(generated)
    for k, item in enumerate(content[:len(generated)]):
        row = log_softmax(logits[len(ids) - 1 + k])
        token = generated[k]
        assert abs(item.logprob - row[token]) < 1e-4
        best = np.argsort(-row, kind="stable")[:5]
        assert [abs(t.logprob - row[b]) < 1e-4 for t, b in zip(item.top_logprobs, best)] == \
            [True] * 5
        assert item.top_logprobs[0].token == item.token


def test_completion_logprobs(client, model):
    prompt = "The capital of France is"
    r = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, temperature=0,
                                  max_tokens=4, logprobs=3)
    lp = r.choices[0].logprobs
    ids = model.encode_prompt(prompt)
    assert len(lp.token_logprobs) == 4 and len(lp.top_logprobs[0]) == 3
    row = log_softmax(model.logits(ids)[-1])
    assert abs(lp.token_logprobs[0] - row.max()) < 1e-4


def test_bad_requests_get_openai_errors(client, server):
    bad = [dict(max_tokens=-1), dict(max_tokens="5"), dict(temperature="hot"),
           dict(n=0), dict(stop=3), dict(max_tokens=10**6), dict(top_logprobs=3)]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, **extra)
        assert e.value.status_code == 400
        error = e.value.body
        assert set(error) >= {"message", "type", "param", "code"}, error
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=DEFAULT_MODEL, prompt=[5] * 9000, max_tokens=1)
    # (tools and response_format are supported: tests/test_structured.py)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                       logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                       extra_body={"functions": [{"name": "f"}]})
    # unknown fields are ignored
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=2,
                                       extra_body={"some_new_field": 1})
    assert r.choices[0].message.content
    other = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()
    r = httpx.get(server + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(server + "/health").status_code == 200  # no key needed


def test_models_tokenize_metrics_and_request_ids(client, server, model):
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=auth)
    assert r.json()["tokens"] == model.encode_prompt("Hello world")
    r = httpx.post(server + "/detokenize", json={"tokens": r.json()["tokens"]}, headers=auth)
    assert r.json()["prompt"] == "Hello world"
    r = httpx.post(server + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={**auth, "X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    text = httpx.get(server + "/metrics", headers=auth).text
    for name in ("xllm_requests_total", "xllm_prompt_tokens_total",
                 "xllm_completion_tokens_total", "xllm_time_to_first_token_seconds_bucket",
                 "xllm_inter_token_latency_seconds_bucket", "xllm_queue_length",
                 "xllm_running_sequences", "xllm_kv_cache_bytes"):
        assert name in text, name


def metric(server, name):
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


REQUESTS = [dict(prompt="Once upon a time", temperature=0, max_tokens=24),
            dict(prompt="The history of the city", temperature=0.7, seed=5, max_tokens=20),
            dict(prompt="def add(a, b):", temperature=0, max_tokens=16, stop=["\n\n"]),
            dict(prompt="List three colors:", temperature=1.0, seed=9, top_p=0.9,
                 max_tokens=18),
            dict(prompt="A long time ago in a galaxy", temperature=0.5, seed=2,
                 extra_body={"top_k": 20, "min_p": 0.05}, max_tokens=30)]


def streamed_text(client, request):
    text = ""
    for chunk in client.completions.create(model=DEFAULT_MODEL, stream=True, **request):
        for choice in chunk.choices:
            text += choice.text
    return text


def concurrent_texts(client, requests, workers):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: streamed_text(client, r), requests))


def test_concurrent_streams_equal_each_alone(client):
    alone = [streamed_text(client, r) for r in REQUESTS]
    requests = REQUESTS * 2
    assert concurrent_texts(client, requests, len(requests)) == alone * 2


@pytest.mark.slow
def test_determinism_under_load_32_clients(client):
    requests = [dict(r, max_tokens=r["max_tokens"] + i % 7) for i, r in
                enumerate(REQUESTS * 7)][:32]
    alone = [streamed_text(client, r) for r in requests]
    for _ in range(2):
        assert concurrent_texts(client, requests, 32) == alone


def test_disconnected_clients_free_their_sequences(server):
    def start_and_leave(i):
        with httpx.stream("POST", server + "/v1/completions",
                          json={"prompt": f"Story {i}:", "max_tokens": 500, "stream": True,
                                "temperature": 0.8, "seed": i},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    return  # closes the connection mid-stream
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(start_and_leave, range(16)))
    deadline = time.monotonic() + 1.0  # every client has gone: within one second
    while metric(server, "xllm_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "xllm_running_sequences") == 0
    assert metric(server, "xllm_kv_cache_bytes") == metric(server, "xllm_prefix_cache_bytes")
    r = httpx.post(server + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200  # still serving


def test_full_queue_gets_429_and_sigterm_exits_cleanly():
    url, process = start_server("--max-running", "1", "--max-queue", "1", "--log-prompts")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        statuses = []

        def one(_):
            try:
                client.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=40,
                                          temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers.get("retry-after")
                return 429
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(one, range(6)))
        assert 429 in statuses and 200 in statuses
        assert '"Hello"' in server_log(process)  # --log-prompts
    finally:
        assert stop_server(process) == 0


@pytest.mark.slow
def test_soak_memory_stays_flat(capsys):
    import benchmark_serve
    assert benchmark_serve.main(["--start", "xllm", "--scenario", "soak", "--requests", "2000",
                                 "--max-tokens", "8", "--concurrency", "16"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["errors"] == 0
    assert abs(line["rss_change_percent"]) <= 5, line


def test_a_waiting_non_streamed_client_that_leaves_is_cancelled(server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions",
                   json={"prompt": "A very long story:", "max_tokens": 2000, "temperature": 0.8,
                         "seed": 1, "ignore_eos": True},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5)
    deadline = time.monotonic() + 1.5  # the server looks every 0.25 s
    while metric(server, "xllm_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "xllm_running_sequences") == 0


def test_activation_parts_reach_the_served_model():
    """--activation-parts N loads every quantized weight of the served model with N parts (the
    flag's other values are refused by the parser, exit code 2)."""
    from xllm.serve.options import parser
    from xllm.serve.server import build
    args = parser().parse_args(["--model", DEFAULT_MODEL, "--threads", "1",
                                "--activation-parts", "1", "--kv-budget-mb", "16"])
    engine, _ = build(args)
    try:
        layer = engine.model.transformer.layers[0]
        assert layer.wq.parts == layer.w2.parts == 1
    finally:
        engine.close(timeout=1.0)
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--activation-parts", "4"])
    assert e.value.code == 2
