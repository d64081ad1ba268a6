"""Batched generation: ragged prefill, one decode step for all sequences, batch invariance."""

import numpy as np
import pytest

import xllm
from xllm.formats import qtensor as quant
from xllm.loaders import load_checkpoint

from xllm.random_model import write_random_model

LENGTHS = [1, 7, 300, 33, 2, 129, 64, 5, 250, 17, 90, 3, 41, 200, 12, 77]  # 16 prompts


@pytest.fixture(scope="module", params=["fp32", "bf16", "int8"])
def model(request, tmp_path_factory):
    dtype = "fp32" if request.param == "int8" else request.param
    path = tmp_path_factory.mktemp("m") / request.param
    write_random_model(path, "tiny", dtype, seed=3, hidden_size=128, intermediate_size=256,
                       num_layers=2, max_seq_len=512)
    m = xllm.load(path)
    if request.param == "int8":
        weights = quant.quantize_weights(load_checkpoint(path).weights, 8, 32)
        m = xllm.Model(m.config, weights, m.tokenizer)
    return m


def prompts(vocab):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


def test_batch_logits_are_bitwise_those_of_each_sequence_alone(model):
    tr, ps = model.transformer, prompts(model.config.vocab_size)
    out = np.empty((len(ps), model.config.vocab_size), np.float32)
    kvs = [tr.new_cache() for _ in ps]
    tr.forward_batch([np.array(p) for p in ps], kvs, out)
    for p, row, kv in zip(ps, out, kvs):
        alone = tr.forward(np.array(p), tr.new_cache())
        np.testing.assert_array_equal(row, alone)
        assert kv.length == len(p)
    # and one decode step for all of them, against one step alone
    nxt = [np.array([int(r.argmax())]) for r in out]
    tr.forward_batch(nxt, kvs, out)
    for p, t, row in zip(ps, nxt, out):
        kv = tr.new_cache()
        tr.forward(np.array(p), kv)
        np.testing.assert_array_equal(row, tr.forward(t, kv))


def test_batch_generation_equals_each_prompt_alone(model):
    ps = prompts(model.config.vocab_size)
    batch = model.generate_batch(ps, max_new_tokens=64)
    assert all(len(t) > 20 for t in batch)
    for p, text in zip(ps, batch):
        assert text == model.generate(p, max_new_tokens=64)
    # streaming gives (index, piece) pairs that add up to the same texts
    streamed = [""] * len(ps)
    for i, piece in model.generate_batch(ps, max_new_tokens=64, stream=True):
        streamed[i] += piece
    assert streamed == batch


def test_sampled_batch_uses_one_seed_per_sequence(model):
    ps = prompts(model.config.vocab_size)[:4]
    batch = model.generate_batch(ps, max_new_tokens=16, temperature=1.0, seed=7)
    for i, p in enumerate(ps):
        assert batch[i] == model.generate(p, max_new_tokens=16, temperature=1.0, seed=7 + i)


def test_bad_batches(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate_batch([[5, 6], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        model.generate_batch([], max_new_tokens=4)
    with pytest.raises(TypeError, match="generate_batch"):
        model.generate([[5, 6], [7]], max_new_tokens=4)
    with pytest.raises(TypeError, match="list of prompts"):
        model.generate_batch("one prompt", max_new_tokens=4)
    model.max_batch = 3
    try:
        with pytest.raises(ValueError, match="4 prompts exceed max_batch=3"):
            model.generate_batch([[5]] * 4, max_new_tokens=1)
        assert len(model.generate_batch([[5]] * 3, max_new_tokens=1)) == 3
    finally:
        del model.max_batch


def test_stop_strings_per_sequence(model):
    ps = prompts(model.config.vocab_size)[:6]
    full = model.generate_batch(ps, max_new_tokens=32)
    stop = full[2][len(full[2]) // 2:][:3]  # text from the middle of one output
    cut = model.generate_batch(ps, max_new_tokens=32, stop=stop)
    assert cut[2] == full[2][:full[2].find(stop)]
    for p, text in zip(ps, cut):
        assert text == model.generate(p, max_new_tokens=32, stop=stop)


def test_cli_batch_file(tmp_path, capsys):
    from xllm.generate import main
    path = tmp_path / "m"
    write_random_model(path, "tiny", "fp32", seed=4, hidden_size=64, intermediate_size=128,
                       num_layers=1)
    lines = ["Once upon a time", "The cat", "A long time ago in a land far away"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert main(["--model", str(path), "--batch-file", str(tmp_path / "p.txt"), "--raw",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    m = xllm.load(path)
    want = [m.generate(p, max_new_tokens=8) for p in lines]
    assert out == "\n\n".join(want) + "\n"


def test_float16_kv_cache_halves_memory_and_stays_batch_invariant(tmp_path):
    path = tmp_path / "m"
    write_random_model(path, "tiny", "fp32", seed=5, hidden_size=128, intermediate_size=256,
                       num_layers=2, max_seq_len=512)
    m32, m16 = xllm.load(path, kv_dtype="float32"), xllm.load(path, kv_dtype="float16")
    ps = prompts(m16.config.vocab_size)[:8]
    tr = m16.transformer
    out = np.empty((len(ps), m16.config.vocab_size), np.float32)
    kvs = [tr.new_cache() for _ in ps]
    tr.forward_batch([np.array(p) for p in ps], kvs, out)
    for p, row, kv in zip(ps, out, kvs):
        kv32 = m32.transformer.new_cache()
        full = m32.transformer.forward(np.array(p), kv32)
        np.testing.assert_array_equal(row, tr.forward(np.array(p), tr.new_cache()))  # invariant
        assert np.abs(row - full).max() < 2e-2 * np.abs(full).max()  # float16 K/V rounding
        assert kv.nbytes * 2 == kv32.nbytes and kv.k[0].dtype == np.float16
    assert m16.generate_batch(ps, max_new_tokens=16) == [m16.generate(p, max_new_tokens=16)
                                                   for p in ps]
    with pytest.raises(ValueError, match="kv_dtype"):
        xllm.load(path, kv_dtype="int8")
