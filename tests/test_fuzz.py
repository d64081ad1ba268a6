"""Fuzzing the model loaders (issue 13): mutated GGUF, safetensors, llama2.c, Meta (.pth and
params.json), Hugging Face config.json and xllm quantized files must each load, or be refused
with one of the library's errors (``XLLMError``, ``FileNotFoundError`` for a missing file):
never another exception, a crash, a hang or a big allocation.

Seeds are the small valid models of ``conftest.py`` (TINY). Each example is a copy changed by
Hypothesis: byte flips, hostile integers written over bytes, truncation, insertion and
deletion (biased towards the headers, where the structure is), or a field of the file's
header/JSON set to a value from a hostile list (0, -1, 2**31-1, 2**32-1, 2**63-1, 2**64-1,
nan, inf, 1e300, "", "abc", [], {}, None, a 100 kB string ...). It is loaded with
``xllm.loaders.load_checkpoint`` (which builds a GGUF's tokenizer) and, if it loads, its
tokenizer file is loaded too and one token runs through the model, in this process, under
two budgets:

* time: ``signal.alarm`` interrupts an example after ``EXAMPLE_SECONDS`` (Hypothesis'
  ``deadline`` is off: on a busy shared machine it would report slowness, not hangs);
* memory: ``tracemalloc`` (which sees Python objects and NumPy arrays, not the file mappings)
  fails an example whose peak passes ``EXAMPLE_BYTES``. ``RLIMIT_AS`` is not used: it is
  process-wide and would break pytest itself, and mmaps count against it.

The default run is small (``DEFAULT_EXAMPLES`` in all, a few seconds per format). For an
occasional long run, set the total number of examples, split evenly across the formats::

    XLLM_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q -s

``-s`` prints the examples run per format and how many loaded or were refused."""
import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xllm
from conftest import GGUF_KEYS, TINY, write_tiny_gguf
from xllm.errors import XLLMError
from xllm.loaders import load_checkpoint
from xllm.tokenizers import load_tokenizer

FORMATS = ("gguf_bytes", "gguf_keys", "safetensors_bytes", "safetensors_header", "hf_config",
           "llama2c", "meta_params", "meta_pth", "quantized_config", "tokenizer_json")
DEFAULT_EXAMPLES = 60 * len(FORMATS)
EXAMPLES = int(os.environ.get("XLLM_FUZZ_EXAMPLES", DEFAULT_EXAMPLES)) // len(FORMATS)
EXAMPLE_SECONDS = 20
EXAMPLE_BYTES = 64 << 20  # the seeds are < 100 kB; loading one takes ~1 MB

HOSTILE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, -2**63)
HOSTILE = HOSTILE_INTS + (float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 0.5, "",
                          "abc", "x" * 100_000, [], [1, 2], {}, {"a": 1}, None, True, False)
INT_FORMATS = ("<B", "<I", "<i", "<Q", "<q")


class ExampleTimeout(BaseException):
    """An example ran past EXAMPLE_SECONDS (a hang); a BaseException, so that no
    ``except Exception`` in the code under test can swallow it."""


@contextmanager
def budget():
    """Fail the enclosed block if it runs past EXAMPLE_SECONDS or allocates (peak, traced by
    tracemalloc) more than EXAMPLE_BYTES."""
    def expire(signum, frame):
        raise ExampleTimeout(f"example took more than {EXAMPLE_SECONDS} s")
    previous = signal.signal(signal.SIGALRM, expire)
    tracemalloc.start()
    tracemalloc.reset_peak()
    signal.alarm(EXAMPLE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= EXAMPLE_BYTES, f"example allocated {peak} bytes"


def load_or_refuse(path, stats):
    """Load `path` (and its tokenizer file) within the budget; library errors are fine. What
    loads must run: one token through the model (a library error, such as a context of 0
    tokens, is fine too; a crash or another exception is not)."""
    with budget():
        try:
            ck = load_checkpoint(path)
            if ck.tokenizer_path:
                load_tokenizer(ck.tokenizer_path, ck.config.vocab_size)
        except (XLLMError, FileNotFoundError):
            stats["refused"] += 1
            return
        for name, w in ck.weights.items():  # the kernels need aligned, contiguous arrays
            if isinstance(w, np.ndarray):
                assert w.flags.aligned and w.flags.c_contiguous, name
        try:
            logits = xllm.Model(ck.config, ck.weights).logits([0])
            assert logits.shape == (1, ck.config.vocab_size)
        except XLLMError:
            pass
    stats["loaded"] += 1


def run(fmt, example):
    """Run `example(data, directory, stats)` EXAMPLES times (Hypothesis draws from `data`)
    and print the counts."""
    stats = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        with tempfile.TemporaryDirectory() as directory:
            example(data, Path(directory), stats)

    one()
    print(f"\nfuzz {fmt}: {stats['loaded'] + stats['refused']} examples, "
          f"{stats['loaded']} loaded, {stats['refused']} refused")


# ----------------------------------------------------------------------------- mutations

def mutate_bytes(data, draw, hot):
    """`data` after 1-4 random edits, half of them within the first `hot` bytes."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = max(1, min(hot if draw(st.booleans()) else len(buf), len(buf)))
        pos = draw(st.integers(0, end - 1))
        kind = draw(st.sampled_from(["flip", "int", "truncate", "insert", "delete"]))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "int":
            fmt = draw(st.sampled_from(INT_FORMATS))
            bits = 8 * struct.calcsize(fmt)
            packed = struct.pack(fmt.upper(), draw(st.sampled_from(HOSTILE_INTS)) % 2**bits)
            buf[pos:pos + len(packed)] = packed
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[pos:pos + draw(st.integers(1, 16))]
    return bytes(buf)


def hostile(draw):
    """A value from HOSTILE, copied (the mutations change lists and objects in place)."""
    return copy.deepcopy(draw(st.sampled_from(HOSTILE)))


def mutate_json(obj, draw, keys):
    """`obj` (a dict) with 1-3 of `keys` (dotted for nested objects) set to hostile values
    or removed."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = draw(st.sampled_from(keys)).split(".")
        target = obj
        for p in parents:
            if not isinstance(target.get(p), dict):
                target[p] = {}
            target = target[p]
        if draw(st.integers(0, 9)) == 0:
            target.pop(last, None)
        else:
            target[last] = hostile(draw)
    return obj


def write_json(path, obj):
    path.write_text(json.dumps(obj))  # NaN and Infinity as Python writes them


# ----------------------------------------------------------------------------- seeds

@pytest.fixture(scope="module")
def seeds(tiny_models, tmp_path_factory):
    """The TINY models, and an xllm quantized one written by tools/quantize.py."""
    from xllm.random_model import write_random_model
    out, root = dict(tiny_models), tmp_path_factory.mktemp("fuzz")
    src = write_random_model(str(root / "hf32"), "tiny", "fp32", 0,
                             **{**TINY, "hidden_size": 32, "intermediate_size": 64})
    tool = Path(__file__).resolve().parents[1] / "tools" / "quantize.py"
    done = subprocess.run([sys.executable, str(tool), "--model", src, "--out", str(root / "q"),
                           "--bits", "8"], capture_output=True)
    if done.returncode == 0:
        out["quantized"] = root / "q"
    return out


def _gguf_header_bytes(path):
    from xllm.files.gguf import GGUFFile
    f = GGUFFile(str(path))
    return min(t.data.ctypes.data for t in f.tensors.values()) - f.buf.ctypes.data


# ----------------------------------------------------------------------------- tests

def test_fuzz_gguf_bytes(seeds):
    data = seeds["gguf"].read_bytes()
    hot = _gguf_header_bytes(seeds["gguf"])

    def example(d, directory, stats):
        path = directory / "m.gguf"
        path.write_bytes(mutate_bytes(data, d.draw, hot))
        load_or_refuse(path, stats)
    run("gguf_bytes", example)


GGUF_EXTRA_KEYS = ["llama.attention.key_length", "llama.attention.value_length",
                   "llama.rope.dimension_count", "llama.rope.scaling.type",
                   "llama.rope.scaling.original_context_length", "general.alignment",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                   "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.pre",
                   "tokenizer.ggml.merges", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                   "tokenizer.ggml.token_type", "tokenizer.ggml.eot_token_id"]


def _gguf_value(value):
    """`value` as write_tiny_gguf can store it: GGUF has no objects (JSON text instead), and
    gguf's writer refuses empty arrays (one empty string instead)."""
    if isinstance(value, dict):
        return json.dumps(value)
    return value if value != [] else [""]


def test_fuzz_gguf_keys(seeds):
    keys = list(GGUF_KEYS) + GGUF_EXTRA_KEYS

    def example(d, directory, stats):
        changes = {d.draw(st.sampled_from(keys)): _gguf_value(hostile(d.draw))
                   for _ in range(d.draw(st.integers(1, 3)))}
        if d.draw(st.booleans()):
            changes["tokenizer.ggml.model"] = "gpt2"  # the byte-level BPE path
        path = write_tiny_gguf(directory / "m.gguf", keys=changes)
        load_or_refuse(path, stats)
    run("gguf_keys", example)


def _hf_copy(seeds, directory):
    return Path(shutil.copytree(seeds["hf"], directory / "hf"))


def test_fuzz_safetensors_bytes(seeds):
    data = (seeds["hf"] / "model.safetensors").read_bytes()
    hot = 8 + struct.unpack("<Q", data[:8])[0]

    def example(d, directory, stats):
        hf = _hf_copy(seeds, directory)
        (hf / "model.safetensors").write_bytes(mutate_bytes(data, d.draw, hot))
        load_or_refuse(hf, stats)
    run("safetensors_bytes", example)


def test_fuzz_safetensors_header(seeds):
    data = (seeds["hf"] / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    keys = [f"{name}.{field}" for name in header for field in ("dtype", "shape", "data_offsets")]

    def example(d, directory, stats):
        hf = _hf_copy(seeds, directory)
        h = mutate_json(header, d.draw, keys + ["__metadata__"])
        if d.draw(st.booleans()):  # one element of a shape or of data_offsets
            entry = h[d.draw(st.sampled_from(sorted(header)))]
            field = entry.get(d.draw(st.sampled_from(["shape", "data_offsets"])))
            if isinstance(field, list) and field:
                field[d.draw(st.integers(0, len(field) - 1))] = hostile(d.draw)
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8 + d.draw(st.integers(0, 7)))
        (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text
                                               + data[8 + n:])
        load_or_refuse(hf, stats)
    run("safetensors_header", example)


def test_fuzz_hf_config(seeds):
    config = json.loads((seeds["hf"] / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    keys = list(config) + ["head_dim", "rope_scaling", "rope_parameters", "attention_bias"]
    keys += [f"rope_scaling.{k}" for k in llama3]

    def example(d, directory, stats):
        hf = _hf_copy(seeds, directory)
        base = {**config, "rope_scaling": llama3} if d.draw(st.booleans()) else config
        write_json(hf / "config.json", mutate_json(base, d.draw, keys))
        what = d.draw(st.sampled_from(["none", "generation", "index", "tokenizer_config"]))
        if what == "generation":
            write_json(hf / "generation_config.json", {"eos_token_id": hostile(d.draw)})
        elif what == "index":
            shutil.move(hf / "model.safetensors", hf / "a.safetensors")
            target = d.draw(st.sampled_from(["a.safetensors", "../a.safetensors", "/dev/zero",
                                             str(hf / "a.safetensors"), "", "."]))
            weight_map = {"model.norm.weight": target, "x": hostile(d.draw)}
            write_json(hf / "model.safetensors.index.json", {"weight_map": weight_map})
        elif what == "tokenizer_config":
            write_json(hf / "tokenizer_config.json", {"chat_template": hostile(d.draw)})
        load_or_refuse(hf, stats)
    run("hf_config", example)


def test_fuzz_llama2c(seeds):
    data = seeds["llama2c"].read_bytes()

    def example(d, directory, stats):
        path = directory / "m.bin"
        if d.draw(st.booleans()):  # a header field set to a hostile int32
            buf = bytearray(data)
            value = d.draw(st.sampled_from(HOSTILE_INTS)) % 2**32
            struct.pack_into("<I", buf, 4 * d.draw(st.integers(0, 6)), value)
            path.write_bytes(bytes(buf))
        else:
            path.write_bytes(mutate_bytes(data, d.draw, 28))
        load_or_refuse(path, stats)
    run("llama2c", example)


def _meta_copy(seeds, directory):
    if "meta" not in seeds:
        pytest.skip("torch is not installed")
    return Path(shutil.copytree(seeds["meta"], directory / "meta"))


def test_fuzz_meta_params(seeds):
    if "meta" not in seeds:
        pytest.skip("torch is not installed")
    params = json.loads((seeds["meta"] / "params.json").read_text())
    keys = list(params) + ["rope_theta", "max_seq_len", "use_scaled_rope",
                           "rope_scaling_factor", "multiple_of"]

    def example(d, directory, stats):
        meta = _meta_copy(seeds, directory)
        write_json(meta / "params.json", mutate_json(params, d.draw, keys))
        load_or_refuse(meta, stats)
    run("meta_params", example)


def test_fuzz_meta_pth(seeds):
    if "meta" not in seeds:
        pytest.skip("torch is not installed")
    data = (seeds["meta"] / "consolidated.00.pth").read_bytes()

    def example(d, directory, stats):
        meta = _meta_copy(seeds, directory)
        (meta / "consolidated.00.pth").write_bytes(mutate_bytes(data, d.draw, len(data)))
        load_or_refuse(meta, stats)
    run("meta_pth", example)


def test_fuzz_quantized_config(seeds):
    if "quantized" not in seeds:
        pytest.skip("tools/quantize.py could not write the seed")
    meta = json.loads((seeds["quantized"] / "config.json").read_text())
    keys = (["xllm_format", "tokenizer", "chat_template", "config", "quantization"]
            + [f"config.{k}" for k in meta["config"]]
            + [f"quantization.{k}" for k in meta["quantization"]])

    def example(d, directory, stats):
        q = Path(shutil.copytree(seeds["quantized"], directory / "q"))
        write_json(q / "config.json", mutate_json(meta, d.draw, keys))
        load_or_refuse(q, stats)
    run("quantized_config", example)


def _tiny_tokenizer_json(directory):
    """A byte-level BPE tokenizer.json (GPT-2's byte alphabet, three merges, one special
    token) and the tokenizer_config.json that names its EOS."""
    from xllm.tokenizers.byte_level import BYTE_CHARS
    vocab = {c: i for i, c in enumerate(BYTE_CHARS)}
    merges = ["\u0120 t", "h e", "\u0120t he"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [{"id": len(vocab), "content": "<|end|>", "special": True}]}
    write_json(directory / "tokenizer_config.json", {"eos_token": "<|end|>"})
    return data


def test_fuzz_tokenizer_json(tmp_path):
    data = _tiny_tokenizer_json(tmp_path)
    keys = ["model", "model.type", "model.vocab", "model.merges", "model.ignore_merges",
            "pre_tokenizer", "pre_tokenizer.type", "pre_tokenizer.use_regex", "normalizer",
            "added_tokens", "post_processor", "model.vocab.he", "model.vocab.a"]
    text = json.dumps(data).encode()

    def example(d, directory, stats):
        path = directory / "tokenizer.json"
        _tiny_tokenizer_json(directory)
        if d.draw(st.booleans()):
            write_json(path, mutate_json(data, d.draw, keys))
        else:
            path.write_bytes(mutate_bytes(text, d.draw, len(text)))
        with budget():
            try:
                load_tokenizer(path)
            except XLLMError:
                stats["refused"] += 1
                return
        stats["loaded"] += 1
    run("tokenizer_json", example)
