"""python -m xllm.memory: the prediction from a config, and the measured run."""

import pytest

from xllm import memory
from xllm.config import PRESETS, ModelConfig

from xllm.random_model import write_random_model


def test_llama2_7b_table_from_config_alone(capsys):
    """Llama-2-7B, fp32 weights, fp32 KV, batch 64 x (512 + 512): computed, nothing allocated."""
    assert memory.main(["--random", "llama2-7b", "--dtype", "fp32", "--batch", "64",
                        "--prompt-len", "512", "--gen-len", "512", "--kv-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    c = ModelConfig(**PRESETS["llama2-7b"])
    w = memory.weight_table(c, dtype="fp32")
    assert w[("embedding", "float32")] == 32000 * 4096 * 4
    assert w[("MLP", "float32")] == 32 * (3 * 4096 * 11008 + 4096) * 4
    assert "KV cache (float32, 64 x 1024 rows)" in out and "65536.0" in out  # 64 GiB
    assert "weights total" in out and "25705.0" in out


def test_float16_kv_halves_and_int_weights_shrink():
    c = ModelConfig(**PRESETS["tinyllama-1.1b"])
    t32 = sum(memory.weight_table(c, dtype="fp32").values())
    t8 = sum(memory.weight_table(c, dtype="int8").values())
    t4 = sum(memory.weight_table(c, dtype="int4").values())
    assert 0.26 < t8 / t32 < 0.27 and 0.14 < t4 / t32 < 0.15  # 1.0625 and 0.5625 bytes
    text16, total16 = memory.report(c, {}, 4, 2000, 48, "float16", 0)
    text32, total32 = memory.report(c, {}, 4, 2000, 48, "float32", 0)
    kv32 = 4 * 2 * 22 * 2048 * 256 * 4
    assert total32 - total16 == pytest.approx(kv32 / 2)


def test_model_prediction_and_measurement(tmp_path, capsys):
    path = write_random_model(tmp_path / "m", "tiny", "fp32", seed=1)
    assert memory.main(["--model", str(path), "--batch", "3", "--prompt-len", "20",
                        "--gen-len", "4", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "KV cache (float16, 3 x 256 rows)" in out and "measured peak RSS" in out


@pytest.mark.parametrize("window", [None, 40])
def test_kv_capacity_follows_the_cache_and_its_window(window):
    """The predicted KV rows are those the cache has after a generation run of prompt + new
    tokens: all of them without a window; with one, the window plus a block plus a chunk."""
    import dataclasses

    import numpy as np

    from conftest import TINY, tiny_weights
    from xllm.model.transformer import Transformer
    config, weights = tiny_weights()
    config = dataclasses.replace(config, max_seq_len=2048, sliding_window=window)
    tr = Transformer(config, weights)
    prompt_len, gen_len = 700, 300
    kv = tr.new_cache()
    kv.reserve(prompt_len + gen_len)  # as generation does
    rng = np.random.default_rng(0)
    tr.forward(rng.integers(3, TINY["vocab_size"], prompt_len), kv)
    most = kv.capacity
    for token in rng.integers(3, TINY["vocab_size"], gen_len - 1):
        tr.forward([token], kv)
        most = max(most, kv.capacity)
    predicted = memory.kv_capacity(config, prompt_len, gen_len, chunk_rows=tr.ws.rows)
    assert most == predicted
    assert predicted == (1024 if window is None else memory.block_rows(40 + memory.KV_BLOCK + tr.ws.rows))


def test_owned_bytes_count_every_array_of_a_k_quant():
    """A K-quant QTensor holds bit planes and sub-block scales beside its codes and scales: the
    runtime estimate subtracts all of them (it once missed `high` and `sub`)."""
    import numpy as np

    from test_kernels_kquant import packed
    w, _ = packed(np.random.default_rng(0), "Q5_K", 32, 512)
    assert w.high is not None and w.sub is not None
    assert memory._owned_bytes(w) == w.nbytes == sum(a.nbytes for a in w.arrays)
