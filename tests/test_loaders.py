"""Tests for xllm.loaders: HF safetensors, Meta .pth, llama2.c .bin, and bad input."""
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from xllm.errors import ModelFormatError
from xllm.loaders import load_checkpoint
from xllm.model.weights import expected_shapes
from xllm.loaders.hf import canonical_name

torch = pytest.importorskip("torch")

DATA = Path(os.environ.get("XLLM_TEST_DATA")
            or Path(__file__).resolve().parents[2] / "shared" / "data")
L2C = DATA / "llama2c"


def need_data(path):
    if not path.exists():
        if os.environ.get("XLLM_REQUIRE_DATA") == "1":
            pytest.fail(f"test data missing: {path}")
        pytest.skip(f"test data missing: {path}")
    return path


def is_mapped(a):
    """True if `a` is a read-only view whose memory belongs to an mmap (directly or via torch)."""
    if a.flags.writeable or a.flags.owndata:
        return False
    base = a
    while base is not None:
        if isinstance(base, (mmap.mmap, torch.Tensor)):
            return True
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


def bits(t):
    """Exact numpy representation of a torch tensor (bf16 as uint16 bits)."""
    t = t.detach()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


# ----------------------------------------------------------------------------- Hugging Face

def make_hf(path, dtype=torch.float32, tied=False, kv_heads=2, shard=None, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
              tie_word_embeddings=tied, rms_norm_eps=1e-5)
    kw.update(cfg)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms too, so a mix-up between tensors cannot go unnoticed
    model = model.to(dtype)
    extra = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **extra)
    return model


def check_hf(ckpt, model, dtype):
    sd = model.state_dict()
    assert ckpt.config.rope_interleaved is False
    assert set(ckpt.weights) == set(expected_shapes(ckpt.config))
    for name, t in sd.items():
        canon = canonical_name(name)
        if canon == "output" and ckpt.config.tie_word_embeddings:
            assert "output" not in ckpt.weights
            continue
        w = ckpt.weights[canon]
        assert w.dtype == {torch.float32: np.float32, torch.bfloat16: np.uint16,
                           torch.float16: np.float16}[dtype]
        assert np.array_equal(w, bits(t)), name
        assert is_mapped(w), name


@pytest.mark.parametrize("dtype,tied,kv", [(torch.float32, False, 2), (torch.bfloat16, False, 4),
                                           (torch.bfloat16, True, 1), (torch.float16, True, 2)])
def test_hf_roundtrip(tmp_path, dtype, tied, kv):
    model = make_hf(tmp_path, dtype, tied, kv)
    ck = load_checkpoint(tmp_path)
    c = ck.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (128, 32, 48, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_seq_len) == (4, kv, 8, 64)
    assert c.tie_word_embeddings == tied and c.rms_norm_eps == 1e-5
    assert ck.tokenizer_path is None and ck.source == str(tmp_path)
    check_hf(ck, model, dtype)
    # a path to the .safetensors file stands for its directory
    assert load_checkpoint(tmp_path / "model.safetensors").config == c


def test_hf_sharded_and_rope_llama3(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = make_hf(tmp_path, torch.bfloat16, shard="20KB", vocab_size=256, hidden_size=64,
                    intermediate_size=96, rope_parameters=rope, eos_token_id=[2, 7])
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    ck = load_checkpoint(tmp_path)
    check_hf(ck, model, torch.bfloat16)
    c = ck.config
    assert c.rope_theta == 50000.0
    assert c.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert (c.eos_token_id, c.extra_eos_token_ids) == (2, (7,))
    assert ck.tokenizer_path == str(tmp_path / "tokenizer.model")


def test_hf_transformers4_config(tmp_path):
    make_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=123.0, eos_token_id=2, rope_scaling={
        "type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 10]}))
    c = load_checkpoint(tmp_path).config
    assert c.rope_theta == 123.0 and c.rope_scaling["factor"] == 4.0
    assert (c.eos_token_id, c.extra_eos_token_ids) == (2, (9, 10))
    # untied in config, but no lm_head.weight in the file: treated as tied
    model = make_hf(tmp_path / "t", tied=True)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    ck = load_checkpoint(tmp_path / "t")
    assert ck.config.tie_word_embeddings and "output" not in ck.weights
    check_hf(ck, model, torch.float32)


def test_stories260k_hf_matches_bin():
    hf = load_checkpoint(need_data(L2C / "stories260K_hf"))
    b = load_checkpoint(need_data(L2C / "stories260K.bin"))
    assert hf.config.rope_interleaved is False and b.config.rope_interleaved is True
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_seq_len", "tie_word_embeddings", "rope_theta"):
        assert getattr(hf.config, f) == getattr(b.config, f), f
    hs = b.config.head_dim

    def permute(w, heads):  # MANIFEST section 3: adjacent pairs -> rotate_half order
        return w.reshape(heads, hs // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)

    assert set(hf.weights) == set(b.weights)
    for k, w in b.weights.items():
        if k.endswith(".wq"):
            w = permute(w, b.config.num_heads)
        elif k.endswith(".wk"):
            w = permute(w, b.config.num_kv_heads)
        assert np.array_equal(hf.weights[k], w), k
        assert is_mapped(hf.weights[k])


# ----------------------------------------------------------------------------- llama2.c

def test_stories260k_bin():
    ck = load_checkpoint(need_data(L2C / "stories260K.bin"))
    c = ck.config
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size, c.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_word_embeddings and c.rope_interleaved and c.head_dim == 8
    assert "output" not in ck.weights and ck.weights["layers.4.w2"].shape == (64, 172)
    assert ck.tokenizer_path == str(L2C / "tok512.model")
    raw = np.fromfile(L2C / "stories260K.bin", dtype="<f4", offset=28)
    assert np.array_equal(ck.weights["tok_embeddings"].ravel(), raw[:512 * 64])
    assert np.array_equal(ck.weights["layers.0.attention_norm"], raw[512 * 64:512 * 64 + 64])
    assert all(is_mapped(w) for w in ck.weights.values())


def test_aidreams260k_bin():
    ck = load_checkpoint(need_data(L2C / "aidreams260K.bin"))
    c = ck.config
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size, c.max_seq_len) == (64, 172, 4, 4, 4, 512, 128)
    assert c.tie_word_embeddings and c.head_dim == 16
    assert ck.tokenizer_path == str(L2C / "aidreams260K_tok512.bin")  # model-specific first


def random_llama2c(dim=16, hidden=24, layers=2, heads=4, kv_heads=2, vocab=32, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    kv = dim // heads * kv_heads
    shapes = {"tok_embeddings": (vocab, dim), "attention_norm": (layers, dim),
              "wq": (layers, dim, dim), "wk": (layers, kv, dim), "wv": (layers, kv, dim),
              "wo": (layers, dim, dim), "ffn_norm": (layers, dim), "w1": (layers, hidden, dim),
              "w2": (layers, dim, hidden), "w3": (layers, hidden, dim), "norm": (dim,),
              "freqs": (2, seq, dim // heads // 2), "output": (vocab, dim)}
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return (dim, hidden, layers, heads, kv_heads, vocab, seq), w


def write_v0(path, hdr, w, tied):
    order = ["tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2",
             "w3", "norm", "freqs"] + ([] if tied else ["output"])
    h = list(hdr)
    h[5] = h[5] if tied else -h[5]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *h) + b"".join(w[k].tobytes() for k in order))


def write_v1(path, hdr, w, tied, version=1):
    order = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo",
             "w1", "w2", "w3"] + ([] if tied else ["output"])
    head = struct.pack("<Ii7iB", 0x616B3432, version, *hdr, int(tied))
    with open(path, "wb") as f:
        f.write(head.ljust(256, b"\0") + b"".join(w[k].tobytes() for k in order))


def check_llama2c(ck, hdr, w, tied):
    c = ck.config
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.vocab_size, c.max_seq_len) == hdr
    assert c.tie_word_embeddings == tied and c.rope_interleaved
    assert set(ck.weights) == set(expected_shapes(c))
    for k, a in ck.weights.items():
        parts = k.split(".")
        ref = w[parts[2]][int(parts[1])] if parts[0] == "layers" else w[k]
        assert np.array_equal(a, ref), k
        assert a.dtype == np.float32 and is_mapped(a), k


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("writer", [write_v0, write_v1])
def test_llama2c_written(tmp_path, writer, tied):
    hdr, w = random_llama2c()
    path = tmp_path / "model.bin"
    writer(path, hdr, w, tied)
    (tmp_path / "tokenizer.bin").write_bytes(b"x")
    (tmp_path / "tok32.bin").write_bytes(b"x")
    ck = load_checkpoint(path)
    check_llama2c(ck, hdr, w, tied)
    assert ck.tokenizer_path == str(tmp_path / "tok32.bin")


def test_llama2c_detected_without_bin_suffix(tmp_path):
    hdr, w = random_llama2c()
    write_v0(tmp_path / "weights", hdr, w, True)
    check_llama2c(load_checkpoint(tmp_path / "weights"), hdr, w, True)
    assert load_checkpoint(tmp_path / "weights").tokenizer_path is None


# ----------------------------------------------------------------------------- Meta

def random_meta(dtype, seed=0, dim=32, layers=2, heads=4, kv_heads=2, vocab=64, inter=48):
    g = torch.Generator().manual_seed(seed)
    kv = dim // heads * kv_heads
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,),
              "output.weight": (vocab, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (kv, dim),
                       p + "attention.wv.weight": (kv, dim), p + "attention.wo.weight": (dim, dim),
                       p + "feed_forward.w1.weight": (inter, dim),
                       p + "feed_forward.w2.weight": (dim, inter),
                       p + "feed_forward.w3.weight": (inter, dim),
                       p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)})
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    sd["rope.freqs"] = torch.zeros(4)  # Llama 1 checkpoints carry this; it must be ignored
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads,
              "vocab_size": -1, "norm_eps": 1e-6, "multiple_of": 16}
    return sd, params


def split(sd, n, vocab_parallel):
    """Split a state dict into n model-parallel shards like Meta's checkpoints."""
    shards = [{} for _ in range(n)]
    for k, t in sd.items():
        short = k.split(".")[-2]
        axis = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                "tok_embeddings": 0 if vocab_parallel else 1}.get(short)
        for s, part in zip(shards, [t] * n if axis is None else t.chunk(n, dim=axis)):
            s[k] = part.clone()
    return shards


def map_meta(name):
    if name == "rope.freqs":
        return None
    return name[:-len(".weight")].replace(".attention.", ".").replace(".feed_forward.", ".")


@pytest.mark.parametrize("dtype,n,vocab_parallel", [(torch.bfloat16, 1, False),
                                                    (torch.float32, 2, False),
                                                    (torch.float16, 2, True)])
def test_meta(tmp_path, dtype, n, vocab_parallel):
    sd, params = random_meta(dtype)
    if n == 1:
        params.update(rope_theta=500000.0, use_scaled_rope=True, max_seq_len=256)
    (tmp_path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split(sd, n, vocab_parallel)):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    ck = load_checkpoint(tmp_path)
    c = ck.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads) == (64, 32, 48, 2, 4, 2)
    assert c.rope_interleaved and not c.tie_word_embeddings and c.rms_norm_eps == 1e-6
    assert ck.tokenizer_path == str(tmp_path / "tokenizer.model")
    if n == 1:
        assert c.rope_theta == 500000.0 and c.max_seq_len == 256
        assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    else:
        assert c.rope_theta == 10000.0 and c.max_seq_len == 2048 and c.rope_scaling is None
    assert set(ck.weights) == set(expected_shapes(c))
    for k, t in sd.items():
        if map_meta(k):
            assert np.array_equal(ck.weights[map_meta(k)], bits(t)), k
    if n == 1:
        assert all(is_mapped(w) for w in ck.weights.values())


# ----------------------------------------------------------------------------- bad input

def expect_error(path, *words):
    with pytest.raises(ModelFormatError) as e:
        load_checkpoint(path)
    for w in words:
        assert str(w) in str(e.value), (w, str(e.value))
    return str(e.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf(d)
    return d


def hf_copy(hf_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    return d, d / "model.safetensors"


def test_truncated_safetensors(hf_dir, tmp_path):
    d, f = hf_copy(hf_dir, tmp_path)
    os.truncate(f, f.stat().st_size - 100)
    expect_error(d, "model.safetensors", "truncated", f.stat().st_size)
    os.truncate(f, 5)
    expect_error(d, "model.safetensors", "too short")


def test_corrupt_safetensors_header(hf_dir, tmp_path):
    d, f = hf_copy(hf_dir, tmp_path)
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff{garbage!!"
    f.write_bytes(bytes(data))
    expect_error(d, "model.safetensors", "corrupt safetensors header")
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))
    expect_error(d, "model.safetensors", "header claims")


def rewrite_safetensors(f, change):
    """Re-save a safetensors file after `change(dict of tensors)` mutates it."""
    from safetensors.torch import load_file, save_file
    sd = dict(load_file(f))
    change(sd)
    save_file(sd, f)


def test_safetensors_bad_offsets(hf_dir, tmp_path):
    d, f = hf_copy(hf_dir, tmp_path)
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["shape"] = [31]  # data_offsets still span 32 floats
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    expect_error(d, "model.safetensors", "model.norm.weight", "data_offsets")


def test_missing_tensor(hf_dir, tmp_path):
    d, f = hf_copy(hf_dir, tmp_path)
    rewrite_safetensors(f, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(d, str(d), "missing tensor", "model.layers.1.mlp.up_proj.weight")


def test_wrong_shape_in_config(hf_dir, tmp_path):
    d, _ = hf_copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 50}))
    expect_error(d, "model.layers.0.mlp.gate_proj.weight", "model.safetensors", "(48, 32)",
                 "(50, 32)")


def test_unsupported_dtype(hf_dir, tmp_path):
    d, f = hf_copy(hf_dir, tmp_path)
    key = "model.norm.weight"
    rewrite_safetensors(f, lambda sd: sd.update({key: sd[key].double()}))
    expect_error(d, "model.norm.weight", "model.safetensors", "F64")


def test_unsupported_config(hf_dir, tmp_path):
    d, _ = hf_copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2"}))
    expect_error(d, "config.json", "gemma2")
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn"}}))
    expect_error(d, "config.json", "yarn")
    (d / "config.json").write_text("{not json")
    expect_error(d, "config.json")
    (d / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    expect_error(d, "config.json", "num_kv_heads")


@pytest.mark.parametrize("hdr,why", [((-16, 24, 2, 4, 2, 32, 8), "positive"),
                                     ((16, 24, 2, 3, 1, 32, 8), "n_heads does not divide dim"),
                                     ((16, 24, 2, 4, 3, 32, 8), "n_kv_heads does not divide"),
                                     ((16, 24, 2, 4, 2, 0, 8), "positive")])
def test_llama2c_bad_header(tmp_path, hdr, why):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *hdr) + b"\0" * 4096)
    msg = expect_error(path, str(path), why, f"dim={hdr[0]}")
    assert f"n_heads={hdr[3]}" in msg


def test_llama2c_huge_header(tmp_path):
    path = tmp_path / "huge.bin"
    path.write_bytes(struct.pack("<7i", 1 << 30, 1 << 30, 1 << 30, 1 << 4, 1 << 4, 1 << 30, 1)
                     + b"\0" * 100)
    expect_error(path, str(path), "implies", "the file has 128")


def test_llama2c_truncated_and_versions(tmp_path):
    hdr, w = random_llama2c()
    path = tmp_path / "m.bin"
    write_v0(path, hdr, w, False)
    size = path.stat().st_size
    os.truncate(path, size - 4)
    expect_error(path, str(path), f"implies {size} bytes", f"has {size - 4}", "vocab_size=-32")
    write_v1(path, hdr, w, True)
    with open(path, "ab") as f:
        f.write(b"\0\0\0\0")
    expect_error(path, str(path), "v1 header")
    write_v1(path, hdr, w, True, version=2)
    expect_error(path, str(path), "not supported yet")
    path.write_bytes(b"\x01\x02")
    expect_error(path, str(path), "too short")


class Evil:
    def __reduce__(self):
        return (exec, (f"open({str(Evil.marker)!r}, 'w').write('pwned')",))


def test_pth_with_pickled_code_is_refused(tmp_path):
    sd, params = random_meta(torch.float32)
    (tmp_path / "params.json").write_text(json.dumps(params))
    Evil.marker = tmp_path / "pwned"
    torch.save({**sd, "evil": Evil()}, tmp_path / "consolidated.00.pth")
    expect_error(tmp_path, "consolidated.00.pth", "refused")
    assert not Evil.marker.exists()
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip file at all")
    expect_error(tmp_path, "consolidated.00.pth")


def test_meta_missing_pieces(tmp_path):
    sd, params = random_meta(torch.float32)
    expect_error(tmp_path, "unknown model format")  # empty directory
    (tmp_path / "params.json").write_text(json.dumps(params))
    expect_error(tmp_path, "no consolidated")
    del sd["layers.1.attention.wk.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    expect_error(tmp_path, str(tmp_path), "layers.1.attention.wk.weight")


def test_unknown_and_missing_paths(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, this is not a model")
    expect_error(txt, str(txt), "unknown model format")
    missing = tmp_path / "nope"
    with pytest.raises((FileNotFoundError, ModelFormatError), match="nope"):
        load_checkpoint(missing)
