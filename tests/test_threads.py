"""One model, many callers: threads, interleaved streams, sessions, argument checks, and the
thread governor (fewer kernel threads while the machine is busy)."""
import threading

import numpy as np
import pytest

import xllm
from xllm.model import governor
from xllm.model.governor import ThreadGovernor

from xllm.random_model import write_random_model
from stress_threads import stress  # noqa: E402


@pytest.fixture(scope="module")
def stories(data_dir):
    d = data_dir / "llama2c"
    return xllm.load(d / "stories260K.bin", tokenizer=d / "tok512.bin")


@pytest.fixture(scope="module")
def default_model(smollm2_gguf):
    return xllm.load(smollm2_gguf)


def _check_stress(model, **kw):
    for row in stress(model, threads=8, calls=25, reps=2, log=lambda line: None, **kw):
        assert row["errors"] == [] and row["differences"] == [], row


def test_threads_get_what_each_call_gets_alone(stories):
    _check_stress(stories, max_new_tokens=24)


@pytest.mark.slow
def test_threads_get_what_each_call_gets_alone_default_model(default_model):
    _check_stress(default_model, max_new_tokens=12)


def test_interleaved_streams_in_one_thread(stories):
    kw = dict(max_new_tokens=30)
    alone_a = stories.generate("Once upon a time", **kw)
    alone_b = stories.generate("Tom had a big red ball", **kw)
    a = stories.generate("Once upon a time", stream=True, **kw)
    first = next(a)
    b = stories.generate("Tom had a big red ball", **kw)
    assert first + "".join(a) == alone_a and b == alone_b
    # two streams advanced in turn
    a = stories.generate("Once upon a time", stream=True, **kw)
    b = stories.generate("Tom had a big red ball", stream=True, **kw)
    texts = ["", ""]
    live = [a, b]
    while live:
        for k, it in enumerate([a, b]):
            if it in live:
                try:
                    texts[k] += next(it)
                except StopIteration:
                    live.remove(it)
    assert texts == [alone_a, alone_b]


def test_concurrent_forward_batch_calls_are_batched_bitwise(stories):
    tr = stories.transformer
    prompts = [np.array(p) for p in ([1, 5, 9, 20], [1, 7], [1, 300, 301, 302, 303, 4])]
    alone = [tr.forward(p, tr.new_cache()) for p in prompts]
    outs = [np.zeros((1, stories.config.vocab_size), np.float32) for _ in prompts]
    start = threading.Barrier(len(prompts))

    def run(k):
        start.wait()
        kv = tr.new_cache()
        for _ in range(20):  # the same step again and again: some of them meet in one pass
            kv.truncate(0)
            tr.forward_batch([prompts[k]], [kv], outs[k])
            np.testing.assert_array_equal(outs[k][0], alone[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_bad_step_fails_alone(stories):
    tr = stories.transformer
    kv = tr.new_cache()
    out = np.zeros((1, stories.config.vocab_size), np.float32)
    with pytest.raises(ValueError, match="token ids"):
        tr.forward_batch([np.array([stories.config.vocab_size])], [kv], out)
    with pytest.raises(ValueError, match="twice"):
        tr.forward_batch([np.array([1]), np.array([2])], [kv, kv], np.zeros((2, 512), np.float32))
    assert kv.length == 0
    tr.forward_batch([np.array([1, 2])], [kv], out)
    assert kv.length == 2


def test_session_is_busy_while_its_stream_is_open(stories):
    session = stories.session()
    stream = session.generate("Once upon a time", stream=True, max_new_tokens=20)
    next(stream)
    with pytest.raises(xllm.SessionBusyError):
        session.generate("Tom", max_new_tokens=2)
    with pytest.raises(xllm.SessionBusyError):
        session.reset()
    stream.close()
    assert session.cached_tokens >= 5  # what was computed stays
    session.generate("Tom", max_new_tokens=2)
    with pytest.raises(TypeError, match="generate_batch"):
        session.generate(["a", "b"], max_new_tokens=2)
    # an abandoned stream frees the session when it is collected
    stream = session.generate("Once", stream=True, max_new_tokens=5)
    next(stream)
    del stream
    session.generate("Once", max_new_tokens=2)


def test_session_reuses_its_cache_and_matches_a_fresh_call(stories):
    session = stories.session()
    first = session.generate("Once upon a time", max_new_tokens=16)
    follow = "Once upon a time" + first + " Then"
    second = session.generate(follow, max_new_tokens=16)
    assert session.last_stats["cached_tokens"] >= 16
    assert second == stories.generate(follow, max_new_tokens=16)


def test_sessions_in_threads_match_sequential(stories):
    prompts = ["Once upon a time", "The cat", "Lily and Ben", "A big"]

    def conversation(p):
        s = stories.session()
        a = s.generate(p, max_new_tokens=12, temperature=0.9, seed=4)
        return a, s.generate(p + a + " And", max_new_tokens=12)

    alone = [conversation(p) for p in prompts]
    results = [None] * len(prompts)

    def run(k):
        results[k] = conversation(prompts[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


@pytest.mark.parametrize("kwargs, error", [
    (dict(max_new_tokens=2.5), TypeError),
    (dict(max_new_tokens="3"), TypeError),
    (dict(max_new_tokens=-1), ValueError),
    (dict(seed="abc"), TypeError),
    (dict(seed=-1), ValueError),
    (dict(temperature="hot"), TypeError),
    (dict(temperature=float("nan")), ValueError),
    (dict(top_k=1.5), TypeError),
    (dict(stop=b"x"), TypeError),
    (dict(stop=[1]), TypeError),
    (dict(add_bos=1), TypeError),
])
def test_bad_arguments_are_refused(stories, kwargs, error):
    with pytest.raises(error):
        stories.generate("Once", **kwargs)


def test_argument_forms_that_are_accepted(stories):
    a = stories.generate("Once", max_new_tokens=np.int64(5))
    assert a == stories.generate("Once", max_new_tokens=5, stop=None)
    # counts far past the context are clamped to it before anything is allocated
    stories.generate("Once", max_new_tokens=10**12, temperature=1.0, seed=np.int32(3))
    assert stories.last_stats["generated"] <= stories.config.max_seq_len
    with pytest.raises(TypeError, match="bytes"):
        stories.generate(b"Once upon a time")
    with pytest.raises(TypeError):
        stories.generate([1.0, 2.0])
    with pytest.raises(TypeError):
        stories.generate(np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        stories.generate([1, 10**6])


def test_padded_embedding_ids_are_never_sampled(tmp_path):
    """An embedding larger than the tokenizer (a padded vocabulary) loads; the padding ids
    are never sampled, nor accepted in prompts."""
    from xllm.loaders import load_checkpoint
    path = write_random_model(str(tmp_path / "m"), "tiny", "fp32", seed=1)
    ckpt = load_checkpoint(path)

    class SmallTokenizer:
        vocab_size = 40
        bos_id, eos_id = 1, 2

        def encode(self, text, add_bos=False):
            return [1] + [3 + ord(c) % 30 for c in text]

        def decoder(self, strip_leading_space=True):
            return None

    model = xllm.Model(ckpt.config, ckpt.weights, SmallTokenizer())
    model.config.eos_token_id = None
    tokens = set()
    for seed in range(5):
        model.generate("hello", max_new_tokens=40, temperature=5.0, seed=seed)
        tokens |= set(model.last_stats["tokens"])
    assert max(tokens) < 40 and len(tokens) > 10
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model.generate([1, 45])


def test_threads_are_per_model(tmp_path):
    path = write_random_model(str(tmp_path / "m"), "tiny", "fp32", seed=2)
    process = xllm.get_threads()
    a = xllm.load(path, threads=1)
    b = xllm.load(path)
    assert a.threads == 1 and b.threads == process and xllm.get_threads() == process
    with pytest.raises(TypeError):
        a.threads = 1.5
    with pytest.raises(ValueError):
        a.threads = 0
    assert np.array_equal(a.logits([1, 2, 3]), b.logits([1, 2, 3]))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(gov, clock, seconds_of, passes, rows=1, limit=2):
    """Run `passes` passes whose time is seconds_of(threads); the thread counts used."""
    used = []
    for _ in range(passes):
        t = gov.choose(rows, limit)
        s = seconds_of(t)
        clock.now += s
        gov.record(rows, t, s)
        used.append(t)
    return used


def test_governor_stays_at_all_threads_on_a_quiet_machine(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(governor.time, "monotonic", clock)
    gov = ThreadGovernor()
    quiet = {1: 0.010, 2: 0.0055}
    used = _run(gov, clock, quiet.get, 5000)
    trials = used.count(1)
    # one early trial, then at most about TRIAL_SHARE of the time
    assert used[-1] == 2 and trials <= 1 + clock.now / (quiet[2] / governor.TRIAL_SHARE)
    assert sum(quiet[t] for t in used) <= 1.02 * len(used) * quiet[2]


def test_governor_follows_a_busy_machine_and_back(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(governor.time, "monotonic", clock)
    gov = ThreadGovernor()
    quiet = {1: 0.010, 2: 0.0055}
    busy = {1: 0.011, 2: 0.300}  # another process holds a core: barriers wait time slices
    _run(gov, clock, quiet.get, 100)
    used = _run(gov, clock, busy.get, 400)
    assert used[-50:] == [1] * 50 and used.count(2) <= 8
    used = _run(gov, clock, quiet.get, 400)
    assert used[-50:] == [2] * 50
    # busy from the start: the early trial finds it
    gov = ThreadGovernor()
    used = _run(gov, clock, busy.get, 100)
    assert used[-50:] == [1] * 50 and used.count(2) <= 5


def test_governor_shapes_and_limits_are_separate(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(governor.time, "monotonic", clock)
    gov = ThreadGovernor()
    assert gov.choose(1, 1) == 1
    busy = {1: 0.011, 2: 0.300}
    _run(gov, clock, busy.get, 100, rows=1)
    assert gov.choose(1, 2) == 1
    assert gov.choose(300, 2) == 1  # a new shape starts from what the last one learned ...
    _run(gov, clock, {1: 0.5, 2: 0.26}.get, 10, rows=300)
    assert gov.choose(300, 2) == 2  # ... and learns on its own
    assert gov.choose(1, 2) == 1
    assert gov.choose(1, 4) == 4  # a new limit starts over


def test_governor_undoes_a_burst_of_noise_quickly(monkeypatch):
    """Three slow passes on a quiet machine (an interrupt storm, a page-fault burst) may send
    it to one thread; it returns to two within a few dozen passes, not after seconds."""
    clock = _Clock()
    monkeypatch.setattr(governor.time, "monotonic", clock)
    gov = ThreadGovernor()
    quiet = {1: 0.010, 2: 0.0055}
    _run(gov, clock, quiet.get, 200)
    _run(gov, clock, {1: 0.010, 2: 0.02}.get, 3)
    used = _run(gov, clock, quiet.get, 60)
    assert used[-20:] == [2] * 20


def test_governor_does_not_try_fewer_threads_early_on_long_passes(monkeypatch):
    """The early trial costs about one pass: on passes longer than EARLY_TRIAL_MAX (a 7B
    model's prefill: 20 s with 2 threads, 40 with 1) a quiet machine never pays it, while short
    passes still get it (a machine busy from the start)."""
    clock = _Clock()
    monkeypatch.setattr(governor.time, "monotonic", clock)
    gov = ThreadGovernor()
    long = {1: 40.0, 2: 20.0}
    used = _run(gov, clock, long.get, 30, rows=512)
    assert used == [2] * 30
    short = {1: 0.010, 2: 0.0055}
    used = _run(gov, clock, short.get, 5, rows=1)
    assert used.count(1) == 1  # the early trial
