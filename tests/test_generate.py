"""Generation: greedy/sampled decoding, seeds, stop strings, streaming, limits, bad input, and
no allocation in the decode loop."""
import gc
import pathlib
import sys
import tracemalloc

import numpy as np
import pytest

import xllm
from xllm.engine.stops import StopFilter

from xllm.random_model import write_random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_random_model(str(tmp_path_factory.mktemp("tiny")), "tiny", "fp32", seed=3)
    m = xllm.load(path)
    m.config.eos_token_id = None  # random weights: never stop early
    return m


@pytest.fixture(scope="module")
def stories(data_dir):
    d = data_dir / "llama2c"
    return xllm.load(d / "stories260K.bin", tokenizer=d / "tok512.bin")


def test_greedy_is_deterministic_and_streams(model):
    a = model.generate("hello there", max_new_tokens=20)
    assert model.last_stats["generated"] == 20
    b = "".join(model.generate("hello there", max_new_tokens=20, stream=True))
    assert a == b


def test_top_k_1_is_greedy(model):
    greedy = model.generate([1, 5, 9], max_new_tokens=16)
    t_greedy = model.last_stats["tokens"]
    model.generate([1, 5, 9], max_new_tokens=16, temperature=1.0, top_k=1, seed=7)
    assert model.last_stats["tokens"] == t_greedy and greedy is not None


def test_seed_gives_same_text(stories):
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=123)
    a = stories.generate("Once upon a time", **kw)
    b = stories.generate("Once upon a time", **kw)
    assert a == b
    others = {stories.generate("Once upon a time", **dict(kw, seed=s)) for s in range(4)}
    assert len(others) > 1  # different seeds give different stories


def test_sampling_options_run(stories):
    for kw in [dict(top_k=5), dict(min_p=0.1), dict(top_p=0.5, top_k=10), dict(temperature=2.0),
               dict(repetition_penalty=1.3)]:
        kw = {"temperature": 0.8, **kw}
        text = stories.generate("Tom had", max_new_tokens=10, seed=1, **kw)
        assert isinstance(text, str)
    with pytest.raises(ValueError):
        stories.generate("Tom", top_p=0.0)
    with pytest.raises(ValueError):
        stories.generate("Tom", temperature=-1)


def test_repetition_penalty_changes_greedy_output(stories):
    a = stories.generate("Once upon a time", max_new_tokens=60)
    b = stories.generate("Once upon a time", max_new_tokens=60, repetition_penalty=1.5)
    assert a != b


def test_stop_string_spanning_tokens_is_never_printed(stories):
    full = stories.generate("Once upon a time", max_new_tokens=60)
    stop = "little girl named"  # several tokens
    assert stop in full
    pieces = list(stories.generate("Once upon a time", max_new_tokens=60, stop=[stop],
                                   stream=True))
    assert "".join(pieces) == full[:full.index(stop)]
    assert stories.generate("Once upon a time", max_new_tokens=60, stop=["zzz", stop]) == \
        full[:full.index(stop)]


def test_stop_filter_holds_back_partial_stops():
    def run(pieces, stop):
        f = StopFilter(stop)
        return [t for t in [f.push(p) for p in pieces] + [f.flush()] if t]
    assert "".join(run(["ab", "c", "X", "Y", "Zd"], ["XYZ"])) == "abc"
    assert run(["ab", "X", "Yq"], ["XYZ"]) == ["ab", "XYq"]
    assert "".join(run(["a", "b"], [])) == "ab"


def test_max_new_tokens_zero(model):
    assert model.generate("hi", max_new_tokens=0) == ""


def test_context_limit(model):
    ctx = model.config.max_seq_len
    with pytest.raises(xllm.ContextLengthError):
        model.generate([5] * (ctx + 1), max_new_tokens=1)
    with pytest.raises(xllm.ContextLengthError):
        model.logits([5] * (ctx + 1))
    model.generate([5] * (ctx - 4), max_new_tokens=50)
    assert model.last_stats["finish"] == "context"
    assert model.last_stats["generated"] == 5  # the 5th token fills the context; no 6th
    kv = model.transformer.new_cache()
    model.transformer.forward(np.array([5] * ctx), kv)
    with pytest.raises(xllm.ContextLengthError):
        model.transformer.forward(np.array([5]), kv)


def test_bad_threads_and_ids(model):
    with pytest.raises(ValueError):
        xllm.set_threads(0)
    with pytest.raises(ValueError):
        model.threads = -1
    with pytest.raises(ValueError):
        model.logits([model.config.vocab_size])
    with pytest.raises(ValueError):
        model.generate([], max_new_tokens=3)


def test_threads_can_change_at_run_time(model):
    ids = [1, 7, 8, 9]
    model.threads = 1
    one = model.logits(ids)
    model.threads = 2
    two = model.logits(ids)
    model.threads = None
    assert np.array_equal(one, two)  # fixed reduction order, whatever the thread count


def test_no_allocation_in_decode_loop(tmp_path):
    if xllm._kernels.backend.name == "reference":
        pytest.skip("the NumPy reference kernels allocate temporaries by design")
    # A model whose logits row is 128 KB: any per-token array would show in the traced peak.
    path = write_random_model(str(tmp_path / "m"), "tiny", "bf16", vocab_size=32000,
                              hidden_size=128, intermediate_size=344)
    m = xllm.load(path)
    tr, argmax = m.transformer, xllm._kernels.backend.argmax
    kv = tr.new_cache()
    kv.reserve(200)  # the cache's amortised growth is allowed; keep it out of the measurement
    logits = np.zeros((1, m.config.vocab_size), np.float32)
    tr.forward_batch([np.arange(1, 20)], [kv], logits)
    tok = np.zeros(1, np.int64)
    for _ in range(3):  # warm up
        tok[0] = argmax(logits[0])
        tr.forward_batch([tok], [kv], logits)
    gc.collect()
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    worst = 0  # the most memory any one token's forward pass had allocated at a time
    for _ in range(100):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        tok[0] = argmax(logits[0])
        tr.forward_batch([tok], [kv], logits)
        worst = max(worst, tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    gc.collect()
    # ... and nothing is kept: Python's own block count (tracemalloc's "current" also grows by
    # ~50 bytes per call that Python keeps only while tracing; getallocatedblocks does not).
    assert worst < 16384 and sys.getallocatedblocks() - blocks < 64, (
        worst, sys.getallocatedblocks() - blocks)


def test_bad_files_raise_clear_errors(tmp_path, data_dir):
    src = write_random_model(str(tmp_path / "ok"), "tiny", "fp32")
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (cut / name).write_bytes((pathlib.Path(src) / name).read_bytes())
    data = (pathlib.Path(src) / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(xllm.ModelFormatError, match="model.safetensors"):
        xllm.load(cut)
    bad = tmp_path / "bad.bin"
    bad.write_bytes((data_dir / "llama2c" / "stories260K.bin").read_bytes())
    with open(bad, "r+b") as f:
        f.write(np.array([64, 172, 5, 7, 4, 512, 512], np.int32).tobytes())  # 7 heads: 64 % 7
    with pytest.raises(xllm.ModelFormatError, match="bad.bin"):
        xllm.load(bad)
    with pytest.raises(ValueError, match="threads"):
        xllm.load(src, threads=0)


def test_kv_cache_grows_amortised_and_accounts_memory():
    from xllm._kernels.reference import k_rows, v_rows
    from xllm.model.kv_cache import KVCache
    kv = KVCache(num_layers=2, kv_dim=8, max_len=1000, initial_capacity=16)
    assert kv.nbytes == 0  # nothing allocated up front
    growths = 0
    for _ in range(600):
        cap = kv.capacity
        kv.reserve(1)
        t = kv.length
        kv.k[1][t // 32, :, t % 32] = t  # key t of a blocked K cache
        kv.v[1][t // 32, 0, t % 32] = -t  # value t (one KV head)
        kv.length += 1
        growths += kv.capacity != cap
    # 32 (16 rounded up to a block), 64, ... 512, then the cap (1000 rounded up to 1024)
    assert growths <= 7 and kv.capacity == 1024 >= kv.length
    assert kv.nbytes == 2 * 2 * 1024 * 8 * 4
    keys = k_rows(kv.k[1])
    assert keys[599, 0] == 599 and keys[17, 3] == 17  # both survive growth
    assert v_rows(kv.v[1])[40, 0] == -40
    kv.truncate(10)
    assert kv.length == 10
    with pytest.raises(ValueError):
        kv.truncate(11)
    with pytest.raises(xllm.ContextLengthError):
        kv.reserve(991)
    kv.reset()
    assert kv.length == 0 and kv.nbytes == 0


def test_cpu_without_avx2_falls_back_to_reference(monkeypatch):
    from xllm import _kernels
    monkeypatch.setattr(_kernels, "features", lambda: {"avx2": False, "f16c": False})
    monkeypatch.delenv("XLLM_BACKEND", raising=False)
    with pytest.warns(UserWarning, match="AVX2"):
        assert _kernels._select() is _kernels.REFERENCE


def test_session_reuses_the_prefix_with_identical_results(stories):
    session = stories.session()
    first = session.generate("Once upon a time", max_new_tokens=20)
    follow = "Once upon a time" + first + " The end. Then"
    session.generate(follow, max_new_tokens=30)
    reused = session.last_stats
    assert reused["cached_tokens"] >= 20
    stories.prefix_cache.clear()
    stories.generate(follow, max_new_tokens=30)  # a model call: a fresh sequence
    assert stories.last_stats["cached_tokens"] == 0
    assert stories.last_stats["tokens"] == reused["tokens"]
    session.reset()
    assert session.cached_tokens == 0
    stories.prefix_cache.clear()
    session.generate(follow, max_new_tokens=30)
    assert session.last_stats["cached_tokens"] == 0
    assert session.last_stats["tokens"] == reused["tokens"]


def test_prefix_cache_lends_earlier_prompts_bitwise(stories):
    stories.prefix_cache.clear()
    story = "Once upon a time there was a little girl who loved the sea and"
    first = stories.generate(story, max_new_tokens=20)
    assert stories.last_stats["cached_tokens"] == 0
    # the next prompt begins with the first sequence: its keys and values are lent
    follow = story + first + " Then"
    again = stories.generate(follow, max_new_tokens=24)
    assert stories.last_stats["cached_tokens"] >= 20
    tokens = stories.last_stats["tokens"]
    stories.prefix_cache.clear()
    assert stories.generate(follow, max_new_tokens=24) == again
    assert stories.last_stats["cached_tokens"] == 0 and stories.last_stats["tokens"] == tokens
    # a batch and a session borrow too, and the budget bounds what is kept
    stories.generate(story, max_new_tokens=20)
    assert stories.generate_batch([follow, story], max_new_tokens=24)[0] == again
    assert stories.last_stats["cached_tokens"] > 0
    session = stories.session()
    assert session.generate(follow, max_new_tokens=24) == again
    assert session.last_stats["cached_tokens"] > 0
    assert 0 < stories.prefix_cache.nbytes <= stories.prefix_cache.max_bytes
    stories.prefix_cache.evict(0)
    assert stories.prefix_cache.nbytes == 0 and len(stories.prefix_cache) == 0
