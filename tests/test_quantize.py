"""tools/quantize.py and xllm's quantized checkpoint format (xllm.loaders.quantized).

Sources: a tiny random Hugging Face model (SentencePiece tokenizer, HF RoPE layout, w2 with
K = 172 that no group size divides), a tiny random GGUF (tied embeddings, the first 1024
tokens of the GPT-2 vocabulary from llama.cpp's vocab file) and, for llama.cpp's K-quant file
types, a wider random model whose rows fit K-quant super-blocks (hidden size 256). llama.cpp's
own quantizer (llama-cpp-python) checks --type tensor by tensor; xllm.random_model's GGUF writer
is tested here too. Their q/k weights are scaled up so
attention is far from uniform and a wrong RoPE row permutation changes the logits visibly.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import xllm
from xllm.formats import qtensor as quant
from xllm.config import ModelConfig
from xllm.errors import ModelFormatError
from xllm.loaders import load_checkpoint
from xllm.model.weights import expected_shapes
from xllm.loaders.gguf import gguf_name
from xllm.files import xllm_format
from xllm.files.safetensors import read_safetensors, write_safetensors
from xllm.formats import registry

TOOLS = Path(__file__).resolve().parents[1] / "tools"
import quantize as qtool  # noqa: E402
from xllm.random_model import write_random_model

gguf = pytest.importorskip("gguf")

IDS = [1] + np.random.default_rng(7).integers(3, 512, 47).tolist()
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
TEXTS = ["Hello world", " the quick brown fox", "ünïcödé 123 4567", "  two  spaces\n"]
QK_SCALE = np.float32(8)  # sharper attention


def _sharpen(weights):
    return {k: np.array(w) * (QK_SCALE if k.endswith((".wq", ".wk")) else 1)
            for k, w in weights.items()}


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "src"
    write_random_model(d, "tiny", "fp32", seed=3)
    t = read_safetensors(d / "model.safetensors")
    arrays = {k: np.array(e[2].view(np.float32).reshape(e[1])) for k, e in t.items()}
    write_safetensors(str(d / "model.safetensors"), {
        k: a * (QK_SCALE if "q_proj" in k or "k_proj" in k else 1) for k, a in arrays.items()})
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return d


def _write_gguf(path, config, weights, fields):
    """A llama GGUF with F32 tensors and the given (key, value, type, item type) metadata."""
    c = config
    w = gguf.GGUFWriter(path, "llama")
    sizes = {"context_length": c.max_seq_len, "embedding_length": c.hidden_size,
             "block_count": c.num_layers, "feed_forward_length": c.intermediate_size,
             "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads}
    for key, value in sizes.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    for f in fields:
        w.add_key_value(*f)
    for name, a in weights.items():
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fields(path):
    r = gguf.GGUFReader(path)
    return [(k, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
            for k, f in r.fields.items() if k.startswith("tokenizer.")]


VOCAB = 1024  # GPT-2's first 1023 tokens (256 bytes, then one per merge, in merge order) + EOT


@pytest.fixture(scope="module")
def gpt2_vocab(data_dir):
    """(tokens, merges, token types) of a 1024-token GPT-2 vocabulary: llama.cpp's GPT-2 vocab
    file cut after 767 merges (token 256 + i is merge i's result there), plus <|endoftext|>."""
    r = gguf.GGUFReader(data_dir / "llamacpp_vocab" / "ggml-vocab-gpt-2.gguf")
    tokens, merges = (r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges"))
    n = VOCAB - 257
    assert all(m.replace(" ", "") == t for m, t in zip(merges[:n], tokens[256:]))
    return tokens[:256 + n] + [tokens[-1]], merges[:n], [1] * (256 + n) + [3]


@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory, gpt2_vocab):
    """A random llama GGUF (GPT-2 style vocabulary, tied embeddings, every K a multiple of 64)."""
    c = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=8, num_kv_heads=4, tie_word_embeddings=True, max_seq_len=256)
    rng = np.random.default_rng(5)
    weights = _sharpen({k: rng.standard_normal(s, np.float32) * np.float32(0.02) + (len(s) == 1)
                        for k, s in expected_shapes(c).items()})
    path = tmp_path_factory.mktemp("gguf") / "src.gguf"
    T, (tokens, merges, types) = gguf.GGUFValueType, gpt2_vocab
    _write_gguf(path, c, weights, [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", "gpt-2", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.bos_token_id", VOCAB - 1, T.UINT32, None),
        ("tokenizer.ggml.eos_token_id", VOCAB - 1, T.UINT32, None),
        ("tokenizer.chat_template", TEMPLATE, T.STRING, None)])
    return path


def run(*args):
    return qtool.main([str(a) for a in args])


def _logits(ckpt_or_config, weights, ids=IDS):
    config = getattr(ckpt_or_config, "config", ckpt_or_config)
    return xllm.Model(config, weights).logits(ids)


def _assert_same_tokenizer(a, b, template=TEMPLATE):
    assert a.chat_template == b.chat_template == template
    for t in TEXTS:
        assert a.tokenizer.encode(t) == b.tokenizer.encode(t), t


# ----------------------------------------------------------------------------- registry


def test_registry_rows_agree_with_gguf_and_the_packing():
    """Every row's block and bytes per block are the gguf package's; a PANELS row's reference
    dequantizer and its QTensor (repacked from the same blocks) give the same values, as do a
    FLOAT row's; every format tools/quantize.py writes has a GGUF file type and a quantizer."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    for name, f in registry.FORMATS.items():
        if f.gguf_type is not None:
            assert gguf.GGML_QUANT_SIZES[f.gguf_type] == (f.block, f.block_bytes), name
            assert f.gguf_type.name == name
        if f.quantize_type is not None:
            assert f.file_type is not None and f.from_float is not None, name
        if f.packing == registry.PANELS and f.gguf_type is not None and f.from_float:
            raw = f.from_float(w)
            packed = quant.from_gguf_blocks(raw, name, w.shape)
            assert packed.bits == f.bits and packed.asymmetric == f.asymmetric
            np.testing.assert_array_equal(packed.dequantize(), f.dequantize(raw))
            if f.codec is None:  # (a codec's QTensor carries its name)
                assert registry.packed_format(f.bits, f.block, f.asymmetric) is f
        elif f.packing == registry.FLOAT:
            assert registry.float_format(f.dtype) is f
            if f.dtype.kind == "f":  # (BF16's uint16 holds bits)
                stored = w.astype(f.dtype)
                np.testing.assert_array_equal(f.dequantize(stored), stored.astype(np.float32))
    int8 = quant.quantize(w, 8, 128)
    np.testing.assert_array_equal(registry.packed_format(8, 128, False).dequantize(int8),
                                  int8.dequantize())
    assert registry.FORMATS["INT8"].bytes_per_weight == 66 / 64


# ----------------------------------------------------------------------------- xllm format

ROUND_TRIPS = {"int8-g32": (8, 32, False, np.float16), "int8-g64": (8, 64, False, np.float16),
               "int8-g32-fp32": (8, 32, False, np.float32), "int4-asym": (4, 32, True, np.float16),
               "int4-sym": (4, 32, False, np.float16)}


@pytest.mark.parametrize("kind", ROUND_TRIPS)
def test_xllm_round_trip(hf_src, tmp_path, kind):
    bits, group, asym, sd = ROUND_TRIPS[kind]
    out = tmp_path / "q"
    assert run("--model", hf_src, "--out", out, "--bits", bits, "--group-size", group,
               "--asymmetric" if asym else "--symmetric", "--scale-dtype",
               "fp16" if sd == np.float16 else "fp32") == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["xllm_format"] == 1 and meta["quantization"] == {
        "bits": bits, "group_size": group, "asymmetric": asym,
        "scale_dtype": "fp16" if sd == np.float16 else "fp32",
        "kept": ["layers.0.w2", "layers.1.w2"], "parts": 2 if bits == 8 else 3}  # K = 172
    src, model = xllm.load(hf_src), xllm.load(out)
    assert model.config == src.config
    _assert_same_tokenizer(model, src)
    w = model.transformer.layers[0].wq
    assert isinstance(w, quant.QTensor) and w.kind.startswith(f"int{bits} g{group}")
    assert w.parts == (2 if bits == 8 else 3)  # the default for the bits
    assert not w.qs.flags.owndata and not w.qs.flags.writeable  # a view of the mapped file
    ckpt = load_checkpoint(hf_src)
    mem = quant.quantize_weights(ckpt.weights, bits, group, asym, sd)
    got = model.logits(IDS)
    np.testing.assert_array_equal(got, _logits(ckpt, mem))
    # Against float32 (logits within +-0.7, median top-2 margin 0.035; seeds 3-5 measured):
    # int8 max |diff| 0.009-0.012, relative RMS error 1.2-1.5 %, argmax agreement 98-100 %;
    # int4 max |diff| 0.15-0.17, relative RMS error 18-23 %, argmax agreement 60-79 %.
    ref = _logits(ckpt, ckpt.weights)
    diff, agree = np.abs(got - ref).max(), (got.argmax(1) == ref.argmax(1)).mean()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    if bits == 8:
        assert diff < 0.03 and rel < 0.03 and agree >= 0.9
    else:
        assert diff < 0.3 and rel < 0.3


@pytest.mark.parametrize("bits,parts", [(8, 3), (4, 2), (8, 2), (4, 1)])
def test_activation_parts_round_trip(hf_src, tmp_path, bits, parts):
    """--activation-parts is recorded in config.json and every QTensor reloads with it; a file
    without the record (written before it existed) gets the default for its bits; a bad value
    is a ModelFormatError naming the tensor."""
    out = tmp_path / "q"
    assert run("--model", hf_src, "--out", out, "--bits", bits, "--activation-parts", parts) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["quantization"]["parts"] == parts
    ckpt = load_checkpoint(out)
    qt = [w for w in ckpt.weights.values() if isinstance(w, quant.QTensor)]
    assert len(qt) > 10 and all(w.parts == parts for w in qt)
    src = load_checkpoint(hf_src)
    mem = quant.quantize_weights(src.weights, bits, 32, bits == 4, parts=parts)
    np.testing.assert_array_equal(xllm.load(out).logits(IDS), _logits(src, mem))
    del meta["quantization"]["parts"]
    (out / "config.json").write_text(json.dumps(meta))
    assert all(w.parts == (2 if bits == 8 else 3) for w in load_checkpoint(out).weights.values()
               if isinstance(w, quant.QTensor))
    meta["quantization"]["parts"] = 4
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: tensor '.*parts.*must be 1, 2 "
                                               r"or 3, got 4"):
        load_checkpoint(out)


def test_xllm_keep_and_requantize(hf_src, tmp_path):
    out = tmp_path / "q"
    assert run("--model", hf_src, "--out", out, "--bits", 8, "--keep", "embeddings,output") == 0
    meta = json.loads((out / "config.json").read_text())
    assert sorted(meta["quantization"]["kept"]) == ["layers.0.w2", "layers.1.w2", "output",
                                                    "tok_embeddings"]
    ckpt = load_checkpoint(out)
    assert ckpt.weights["tok_embeddings"].dtype == np.float32
    # an xllm directory is a source too (dequantized first); so is a dense float16 output
    f16 = tmp_path / "f16"
    assert run("--model", out, "--out", f16, "--bits", 16) == 0
    back = load_checkpoint(f16)
    assert back.weights["layers.0.wq"].dtype == np.float16
    np.testing.assert_array_equal(back.weights["layers.0.wq"],
                                  ckpt.weights["layers.0.wq"].dequantize().astype(np.float16))


def test_xllm_from_gguf_source(gguf_src, tmp_path):
    out = tmp_path / "q"
    assert run("--model", gguf_src, "--out", out, "--bits", 4) == 0  # int4 asymmetric
    assert json.loads((out / "config.json").read_text())["tokenizer"] == "tokenizer.gguf"
    src, model = xllm.load(gguf_src), xllm.load(out)
    _assert_same_tokenizer(model, src)
    assert type(model.tokenizer) is type(src.tokenizer)
    ckpt = load_checkpoint(gguf_src)
    mem = quant.quantize_weights(ckpt.weights, 4, 32, True)
    np.testing.assert_array_equal(model.logits(IDS), _logits(ckpt, mem))
    # and on to GGUF: tokenizer.gguf's fields are copied as they were
    back = tmp_path / "back.gguf"
    assert run("--model", out, "--out", back, "--bits", 8, "--format", "gguf") == 0
    assert {k: v for k, v, *_ in _fields(back)} == {k: v for k, v, *_ in _fields(gguf_src)}


# ----------------------------------------------------------------------------- GGUF output


def _gguf_types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("bits", [8, 4])
def test_gguf_from_hf(hf_src, tmp_path, bits):
    out = tmp_path / "m.gguf"
    assert run("--model", hf_src, "--out", out, "--bits", bits, "--format", "gguf") == 0
    kind = "Q8_0" if bits == 8 else "Q4_0"
    types = _gguf_types(out)
    assert types["blk.0.attn_q.weight"] == kind and types["blk.0.ffn_down.weight"] == "F32"
    assert types["output_norm.weight"] == "F32"
    model = xllm.load(out)
    assert model.config.rope_interleaved and isinstance(model.transformer.layers[0].wq,
                                                         quant.QTensor)
    _assert_same_tokenizer(model, xllm.load(hf_src))
    ckpt = load_checkpoint(hf_src)
    c = ckpt.config
    perm = {k: qtool.to_interleaved(w, c.num_heads if k.endswith("wq") else c.num_kv_heads)
            if k.endswith((".wq", ".wk")) else w for k, w in ckpt.weights.items()}
    got = model.logits(IDS)
    # bitwise: the same quantization of the same (row-permuted) matrices
    np.testing.assert_array_equal(got, _logits(model.config, quant.quantize_weights(perm, bits)))
    # and the same model as the HF-layout one: only the order of the q.k sums differs, which
    # moves the logits by up to 2.4e-5 here (float32 differences flipping a few activation
    # roundings in the int8 quantization of x); a wrong permutation moves them by 0.44
    hf_layout = _logits(ckpt, quant.quantize_weights(ckpt.weights, bits))
    np.testing.assert_allclose(got, hf_layout, rtol=0, atol=1e-3)
    wrong = _logits(model.config, quant.quantize_weights(ckpt.weights, bits))
    assert np.abs(wrong - hf_layout).max() > 0.1


def test_gguf_f32_f16_from_hf(hf_src, tmp_path):
    ckpt = load_checkpoint(hf_src)
    ref = _logits(ckpt, ckpt.weights)
    for bits, tol in ((32, 2e-5), (16, 2e-3)):
        out = tmp_path / f"f{bits}.gguf"
        assert run("--model", hf_src, "--out", out, "--bits", bits, "--format", "gguf") == 0
        assert _gguf_types(out)["blk.1.attn_k.weight"] == f"F{bits}"
        np.testing.assert_allclose(xllm.load(out).logits(IDS), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("bits,flag,kind", [(8, "--symmetric", "Q8_0"), (4, "--symmetric", "Q4_0"),
                                            (4, "--asymmetric", "Q4_1")])
def test_gguf_from_gguf(gguf_src, tmp_path, bits, flag, kind):
    out = tmp_path / "m.gguf"
    assert run("--model", gguf_src, "--out", out, "--bits", bits, flag, "--format", "gguf") == 0
    types = _gguf_types(out)
    assert "output.weight" not in types and types["token_embd.weight"] == kind
    meta = gguf.GGUFReader(out).fields
    assert meta["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{kind}"]
    src_fields = {k: v for k, v, *_ in _fields(gguf_src)}
    assert {k: v for k, v, *_ in _fields(out)} == src_fields  # every tokenizer.* field
    ckpt, model = load_checkpoint(gguf_src), xllm.load(out)
    mem = quant.quantize_weights(ckpt.weights, bits, 32, kind == "Q4_1")
    np.testing.assert_array_equal(model.logits(IDS), _logits(ckpt, mem))


def test_gguf_from_tokenizer_json(tmp_path, gpt2_vocab):
    """A Hugging Face source with a byte-level BPE tokenizer.json becomes GGUF "gpt2" metadata
    (tokens, merges, types, pre-tokenizer name) that tokenizes the same."""
    src = tmp_path / "hf"
    write_random_model(src, "tiny", "fp32", seed=4, vocab_size=VOCAB, tie_word_embeddings=True)
    os.remove(src / "tokenizer.model")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, bos_token_id=VOCAB - 1,
                                                     eos_token_id=VOCAB - 1)))
    tokens, merges, _ = gpt2_vocab
    (src / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:-1])},
                  "merges": merges},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
        "added_tokens": [{"id": VOCAB - 1, "content": tokens[-1], "special": True}]}))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokens[-1], "eos_token": tokens[-1], "chat_template": TEMPLATE}))
    out = tmp_path / "m.gguf"
    assert run("--model", src, "--out", out, "--bits", 32, "--format", "gguf") == 0
    meta = gguf.GGUFReader(out).fields
    assert meta["tokenizer.ggml.model"].contents() == "gpt2"
    assert meta["tokenizer.ggml.pre"].contents() == "smollm"  # digits one by one, then GPT-2
    assert meta["tokenizer.ggml.merges"].contents() == merges
    assert meta["tokenizer.ggml.bos_token_id"].contents() == VOCAB - 1
    ours, theirs = xllm.load(out), xllm.load(src)
    _assert_same_tokenizer(ours, theirs)
    np.testing.assert_allclose(ours.logits(IDS), theirs.logits(IDS), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- llama.cpp


def _greedy(next_logits, ids, n):
    """n greedy tokens and each step's margin between the best two logits."""
    ids, margins = list(ids), []
    for _ in range(n):
        z = next_logits(ids)
        top2 = np.sort(z)[-2:]
        margins.append(top2[1] - top2[0])
        ids.append(int(np.argmax(z)))
    return ids[-n:], margins


@pytest.fixture()
def one_thread():
    """xllm on one thread (llama.cpp gets one too): two thread pools taking turns on a 2-core
    machine spin against each other, which made this test 20 times slower."""
    threads = xllm.get_threads()
    xllm.set_threads(1)
    yield
    xllm.set_threads(threads)


def test_llama_cpp_runs_our_gguf(hf_src, tmp_path, one_thread):
    """llama.cpp (llama-cpp-python) loads the tool's GGUFs: the same tokens for text, logits
    close to xllm's, and the same greedy tokens while both margins are clear."""
    llama_cpp = pytest.importorskip("llama_cpp")
    prompt = IDS[:12]
    # measured: max |logit diff| 2e-7 (F32, both float32 throughout), 0.009 (Q8_0) and 0.007
    # (Q4_0: llama.cpp rounds the int8 activations and their fp16 scales differently); the 16
    # greedy tokens were the same for all three, though the smallest margin was 3e-4.
    for bits, tol in ((32, 1e-5), (8, 2e-2), (4, 2e-2)):
        out = tmp_path / f"m{bits}.gguf"
        assert run("--model", hf_src, "--out", out, "--bits", bits, "--format", "gguf") == 0
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True,
                              verbose=False, type_k=0, type_v=0)  # an F32 KV cache
        model = xllm.load(out, kv_dtype="float32")
        for t in TEXTS:
            assert llm.tokenize(t.encode(), add_bos=False, special=False) == \
                model.tokenizer.encode(t), t

        def cpp(ids):
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[len(ids) - 1])

        ours, our_margins = _greedy(lambda ids: model.logits(ids)[-1], prompt, 16)
        theirs, their_margins = _greedy(cpp, prompt, 16)
        np.testing.assert_allclose(cpp(prompt + ours), model.logits(prompt + ours)[-1],
                                   rtol=0, atol=tol)
        for a, b, m1, m2 in zip(ours, theirs, our_margins, their_margins):
            if min(m1, m2) < 2 * tol:
                break  # a near-tie: the sequences may part here
            assert a == b
        else:
            assert ours == theirs
        llm.close()


# ----------------------------------------------------------------------------- llama.cpp's mixes


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory):
    """A random Hugging Face model whose rows fit K-quant super-blocks: hidden size 256,
    feed-forward 512, 8 layers, 4 heads sharing 2 KV heads, untied output, vocabulary 512."""
    d = tmp_path_factory.mktemp("wide") / "src"
    write_random_model(d, "tiny", "fp32", seed=5, hidden_size=256, intermediate_size=512,
                       num_layers=8, num_heads=4, num_kv_heads=2)
    return d


MIX_TYPES = ["q4_k_m", "q5_k_m", "q6_k", "q5_0", "q5_1"]


@pytest.mark.parametrize("file_type", MIX_TYPES)
def test_file_type_mix(wide_src, tmp_path, file_type):
    """--type writes each tensor in the format of llama.cpp's mix (an --out ending in .gguf
    selects GGUF), the blocks its quantizer makes of the float32 matrix, and xllm loads the file:
    its logits differ from the float32 model's (largest |logit| 1.27) by at most twice what was
    measured with two activation parts (q4_k_m 0.22, q5_k_m 0.17, q6_k 0.066, q5_0 0.21, q5_1
    0.15); with the codecs' default one part: 0.21, 0.18, 0.078, 0.21, 0.16."""
    out = tmp_path / "m.gguf"
    assert run("--model", wide_src, "--out", out, "--type", file_type) == 0
    ckpt = load_checkpoint(wide_src)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == \
        registry.writable_formats()[file_type].file_type
    file_names = {gguf_name(name): name for name in expected_shapes(ckpt.config)}
    kinds = set()
    for t in reader.tensors:
        name = file_names[t.name]
        shape = expected_shapes(ckpt.config)[name]
        expected = qtool.mixes.tensor_format(file_type, t.name, shape, ckpt.config)
        assert t.tensor_type.name == expected.name, t.name
        kinds.add(expected.name)
        matrix = qtool.gguf_matrix(ckpt, name)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1),
                                      np.asarray(expected.from_float(matrix)).reshape(-1))
    if file_type in ("q4_k_m", "q5_k_m"):
        assert "Q6_K" in kinds and len(kinds) == 3  # the file type's, Q6_K and F32 (norms)
    ref = _logits(ckpt, ckpt.weights)
    bound = {"q4_k_m": 0.44, "q5_k_m": 0.34, "q6_k": 0.13, "q5_0": 0.42, "q5_1": 0.3}
    np.testing.assert_allclose(xllm.load(out).logits(IDS), ref, rtol=0, atol=bound[file_type])


def test_pure_file_type(wide_src, tmp_path):
    """--pure: every matrix in the file type's own format (llama-quantize --pure)."""
    out = tmp_path / "m.gguf"
    assert run("--model", wide_src, "--out", out, "--type", "q4_k_m", "--pure") == 0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {k for n, k in kinds.items() if not n.endswith("norm.weight")} == {"Q4_K"}


@pytest.mark.parametrize("source", ["wide", "tiny"])
@pytest.mark.parametrize("file_type", MIX_TYPES + ["q8_0", "q4_0", "q4_1"])
def test_same_tensors_as_llama_cpp(wide_src, hf_src, tmp_path, source, file_type):
    """llama.cpp's llama_model_quantize and --type, applied to the same float32 GGUF, write the
    same tensors: the same type for each, byte for byte the same blocks. The tiny model's rows
    (64 and 172 values) fit no K-quant: both fall back to Q5_0/Q5_1/Q8_0 and to F16."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    f32 = tmp_path / "f32.gguf"
    assert run("--model", wide_src if source == "wide" else hf_src, "--out", f32,
               "--type", "f32") == 0
    ours = tmp_path / "ours.gguf"
    assert run("--model", f32, "--out", ours, "--type", file_type) == 0
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    our_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    their_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, t in their_tensors.items():
        assert our_tensors[name].tensor_type == t.tensor_type, name
        assert np.array_equal(our_tensors[name].data, t.data), name


def test_llama_cpp_runs_our_k_quants(wide_src, tmp_path, one_thread):
    """llama.cpp loads a q4_k_m file of the tool and its logits agree with xllm's (which expands
    the K-quants to float32, where llama.cpp rounds the activations to 8 bits): max |difference|
    0.023 measured, bound 0.05."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    assert run("--model", wide_src, "--out", out, "--type", "q4_k_m") == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    prompt = IDS[:24]
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    llm.close()
    ours = xllm.load(out, kv_dtype="float32").logits(prompt)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.05)


# ----------------------------------------------------------------------------- random GGUF


WIDE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=8, num_heads=4,
                  num_kv_heads=2)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0", "q4_k_m"])
def test_random_gguf_runs_in_xllm_and_llama_cpp(tmp_path, one_thread, file_type):
    """xllm.random_model writes a random model straight to a GGUF of a llama.cpp file type
    (python -m xllm.random_model --type ...): every tensor in the mix's format, weights of
    standard deviation 0.02 (norms around 1), and xllm and llama.cpp load it: the same tokens
    and logits within 0.04 of each other (largest |logit| about 1.1; measured differences 0.018
    q8_0, 0.015 q4_0, 0.020 q4_k_m: llama.cpp rounds the activations to 8 bits, xllm splits
    them into 2 or 3 int8 parts or, for K-quants, expands the weights to float32)."""
    from xllm import random_model
    from xllm.formats import mixes
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "random.gguf"
    random_model.write_random_gguf(out, "tiny", file_type, seed=1, **WIDE_SHAPE)
    cfg = dict(random_model.PRESETS["tiny"], **WIDE_SHAPE)
    shapes = random_model.gguf_tensor_shapes(cfg)
    config = SimpleNamespace(num_layers=8, num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
    reader = gguf.GGUFReader(out)
    assert [t.name for t in reader.tensors] == list(shapes)
    for t in reader.tensors:
        expected = mixes.tensor_format(file_type, t.name, shapes[t.name], config)
        assert t.tensor_type == expected.gguf_type, t.name
        values = expected.dequantize(np.asarray(t.data)).reshape(shapes[t.name])
        center = 1.0 if len(shapes[t.name]) == 1 else 0.0
        assert abs(np.std(values) - 0.02) < 0.003 and abs(np.mean(values) - center) < 0.01
    model = xllm.load(out, kv_dtype="float32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            model.tokenizer.encode(text), text
    prompt = IDS[:16]
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    llm.close()
    np.testing.assert_allclose(model.logits(prompt), theirs, rtol=0, atol=0.04)


def test_random_gguf_memory_stays_small(tmp_path, monkeypatch):
    """The writer holds one chunk of rows and the block pool, never the model: writing a 23 MB
    Q8_0 file with 1 MB chunks and a pool of 2^16 values allocates at most 4 MB at once
    (tracemalloc sees NumPy's buffers). The CLI writes GGUF for an --out ending in .gguf."""
    import tracemalloc
    from xllm import random_model
    monkeypatch.setattr(random_model, "GGUF_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(random_model, "GGUF_POOL_VALUES", 1 << 16)
    out = tmp_path / "m.gguf"
    tracemalloc.start()
    try:
        random_model.write_random_gguf(out, "tiny", "q8_0", hidden_size=512,
                                       intermediate_size=1536, num_layers=4, vocab_size=8192)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.getsize(out) > 20e6
    assert peak < 4e6, peak
    again = tmp_path / "again.gguf"
    random_model.main(["--shape", "tiny", "--out", str(again)])
    assert gguf.GGUFReader(again).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(ValueError, match="not one of"):
        random_model.write_random_gguf(tmp_path / "x.gguf", "tiny", "q2_k")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt,type_args,bits_args", [
    ("gguf", ("--type", "q8_0", "--pure"), ("--bits", 8)),
    ("gguf", ("--type", "q4_0", "--pure"), ("--bits", 4)),
    ("gguf", ("--type", "q4_1", "--pure"), ("--bits", 4, "--asymmetric")),
    ("gguf", ("--type", "f16"), ("--bits", 16)),
    ("xllm", ("--type", "q4_0"), ("--bits", 4, "--symmetric")),
    ("xllm", ("--type", "q4_1", "--asymmetric"), ("--bits", 4)),
    ("xllm", ("--type", "f32"), ("--bits", 32))])
def test_type_names_the_format(hf_src, tmp_path, fmt, type_args, bits_args):
    """--type (llama.cpp's names, the registry's writable formats) writes the files of the
    --bits options it stands for: in GGUF with --pure (no llama.cpp mix), except the ffn_down
    matrices, whose rows of 172 values fit no block: --bits keeps them F32, --type falls back to
    F16 as llama.cpp does."""
    assert sorted(registry.writable_formats()) == ["f16", "f32", "q4_0", "q4_1", "q4_k_m",
                                                   "q5_0", "q5_1", "q5_k_m", "q6_k", "q8_0"]
    suffix = ".gguf" if fmt == "gguf" else ""
    by_type = tmp_path / f"type{suffix}"
    by_bits = tmp_path / f"bits{suffix}"
    assert run("--model", hf_src, "--out", by_type, "--format", fmt, *type_args) == 0
    assert run("--model", hf_src, "--out", by_bits, "--format", fmt, *bits_args) == 0
    if fmt == "gguf":
        typed, bits = gguf.GGUFReader(by_type), gguf.GGUFReader(by_bits)
        assert [(k, f.contents()) for k, f in typed.fields.items()] == \
            [(k, f.contents()) for k, f in bits.fields.items()]
        for a, b in zip(typed.tensors, bits.tensors, strict=True):
            assert a.name == b.name and list(a.shape) == list(b.shape)
            if a.name.endswith("ffn_down.weight") and bits.tensors[0].tensor_type.name != "F16":
                assert (a.tensor_type.name, b.tensor_type.name) == ("F16", "F32")
                np.testing.assert_array_equal(a.data, b.data.astype(np.float16))
            else:
                assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    else:
        assert sorted(os.listdir(by_type)) == sorted(os.listdir(by_bits))
        for name in os.listdir(by_type):
            assert (by_type / name).read_bytes() == (by_bits / name).read_bytes(), name


def test_bad_options(hf_src, tmp_path, capsys):
    for bad in (("--bits", 3), ("--bits", 8, "--activation-parts", 4), ("--type", "q2_k"),
                ("--bits", 8, "--type", "q8_0"), ()):
        with pytest.raises(SystemExit) as e:
            run("--model", hf_src, "--out", tmp_path / "x", *bad)
        assert e.value.code == 2
    for args, msg in [(("--bits", 8, "--group-size", 48), "not a power of two"),
                      (("--bits", 8, "--group-size", 128), "does not divide hidden_size 64"),
                      (("--bits", 4, "--group-size", 64), "int4 supports group size 32 only"),
                      (("--bits", 8, "--asymmetric"), "--bits 4 only"),
                      (("--bits", 8, "--format", "gguf", "--group-size", 64), "GGUF blocks"),
                      (("--bits", 8, "--keep", "norms"), "not one of embeddings, output"),
                      (("--bits", 8, "--format", "gguf", "--activation-parts", 3),
                       "--activation-parts applies to the xllm format"),
                      (("--bits", 16, "--activation-parts", 2), "with --bits 8 or 4"),
                      (("--type", "q4_0", "--asymmetric"), "--type q4_0 is symmetric"),
                      (("--type", "q4_1", "--symmetric"), "--type q4_1 is asymmetric"),
                      (("--type", "q8_0", "--group-size", 64), "blocks of 32 values"),
                      (("--type", "f16", "--symmetric"), "not quantized"),
                      (("--type", "q4_k_m", "--format", "xllm"), "cannot hold Q4_K"),
                      (("--type", "q5_0", "--symmetric"), "fixes its layout"),
                      (("--type", "q6_k", "--group-size", 64), "blocks of 256 values"),
                      (("--bits", 8, "--pure"), "--pure applies to --type"),
                      (("--type", "q8_0", "--pure", "--format", "xllm"), "--pure applies")]:
        capsys.readouterr()
        assert run("--model", hf_src, "--out", tmp_path / "x", *args) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert os.listdir(tmp_path) == []


def test_refuses_source_and_existing(hf_src, tmp_path, capsys):
    before = sorted(os.listdir(hf_src))
    for out in (hf_src, hf_src / "sub", hf_src.parent, hf_src / "model.safetensors"):
        assert run("--model", hf_src, "--out", out, "--bits", 8, "--force") == 2
        assert "source model" in capsys.readouterr().err
    assert sorted(os.listdir(hf_src)) == before
    out = tmp_path / "q"
    assert run("--model", hf_src, "--out", out, "--bits", 4) == 0
    assert run("--model", hf_src, "--out", out, "--bits", 8) == 2
    assert "exists (pass --force" in capsys.readouterr().err
    assert run("--model", hf_src, "--out", out, "--bits", 8, "--force") == 0
    assert sorted(os.listdir(tmp_path)) == ["q"] and load_checkpoint(out).config.vocab_size == 512
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    gguf_out = tmp_path / "q.gguf"
    assert run("--model", hf_src, "--out", gguf_out, "--bits", 8, "--format", "gguf") == 0
    assert run("--model", hf_src, "--out", gguf_out, "--bits", 4, "--format", "gguf",
               "--force") == 0


def _unrelated(tmp_path, kind, hf_src):
    """Something at --out that quantize.py did not write."""
    out = tmp_path / "out"
    if kind == "text file":
        out.write_text("my notes")
    elif kind == "empty folder":
        out.mkdir()
    else:
        assert run("--model", hf_src, "--out", out, "--bits", 8) == 0
        if kind == "quantized folder with more files":
            (out / "notes.txt").write_text("mine")
        elif kind == "quantized folder with a subfolder":
            (out / "data").mkdir()
        else:  # "folder without xllm_format"
            meta = json.loads((out / "config.json").read_text())
            del meta["xllm_format"]
            (out / "config.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("kind", ["text file", "empty folder", "quantized folder with more files",
                                  "quantized folder with a subfolder",
                                  "folder without xllm_format"])
def test_force_refuses_what_it_did_not_write(hf_src, tmp_path, capsys, kind):
    out = _unrelated(tmp_path, kind, hf_src)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    for fmt in ("xllm", "gguf"):
        assert run("--model", hf_src, "--out", out, "--bits", 8, "--format", fmt, "--force") == 2
        err = capsys.readouterr().err
        assert "is not a model this tool wrote" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("fmt,module,target", [("xllm", xllm_format, "write_safetensors"),
                                               ("gguf", qtool, "to_interleaved")])
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(hf_src, tmp_path, monkeypatch, capsys, fmt, module, target,
                                       exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(module, target, boom)
    out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
    assert run("--model", hf_src, "--out", out, "--bits", 8, "--format", fmt) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] in ("quantize: error: RuntimeError: disk on fire",
                       "quantize: interrupted; nothing was written")
    assert os.listdir(tmp_path) == []


SLOW_QUANTIZE = """
import sys, time
import quantize  # tools/ is on PYTHONPATH
from xllm.files import xllm_format
def write_slowly(*args, **kwargs):  # the temporary output exists by now
    time.sleep(60)
xllm_format.write_safetensors = write_slowly
quantize.to_interleaved = write_slowly
sys.exit(quantize.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fmt", ["xllm", "gguf"])
def test_sigterm_leaves_nothing(hf_src, tmp_path, fmt):
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TOOLS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, "--model", str(hf_src),
                          "--out", str(out), "--bits", "8", "--format", fmt],
                         stderr=subprocess.PIPE, text=True, env=env)
    tmp = tmp_path / f"q.tmp-{p.pid}"
    deadline = time.monotonic() + 60
    while not tmp.exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 2 and "quantize: interrupted; nothing was written" in err, err
    assert os.listdir(tmp_path) == []


@pytest.fixture()
def qdir(hf_src, tmp_path):
    out = tmp_path / "q"
    assert run("--model", hf_src, "--out", out, "--bits", 8) == 0
    return out


def _rewrite(path, change):
    """Rewrite a safetensors file with change({name: array}) applied."""
    t = read_safetensors(path)
    dt = {"U8": np.uint8, "F16": np.float16, "F32": np.float32}
    arrays = {k: np.array(e[2].view(dt[e[0]]).reshape(e[1])) for k, e in t.items()}
    change(arrays)
    write_safetensors(str(path), arrays)


def test_truncated_file(qdir):
    f = qdir / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(qdir)


def test_group_size_mismatch(qdir):
    meta = json.loads((qdir / "config.json").read_text())
    meta["quantization"]["group_size"] = 64
    (qdir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: tensor 'tok_embeddings'.*"
                                               r"config\.json records \(8, 64"):
        load_checkpoint(qdir)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update({"layers.1.wq.scales": a["layers.1.wq.scales"][:, :1].copy()}),
     r"tensor 'layers\.1\.wq'.*\(8, 64,"),  # one group: group 64 (the wrong size)
    (lambda a: a.update({"layers.1.wq.scales": a["layers.1.wq.scales"][:2].copy()}),
     r"tensor 'layers\.1\.wq'.*scales of a \(64, 64\) int8 g32 tensor must be .*\(4, 2, 16\)"),
    (lambda a: a.pop("layers.1.wk.scales"), r"tensor 'layers\.1\.wk'.*needs"),
    (lambda a: a.pop("layers.0.w3.qs"), r"missing tensor 'layers\.0\.w3'"),
    (lambda a: a.update({"norm": a["norm"][:10].copy()}), r"'norm' has shape \(10,\)")])
def test_bad_arrays(qdir, change, match):
    _rewrite(qdir / "model.safetensors", change)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors.*" + match):
        load_checkpoint(qdir)


def test_bad_config(qdir):
    meta = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps(dict(meta, xllm_format=2)))
    with pytest.raises(ModelFormatError, match="xllm_format 2 is not supported"):
        load_checkpoint(qdir)
    (qdir / "config.json").write_text(json.dumps(dict(meta, tokenizer="../tokenizer.model")))
    with pytest.raises(ModelFormatError, match="tokenizer file"):
        load_checkpoint(qdir)
