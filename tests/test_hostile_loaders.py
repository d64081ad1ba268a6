"""Hostile and broken model files (issue 13): every one is answered quickly, without a big
allocation, with a ModelFormatError naming the file and the field, or loads correctly where
the file is valid after all. The seeds are the TINY models of conftest.py."""
import dataclasses
import json
import os
import shutil
import struct
import threading
import time

import numpy as np
import pytest

from conftest import TINY, tiny_tokens, write_tiny_gguf
from xllm.config import ModelConfig
from xllm.errors import ModelFormatError
from xllm.loaders import load_checkpoint
from xllm.tokenizers import load_tokenizer

SECONDS = 10  # every refusal below takes milliseconds; the old code took minutes or hung


def expect_error(path, *words, loader=load_checkpoint):
    """The ModelFormatError message of loading `path`, checked to name each of `words`."""
    start = time.perf_counter()
    with pytest.raises(ModelFormatError) as e:
        loader(path)
    assert time.perf_counter() - start < SECONDS
    for w in words:
        assert str(w) in str(e.value), (w, str(e.value))
    return str(e.value)


# ----------------------------------------------------------------------------- GGUF

def gguf_copy(tmp_path, **keys):
    return write_tiny_gguf(tmp_path / "m.gguf", keys=keys)


def _offset_field(data, name):
    """Byte position of the data offset in the tensor info of `name`."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims + 4


def patch_offset(path, name, offset=None, like=None):
    """Set the data offset of tensor `name` to `offset`, or to that of tensor `like`."""
    data = bytearray(path.read_bytes())
    if like is not None:
        offset = struct.unpack_from("<Q", data, _offset_field(data, like))[0]
    struct.pack_into("<Q", data, _offset_field(data, name), offset)
    path.write_bytes(bytes(data))


def data_start(path):
    import gguf
    return gguf.GGUFReader(path).data_offset


@pytest.mark.parametrize("layers", [2**32 - 1, 10**6])
def test_gguf_huge_block_count(tmp_path, layers):
    """A 64 KB file claiming billions (or a million) of layers: refused at once (before: an
    allocation until MemoryError, or 57 s to say "missing tensor")."""
    path = gguf_copy(tmp_path, **{"llama.block_count": layers})
    expect_error(path, "m.gguf", "num_layers", str(layers))


def test_gguf_block_count_beyond_the_tensors(tmp_path):
    path = gguf_copy(tmp_path, **{"llama.block_count": 4000})
    expect_error(path, "m.gguf", "num_layers=4000", "tensors")


def test_gguf_huge_embedding_length(tmp_path):
    path = gguf_copy(tmp_path, **{"llama.embedding_length": 2**17,
                                  "llama.attention.head_count": 2**10})
    expect_error(path, "m.gguf", "hidden_size=131072", "bytes")


def test_gguf_misaligned_offset(tmp_path):
    path = gguf_copy(tmp_path)
    data = path.read_bytes()
    offset = struct.unpack_from("<Q", data, _offset_field(data, "output_norm.weight"))[0]
    patch_offset(path, "output_norm.weight", offset + 4)
    expect_error(path, "m.gguf", "output_norm.weight", "aligned")


def test_gguf_offset_wrapping_around(tmp_path):
    """An offset that wraps around 2**64 to point into the header (before: read as weights)."""
    path = gguf_copy(tmp_path)
    patch_offset(path, "output_norm.weight", 2**64 - data_start(path) + 64)
    expect_error(path, "m.gguf", "output_norm.weight", "file has")


def test_gguf_overlapping_tensors(tmp_path):
    path = gguf_copy(tmp_path)
    patch_offset(path, "blk.1.attn_norm.weight", like="blk.0.attn_norm.weight")
    expect_error(path, "m.gguf", "attn_norm.weight", "overlaps")


def test_gguf_integer_stored_as_string(tmp_path):
    expect_error(gguf_copy(tmp_path, **{"llama.embedding_length": "16"}),
                 "m.gguf", "llama.embedding_length", "integer", "'16'")
    expect_error(gguf_copy(tmp_path, **{"tokenizer.ggml.eos_token_id": "2"}),
                 "m.gguf", "tokenizer.ggml.eos_token_id", "integer")


def test_gguf_non_numeric_scores(tmp_path):
    path = gguf_copy(tmp_path, **{"tokenizer.ggml.scores": ["x"] * TINY["vocab_size"]})
    expect_error(path, "m.gguf", "tokenizer.ggml.scores[0]", "number")


def test_gguf_infinite_rope_base(tmp_path):
    expect_error(gguf_copy(tmp_path, **{"llama.rope.freq_base": float("inf")}),
                 "m.gguf", "rope_theta", "inf")
    expect_error(gguf_copy(tmp_path, **{"llama.attention.layer_norm_rms_epsilon": 1e30}),
                 "m.gguf", "rms_norm_eps")


def test_gguf_tokenizer_larger_than_embedding(tmp_path):
    pieces, _ = tiny_tokens(TINY["vocab_size"] + 50)
    path = write_tiny_gguf(tmp_path / "big.gguf", tokens=pieces)
    expect_error(path, "big.gguf", "350 tokens", "300 rows of token_embd.weight")


def test_gguf_padded_embedding_loads(tmp_path):
    """An embedding larger than the tokenizer (a padded vocabulary) is normal."""
    pieces, _ = tiny_tokens(TINY["vocab_size"] - 20)
    ck = load_checkpoint(write_tiny_gguf(tmp_path / "pad.gguf", tokens=pieces))
    assert ck.config.vocab_size == 300 and ck.tokenizer.vocab_size == 280


def _gguf_header(kv_count, tensor_count=0):
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


def _gguf_key(name, vtype):
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


def test_gguf_array_count_beyond_the_file(tmp_path):
    """A uint8 array claiming 2**62 items in a 100-byte file (before: endless loop)."""
    path = tmp_path / "arr.gguf"
    path.write_bytes(_gguf_header(1) + _gguf_key("x", 9) + struct.pack("<IQ", 0, 2**62)
                     + b"\0" * 64)
    expect_error(path, "arr.gguf", "x:", "cannot fit")


def test_gguf_nested_arrays(tmp_path):
    """Arrays of arrays 50,000 deep (before: RecursionError)."""
    path = tmp_path / "nest.gguf"
    path.write_bytes(_gguf_header(1) + _gguf_key("x", 9) + struct.pack("<IQ", 9, 1) * 50_000)
    expect_error(path, "nest.gguf", "x:", "not supported")


def test_gguf_tokenizer_file_checked_too(tmp_path):
    path = gguf_copy(tmp_path, **{"tokenizer.ggml.bos_token_id": 2**32 - 1})
    expect_error(path, "m.gguf", "bos", str(2**32 - 1), loader=load_tokenizer)


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture
def hf(tiny_models, tmp_path):
    """A copy of the TINY Hugging Face directory."""
    return shutil.copytree(tiny_models["hf"], tmp_path / "hf")


def edit_config(directory, name="config.json", **changes):
    path = directory / name
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_hf_huge_layer_count(hf):
    """num_hidden_layers 10**9 (before: an allocation until MemoryError after ~1 min)."""
    edit_config(hf, num_hidden_layers=10**9)
    expect_error(hf, "config.json", "num_layers", str(10**9))


@pytest.mark.parametrize("field,value,words", [
    ("rope_theta", float("inf"), ["rope_theta", "inf"]),
    ("rope_theta", -5.0, ["rope_theta"]),
    ("rms_norm_eps", 1e300, ["rms_norm_eps", "1e+300"]),
    ("eos_token_id", "2", ["eos_token_id", "'2'"]),
    ("eos_token_id", 10**6, ["eos_token_id", "1000000"]),
    ("eos_token_id", [2, "x"], ["eos_token_id"]),
    ("bos_token_id", 300, ["bos_token_id", "300"]),
    ("bos_token_id", 1.5, ["bos_token_id"]),
    ("hidden_size", "16", ["hidden_size", "'16'"]),
    ("num_attention_heads", [2], ["num_heads"]),
    ("max_position_embeddings", 2**40, ["max_seq_len"]),
    ("tie_word_embeddings", "yes", ["tie_word_embeddings"]),
    ("rope_scaling", [], ["rope_scaling"]),
    ("rope_scaling", "llama3", ["rope_scaling"]),
    ("head_dim", 7, ["head_dim"]),
])
def test_hf_config_values(hf, field, value, words):
    edit_config(hf, **{field: value})
    expect_error(hf, "config.json", *words)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("change,words", [
    ({"factor": 0}, ["rope_scaling.factor", "0"]),
    ({"factor": -2.0}, ["rope_scaling.factor"]),
    ({"factor": "8"}, ["rope_scaling.factor", "'8'"]),
    ({"factor": None}, ["rope_scaling.factor"]),
    ({"low_freq_factor": 4.0, "high_freq_factor": 1.0}, ["high_freq_factor"]),
    ({"low_freq_factor": 0.0}, ["low_freq_factor"]),
    ({"high_freq_factor": float("nan")}, ["high_freq_factor"]),
    ({"original_max_position_embeddings": 0}, ["original_max_position_embeddings"]),
])
def test_hf_llama3_rope_scaling(hf, change, words):
    edit_config(hf, rope_scaling={**LLAMA3, **change})
    expect_error(hf, "config.json", *words)


def test_hf_config_not_an_object(hf):
    (hf / "config.json").write_text("[1, 2]")
    expect_error(hf, "config.json", "JSON object")

def test_hf_rope_parameters_not_an_object(hf):
    edit_config(hf, rope_parameters=["x"])
    expect_error(hf, "config.json", "rope_parameters")


def test_hf_generation_config(hf):
    edit_config(hf, name="generation_config.json", eos_token_id={"a": 1})
    expect_error(hf, "generation_config.json", "eos_token_id")
    (hf / "generation_config.json").write_text('"just a string"')
    expect_error(hf, "generation_config.json", "JSON object")


def test_hf_eos_list_still_works(hf):
    edit_config(hf, eos_token_id=[2, 7])
    edit_config(hf, name="generation_config.json", eos_token_id=[7, 9])
    c = load_checkpoint(hf).config
    assert (c.eos_token_id, c.extra_eos_token_ids) == (2, (7, 9))


def test_hf_bad_chat_template_list(hf):
    edit_config(hf, name="tokenizer_config.json", chat_template=["x", {"name": "default",
                                                                        "template": "{{ t }}"}])
    assert load_checkpoint(hf).chat_template == "{{ t }}"


def _index(hf, target):
    """Shard the model as an index whose weight_map sends one tensor to `target`."""
    weight_map = {"model.embed_tokens.weight": target}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("where", ["../other/model.safetensors", "absolute", "symlink"])
def test_hf_index_outside_the_directory(hf, tmp_path, where):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(hf / "model.safetensors", other / "model.safetensors")
    if where == "absolute":
        where = str(other / "model.safetensors")
    elif where == "symlink":
        os.symlink(other / "model.safetensors", hf / "link.safetensors")
        where = "link.safetensors"
    _index(hf, where)
    expect_error(hf, "model.safetensors.index.json", "outside the model directory")


def test_hf_index_inside_the_directory_loads(hf):
    os.makedirs(hf / "shards")
    shutil.move(hf / "model.safetensors", hf / "shards" / "a.safetensors")
    os.symlink("a.safetensors", hf / "shards" / "b.safetensors")
    _index(hf, "shards/b.safetensors")
    assert load_checkpoint(hf).config.num_layers == 2


# ----------------------------------------------------------------------------- safetensors

def rewrite_header(path, change, misalign=0):
    """Rewrite a safetensors header after `change(header dict)`, padded to 8 bytes plus
    `misalign` spaces (so the data starts `misalign` bytes past an 8-byte boundary)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8 + misalign)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_safetensors_negative_shape(hf):
    rewrite_header(hf / "model.safetensors",
                   lambda h: h["model.norm.weight"].update(shape=[-1, -16]))
    expect_error(hf, "model.safetensors", "model.norm.weight", "non-negative")


def test_safetensors_overlapping_offsets(hf):
    def overlap(h):
        h["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
            h["model.layers.0.input_layernorm.weight"]["data_offsets"]
    rewrite_header(hf / "model.safetensors", overlap)
    expect_error(hf, "model.safetensors", "input_layernorm.weight", "overlap")


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [16], "data_offsets": [0, 64]},
    {"dtype": "F32", "shape": "16", "data_offsets": [0, 64]},
    {"dtype": "F32", "shape": [16.0], "data_offsets": [0, 64]},
    {"dtype": "F32", "shape": [16], "data_offsets": [64, 0]},
    {"dtype": "F32", "shape": [16], "data_offsets": [0, 2**64]},
    {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 64]},
    [1, 2, 3],
])
def test_safetensors_bad_entries(hf, entry):
    rewrite_header(hf / "model.safetensors", lambda h: h.update({"model.norm.weight": entry}))
    expect_error(hf, "model.safetensors", "model.norm.weight")


def test_safetensors_unaligned_data_is_copied_aligned(hf, tiny_models):
    """Data 1 byte past an 8-byte boundary (before: loaded, then failed at the first generate):
    each tensor is copied once into an aligned array."""
    rewrite_header(hf / "model.safetensors", lambda h: None, misalign=1)
    ck = load_checkpoint(hf)
    ref = load_checkpoint(tiny_models["hf"])
    for k, w in ck.weights.items():
        assert w.flags.aligned and not w.flags.writeable, k
        assert np.array_equal(w, ref.weights[k]), k


# ----------------------------------------------------------------------------- special files

def load_in_thread(path, loader=load_checkpoint):
    """The exception loading `path` raised (None if none); fails the test if it hangs."""
    result = {}

    def run():
        try:
            loader(path)
        except BaseException as e:  # handed to the test
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(SECONDS)
    if t.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # releases a blocked open()
        t.join(SECONDS)
        pytest.fail(f"loading {path} hung")
    return result.get("error")


@pytest.mark.parametrize("name,loader", [("model.gguf", load_checkpoint),
                                         ("model.bin", load_checkpoint),
                                         ("tokenizer.json", load_tokenizer)])
def test_fifo_is_refused(tmp_path, name, loader):
    path = tmp_path / name
    os.mkfifo(path)
    e = load_in_thread(path, loader)
    assert isinstance(e, ModelFormatError) and "not a regular file" in str(e), e
    assert str(path) in str(e)


def test_fifo_beside_the_model_is_not_read(hf):
    os.mkfifo(hf / "tokenizer_config.json")
    assert load_checkpoint(hf).chat_template is None  # not a file: not read (and no hang)


def test_device_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.gguf")
    e = load_in_thread(tmp_path / "zero.gguf")
    assert isinstance(e, ModelFormatError) and "not a regular file" in str(e), e


# ----------------------------------------------------------------------------- llama2.c

def test_llama2c_v1_huge_context(tmp_path, tiny_models):
    """A version 1 header (no RoPE table in the file) with seq_len 2**31-1."""
    v0 = tiny_models["llama2c"].read_bytes()
    c = ModelConfig(**TINY)
    table = 2 * c.max_seq_len * c.head_dim // 2 * 4  # v0's RoPE tables, which v1 drops
    hdr = list(struct.unpack("<7i", v0[:28]))
    hdr[6] = 2**31 - 1
    head = struct.pack("<Ii7iB", 0x616B3432, 1, *hdr, 1).ljust(256, b"\0")
    path = tmp_path / "v1.bin"
    path.write_bytes(head + v0[28:len(v0) - table])  # the right size (v1's order differs)
    expect_error(path, "v1.bin", "max_seq_len", str(2**31 - 1))


# ----------------------------------------------------------------------------- Meta

@pytest.fixture
def meta(tiny_models, tmp_path):
    if "meta" not in tiny_models:
        pytest.skip("torch is not installed")
    return shutil.copytree(tiny_models["meta"], tmp_path / "meta")


@pytest.mark.parametrize("field,value", [("vocab_size", "abc"), ("dim", "16"),
                                         ("norm_eps", 1e300), ("rope_theta", float("nan")),
                                         ("n_layers", 10**9), ("use_scaled_rope", "no"),
                                         ("max_seq_len", -1)])
def test_meta_params(meta, field, value):
    edit_config(meta, name="params.json", **{field: value})
    expect_error(meta, "params.json", {"dim": "hidden_size", "norm_eps": "rms_norm_eps",
                                       "n_layers": "num_layers"}.get(field, field))


def test_meta_compressed_archive(meta):
    """A .pth whose members are deflated (a zip bomb could expand without bound)."""
    import zipfile
    src = meta / "consolidated.00.pth"
    with zipfile.ZipFile(src) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in members:
            z.writestr(info.filename, data)
    expect_error(meta, "consolidated.00.pth", "compressed")


# ----------------------------------------------------------------------------- xllm quantized

def quantized_dir(hf, **config):
    """An xllm quantized directory (config.json + model.safetensors) of the TINY shape."""
    cfg = {**dataclasses.asdict(ModelConfig(**TINY)), "extra_eos_token_ids": [], **config}
    meta = {"xllm_format": 1, "config": cfg, "quantization": {
        "bits": 8, "group_size": 32, "asymmetric": False, "scale_dtype": "fp16"}}
    (hf / "config.json").write_text(json.dumps(meta))
    return hf


def test_quantized_huge_layer_count(hf):
    expect_error(quantized_dir(hf, num_layers=10**9), "config.json", "num_layers")


def test_quantized_config_types(hf):
    expect_error(quantized_dir(hf, extra_eos_token_ids=5), "config.json", "extra_eos_token_ids")
    expect_error(quantized_dir(hf, rope_scaling=[1]), "config.json", "rope_scaling")
    expect_error(quantized_dir(hf, num_layers=4000), "model.safetensors", "num_layers=4000")


# ----------------------------------------------------------------------------- tokenizer.json

def test_tokenizer_json_huge_id(tmp_path):
    """A tokenizer.json whose one token has id 10**12 (before: a list of 10**12 entries)."""
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 10**12}, "merges": []},
                                "pre_tokenizer": {"type": "ByteLevel"}}))
    expect_error(path, "tokenizer.json", "id", loader=load_tokenizer)


def test_deeply_nested_json(tmp_path, hf):
    """JSON nested 100,000 deep (before: RecursionError) in tokenizer.json and config.json."""
    (tmp_path / "tokenizer.json").write_text("[" * 100_000)
    expect_error(tmp_path / "tokenizer.json", "tokenizer.json", loader=load_tokenizer)
    (hf / "config.json").write_text("[" * 100_000)
    expect_error(hf, "config.json")


def test_meta_shards_that_do_not_join(meta):
    """Two model-parallel shards whose pieces of one weight disagree (before: numpy's
    ValueError from concatenate)."""
    import torch
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = torch.zeros(16, 8)
    torch.save(state, meta / "consolidated.01.pth")
    expect_error(meta, str(meta), "layers.0.wq", "do not join")


def test_explicit_tokenizer_checks(tmp_path, data_dir):
    """xllm.load(..., tokenizer=X): a FIFO is refused (it would block the read forever), and
    so is a tokenizer with more tokens than the model's embedding."""
    import xllm
    fifo = tmp_path / "tokenizer.model"
    os.mkfifo(fifo)
    model = data_dir / "llama2c" / "stories260K.bin"
    with pytest.raises(ModelFormatError, match="tokenizer.model"):
        xllm.load(model, tokenizer=fifo)
    with pytest.raises(ModelFormatError, match="more than the 512 rows"):
        xllm.load(model, tokenizer=data_dir / "llama2c" / "tokenizer.model")
