"""xllm's quantizers of the formats llama.cpp writes (xllm/formats/kquants.py, and the ``gguf``
package's for Q5_0/Q5_1/Q4_0/Q8_0) and the type mixes of its file types (xllm/formats/mixes.py),
checked against what llama.cpp itself wrote (tests/data/kquant_golden.npz, recorded once by
tests/data/make_kquant_golden.py with llama-cpp-python 0.3.36), so without llama.cpp.

The blocks are compared byte for byte, for every row of the fixture (Gaussian rows of several
magnitudes, zeros, constants, one-signed rows, outliers, float16-subnormal scales, values below
llama.cpp's GROUP_MAX_EPS, zero sub-blocks, values on a grid that make rounding ties): none
differs. That holds because llama.cpp's reference quantizers, in the libggml-base that
llama-cpp-python builds, are compiled for plain x86-64 (SSE2 scalar float32, no FMA
contraction, sums in index order), which is the arithmetic kquants.py performs.
"""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf.quants import dequantize

from xllm.formats import kquants, mixes
from xllm.formats.registry import FORMATS, writable_formats

GOLDEN = Path(__file__).resolve().parent / "data" / "kquant_golden.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return dict(data)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q4_0", "Q8_0"])
def test_blocks_equal_llama_cpp(golden, kind):
    """The registry's quantizer of each format writes exactly llama.cpp's blocks."""
    ours = FORMATS[kind].from_float(golden["input"])
    theirs = golden[f"blocks_{kind}"]
    assert ours.shape == theirs.shape
    differing = np.nonzero((ours != theirs).any(axis=1))[0]
    assert differing.size == 0, f"{kind}: rows {differing.tolist()} differ from llama.cpp's"


@pytest.mark.parametrize("kind,bound", [("Q4_K", 0.08), ("Q5_K", 0.04), ("Q6_K", 0.02)])
@pytest.mark.parametrize("std", [0.02, 1.0, 300.0])
def test_round_trip_through_gguf_dequantize(kind, bound, std):
    """The ``gguf`` package reads our blocks back close to the input. On Gaussian rows the
    relative RMS error is about 0.071 (Q4_K), 0.036 (Q5_K) and 0.018 (Q6_K) at any scale: the
    bound leaves 10% above that. Q4_K also beats Q4_0 (same bits plus finer scales)."""
    rng = np.random.default_rng(int(std * 100))
    w = (rng.standard_normal((48, 768)) * std).astype(np.float32)
    weight_format = FORMATS[kind]
    blocks = weight_format.from_float(w)
    assert blocks.shape == (48, 768 // 256 * weight_format.block_bytes)
    back = dequantize(blocks, weight_format.gguf_type)
    error = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    assert error < bound
    if kind == "Q4_K":
        q4_0 = dequantize(FORMATS["Q4_0"].from_float(w), GGMLQuantizationType.Q4_0)
        assert error < np.sqrt(np.mean((q4_0 - w) ** 2) / np.mean(w ** 2))


KQUANTS = {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k,
           "Q6_K": kquants.quantize_q6_k}


@settings(deadline=None, max_examples=40)
@given(kind=st.sampled_from(sorted(KQUANTS)), rows=st.integers(1, 5),
       superblocks=st.integers(1, 3), exponent=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_rows_are_independent_and_scale_by_powers_of_two(kind, rows, superblocks, exponent,
                                                         seed):
    """Each row's blocks depend on that row alone (a row quantized by itself gives the same
    bytes), and scaling the input by 2^e scales the float16 super-scales by 2^e and leaves every
    code and 6/8-bit sub-scale alone: each float32 operation of the quantizer commutes with a
    power of two. (Values of magnitude about 1 and e in 0..10 keep the super-scales between
    float16's subnormals, which round differently, and its overflow: at e = -6 a Q5_K d of about
    4e-5 is subnormal and the property fails, as it does in llama.cpp.)"""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, 256 * superblocks)).astype(np.float32)
    w[rng.random(w.shape) < 0.05] = 0  # some exact zeros
    quantize = KQUANTS[kind]
    blocks = quantize(w)
    for r in range(rows):
        assert np.array_equal(quantize(w[r:r + 1]), blocks[r:r + 1])
    scaled = quantize(w * np.float32(2.0 ** exponent)).reshape(-1, FORMATS[kind].block_bytes)
    blocks = blocks.reshape(-1, FORMATS[kind].block_bytes)
    halves = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}[kind]
    codes = np.ones(blocks.shape[1], bool)
    codes[halves] = False
    assert np.array_equal(scaled[:, codes], blocks[:, codes])
    ratio = (scaled[:, halves].copy().view(np.float16).astype(np.float64)
             / blocks[:, halves].copy().view(np.float16).astype(np.float64))
    np.testing.assert_array_equal(ratio, 2.0 ** exponent)


@pytest.mark.parametrize("quantize", [kquants.quantize_q4_k, kquants.quantize_q5_k,
                                      kquants.quantize_q6_k])
def test_chunks_do_not_change_the_blocks(golden, monkeypatch, quantize):
    """Quantizing in chunks of super-blocks (to bound memory) gives the same bytes."""
    whole = quantize(golden["input"])
    monkeypatch.setattr(kquants, "CHUNK_SUPERBLOCKS", 3)
    assert np.array_equal(quantize(golden["input"]), whole)


@pytest.mark.parametrize("quantize", [kquants.quantize_q4_k, kquants.quantize_q5_k,
                                      kquants.quantize_q6_k])
def test_rows_must_hold_whole_super_blocks(quantize):
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((4, 576), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros(512, np.float32))


def _fixture_shapes(config):
    hidden, ffn, layers, heads, kv_heads, vocab = (int(v) for v in config)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden),
              "output_norm.weight": (hidden,)}
    for i in range(layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                       p + "attn_q.weight": (heads * head_dim, hidden),
                       p + "attn_k.weight": (kv_heads * head_dim, hidden),
                       p + "attn_v.weight": (kv_heads * head_dim, hidden),
                       p + "attn_output.weight": (hidden, heads * head_dim),
                       p + "ffn_gate.weight": (ffn, hidden), p + "ffn_up.weight": (ffn, hidden),
                       p + "ffn_down.weight": (hidden, ffn)})
    return shapes


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q5_0", "Q5_1", "Q4_0",
                                       "Q8_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_mix_matches_llama_cpp(golden, file_type, tied):
    """Every tensor of llama.cpp's file gets the type tensor_format names: 12 layers (Q6_K
    attn_v/ffn_down in layers 0, 3, 6, 9, 10, 11 of Q4_K_M/Q5_K_M), the output matrix (or the
    tied embeddings) in Q6_K, and ffn_down, whose rows of 64 values fit no K-quant, falling
    back to Q5_0/Q5_1/Q8_0."""
    config = golden["config"]
    config_ns = SimpleNamespace(num_layers=int(config[2]), num_heads=int(config[3]),
                                num_kv_heads=int(config[4]), tie_word_embeddings=tied)
    shapes = _fixture_shapes(config)
    recorded = golden[f"types_{file_type}_{'tied' if tied else 'untied'}"]
    assert len(recorded) == len(shapes) - tied
    ours = {name: mixes.tensor_format(file_type.lower(), name, shapes[name], config_ns).name
            for name, _ in recorded}
    assert ours == dict(recorded.tolist())
    kinds = set(ours.values())
    if file_type in ("Q4_K_M", "Q5_K_M"):
        assert {"Q6_K", "Q8_0", "F32"} <= kinds  # the test covers the more-bits and fallbacks


def test_use_more_bits_layers():
    """llama.cpp's use_more_bits for a 32-layer model (Llama-2-7B): layers 0-3, 28-31, and
    every third from 6."""
    chosen = [i for i in range(32) if mixes.use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_fallbacks_and_70b():
    """Rows that fit no K-quant fall back as llama.cpp does; the output matrix of a model
    whose hidden size is not a multiple of 256 is Q8_0; 70B attn_v gets Q5_K."""
    config = SimpleNamespace(num_layers=30, num_heads=9, num_kv_heads=3,
                             tie_word_embeddings=True)
    names = {"blk.1.attn_q.weight": (576, 576), "blk.0.attn_v.weight": (192, 576),
             "blk.4.ffn_down.weight": (576, 1536), "token_embd.weight": (49152, 576),
             "blk.1.ffn_up.weight": (1536, 576), "blk.1.attn_norm.weight": (576,),
             "blk.1.ffn_gate.weight": (40, 40)}
    got = {n: mixes.tensor_format("q4_k_m", n, s, config).name for n, s in names.items()}
    assert got == {"blk.1.attn_q.weight": "Q5_0", "blk.0.attn_v.weight": "Q8_0",
                   "blk.4.ffn_down.weight": "Q4_K", "token_embd.weight": "Q8_0",
                   "blk.1.ffn_up.weight": "Q5_0", "blk.1.attn_norm.weight": "F32",
                   "blk.1.ffn_gate.weight": "F16"}
    assert mixes.tensor_format("q5_k_m", "blk.1.attn_q.weight", (576, 576), config).name == "Q5_1"
    llama_70b = SimpleNamespace(num_layers=80, num_heads=64, num_kv_heads=8,
                                tie_word_embeddings=False)
    assert mixes.tensor_format("q4_k_m", "blk.11.attn_v.weight", (1024, 8192),
                               llama_70b).name == "Q5_K"
    assert mixes.tensor_format("q4_k_m", "blk.0.attn_v.weight", (1024, 8192),
                               llama_70b).name == "Q6_K"
    assert mixes.tensor_format("f16", "token_embd.weight", (49152, 576), config).name == "F16"


def test_every_file_type_has_a_format():
    assert sorted(mixes.FILE_TYPE_FORMATS) == sorted(writable_formats())
    assert set(writable_formats()) >= {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m",
                                       "q5_k_m", "q6_k", "f32", "f16"}
