"""The continuous-batching engine (xllm/engine/scheduler.py): every request's text is exactly
what Model.generate gives it alone, whatever runs beside it, preempted or not."""
import threading

import pytest

import xllm
from xllm.engine.sampling import SamplingParams
from xllm.engine.scheduler import (Engine, EngineClosedError, FinishEvent, QueueFullError,
                                   Request, TokenEvent)
from xllm.errors import ContextLengthError

from helpers_engine import Collector

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park",
           "One day, a big bird", "There was a cat who"]


@pytest.fixture(scope="module")
def stories(data_dir):
    d = data_dir / "llama2c"
    return xllm.load(d / "stories260K.bin", tokenizer=d / "tok512.bin")


def submit(engine, model, prompt, i, max_new_tokens=48, stop=()):
    collector = Collector()
    params = SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, seed=i)
    request = Request(model.encode_prompt(prompt), max_new_tokens, params, collector, stop=stop)
    engine.submit(request)
    return request, collector, params


def alone(model, prompt, params, max_new_tokens=48, stop=()):
    model.prefix_cache.clear()
    return model.generate(prompt, max_new_tokens=max_new_tokens,
                          temperature=params.temperature, seed=params.seed, stop=stop)


@pytest.mark.parametrize("budget", [1 << 30, 200_000], ids=["roomy", "preempting"])
def test_concurrent_requests_equal_each_alone(stories, budget):
    engine = Engine(stories, kv_budget=budget, max_running=8)
    try:
        jobs = [(p, *submit(engine, stories, p, i)) for i, p in enumerate(PROMPTS * 3)]
        for prompt, request, collector, params in jobs:
            assert collector.done.wait(60)
            assert collector.finish.reason in ("stop", "length")
            assert collector.text == alone(stories, prompt, params), prompt
        if budget < 1 << 30:
            assert engine.preemptions > 0  # the small budget did force some
        assert engine.running == 0 and engine.waiting == 0
    finally:
        engine.close()


def test_stop_strings_cancel_and_counts(stories):
    engine = Engine(stories)
    try:
        params = SamplingParams()
        full = alone(stories, PROMPTS[0], params)
        stop = full[12:15]
        _, collector, _ = submit(engine, stories, PROMPTS[0], 0, stop=(stop,))
        assert collector.done.wait(60)
        assert collector.text == full[:full.find(stop)]
        assert collector.finish.reason == "stop"
        assert collector.finish.prompt_tokens == len(stories.encode_prompt(PROMPTS[0]))
        assert collector.finish.completion_tokens == len(collector.tokens)
        request, collector, _ = submit(engine, stories, PROMPTS[1], 1, max_new_tokens=400)
        while len(collector.tokens) < 3:
            collector.done.wait(0.01)
        request.cancel()
        engine.wake()
        assert collector.done.wait(10)
        assert collector.finish.reason == "cancelled"
        assert len(collector.tokens) < 400
    finally:
        engine.close()
    assert engine.running == 0


def test_submit_refuses_what_cannot_run(stories):
    engine = Engine(stories, kv_budget=50_000, max_queue=0)
    try:
        with pytest.raises(ContextLengthError):
            engine.submit(Request([1] * 10, stories.config.max_seq_len, SamplingParams(),
                                  lambda e: None))
        with pytest.raises(ValueError, match="budget"):
            engine.submit(Request([1] * 10, 400, SamplingParams(), lambda e: None))
        with pytest.raises(QueueFullError):
            engine.submit(Request([1] * 10, 4, SamplingParams(), lambda e: None))
        with pytest.raises(ValueError, match="empty"):
            engine.submit(Request([], 4, SamplingParams(), lambda e: None))
    finally:
        engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit(Request([1] * 10, 4, SamplingParams(), lambda e: None))


def test_logprobs_are_of_the_raw_logits(stories):
    import numpy as np
    engine = Engine(stories)
    try:
        collector = []
        done = threading.Event()

        def emit(event):
            collector.append(event)
            if isinstance(event, FinishEvent):
                done.set()
        ids = stories.encode_prompt(PROMPTS[2])
        engine.submit(Request(ids, 6, SamplingParams(temperature=0.8, seed=1,
                                                     repetition_penalty=1.3), emit, logprobs=3))
        assert done.wait(60)
        tokens = [e.token for e in collector if isinstance(e, TokenEvent)]
        logits = stories.logits(ids + tokens)
        for k, event in enumerate(e for e in collector if isinstance(e, TokenEvent)):
            row = logits[len(ids) - 1 + k].astype(np.float64)
            row = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
            assert abs(event.logprob - row[event.token]) < 1e-9
            assert [t for t, _ in event.top_logprobs] == list(np.argsort(-row,
                                                                         kind="stable")[:3])
    finally:
        engine.close()
