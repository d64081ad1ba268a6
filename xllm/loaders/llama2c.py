"""llama2.c checkpoints (.bin): the legacy v0 format and the "ak42" version 1 export (fp32).

Both store every per-layer tensor stacked for all layers ([n_layers, ...]), so the loader maps
the file once and hands out views: ``layers.{i}.wq`` is ``wq_all[i]``. llama2.c rotates adjacent
pairs in RoPE, hence ``rope_interleaved=True``."""
import os
import struct

import numpy as np

from ..errors import ModelFormatError
from ..files.common import map_file
from ..model.weights import check_weights
from .checkpoint import Checkpoint, find_file, make_config

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32, written by llama2.c's export.py
V1_HEADER_BYTES = 256
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def looks_like_llama2c(path) -> bool:
    """True for a .bin file, a file with the "ak42" magic, or one whose first 28 bytes read as
    a sensible v0 header (v0 has no magic number, so this is the best detection possible)."""
    with open(path, "rb") as f:
        head = f.read(28)
    if path.endswith(".bin") or head[:4] == struct.pack("<I", MAGIC):
        return True
    if len(head) < 28:
        return False
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", head)
    small = all(0 < v < (1 << 20) for v in (dim, hidden, layers, heads, kv_heads, abs(vocab), seq))
    return small and dim % heads == 0 and heads % kv_heads == 0


def _layout(h, version):
    """[(name, shape)] of the float32 arrays in file order; names starting with '_' are skipped."""
    d, f, n, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    hs = d // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    mats = [("wq", (n, d, d)), ("wk", (n, kv, d)), ("wv", (n, kv, d)), ("wo", (n, d, d))]
    ffn = [("w1", (n, f, d)), ("w2", (n, d, f)), ("w3", (n, f, d))]
    if version == 0:
        rope_table = (h["seq_len"], hs // 2)
        out = [("tok_embeddings", (vocab, d)), ("attention_norm", (n, d)), *mats,
               ("ffn_norm", (n, d)), *ffn, ("norm", (d,)),
               ("_freq_cis_real", rope_table), ("_freq_cis_imag", rope_table)]
    else:
        out = [("attention_norm", (n, d)), ("ffn_norm", (n, d)), ("norm", (d,)),
               ("tok_embeddings", (vocab, d)), *mats, *ffn]
    if not h["tied"]:
        out.append(("output", (vocab, d)))
    return out


def load_llama2c(path) -> Checkpoint:
    """Load a llama2.c .bin checkpoint (v0 legacy, or export version 1) as zero-copy views."""
    buf = map_file(path)
    if buf.size >= 8 and int(buf[:4].view("<u4")[0]) == MAGIC:
        version = int(buf[4:8].view("<i4")[0])
        if version == 2:
            raise ModelFormatError(f"{path}: llama2.c version 2 (int8 Q8_0) checkpoints are not "
                                   f"supported yet; export with --version 0 or 1")
        if version != 1:
            raise ModelFormatError(f"{path}: unknown llama2.c export version {version}")
        start, data_offset = 8, V1_HEADER_BYTES
    else:
        version, start, data_offset = 0, 0, 28
    if buf.size < data_offset:
        raise ModelFormatError(f"{path}: {buf.size} bytes is too short for a llama2.c header")
    h = dict(zip(FIELDS, map(int, buf[start:start + 28].view("<i4"))))
    shown = " ".join(f"{k}={v}" for k, v in h.items())
    # v0 flags an untied classifier with a negative vocab size; v1 has a separate byte.
    h["tied"] = h["vocab_size"] > 0 if version == 0 else bool(buf[36])

    sizes = [v for k, v in h.items() if k not in ("vocab_size", "tied")]
    problem = ("sizes must be positive" if min(sizes) <= 0 or h["vocab_size"] == 0 else
               "vocab_size must be positive in version 1" if version and h["vocab_size"] < 0 else
               "n_heads does not divide dim" if h["dim"] % h["n_heads"] else
               "n_kv_heads does not divide n_heads" if h["n_heads"] % h["n_kv_heads"] else
               "head size must be even" if h["dim"] // h["n_heads"] % 2 else None)
    if problem:
        raise ModelFormatError(f"{path}: not a valid llama2.c v{version} header ({shown}): "
                               f"{problem}")

    layout = _layout(h, version)
    # Python ints: no overflow however large the header values are.
    expected = data_offset + 4 * sum(int(np.prod(s, dtype=object)) for _, s in layout)
    if buf.size != expected:
        raise ModelFormatError(f"{path}: llama2.c v{version} header ({shown}) implies {expected} "
                               f"bytes but the file has {buf.size} (truncated or wrong format?)")

    vocab, n = abs(h["vocab_size"]), h["n_layers"]
    config = make_config(
        path, vocab_size=vocab, hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_layers=n, num_heads=h["n_heads"], num_kv_heads=h["n_kv_heads"], rope_interleaved=True,
        tie_word_embeddings=h["tied"], max_seq_len=h["seq_len"], bos_token_id=1, eos_token_id=2)
    flat = buf[data_offset:].view("<f4")
    weights, pos = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        arr, pos = flat[pos:pos + size].reshape(shape), pos + size
        if name.startswith("_"):
            continue  # the old RoPE tables: xllm computes RoPE itself
        if name in ("tok_embeddings", "norm", "output"):
            weights[name] = arr
        else:
            weights.update({f"layers.{i}.{name}": arr[i] for i in range(n)})
    check_weights(weights, config, path)
    directory = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    # A model-specific "<stem>_tok<vocab>" first: two 512-token models can share a folder
    # with different vocabularies (as aidreams260K and stories260K do).
    tok = find_file(directory, (f"{stem}_tok{vocab}.model", f"{stem}_tok{vocab}.bin",
                                f"tok{vocab}.model", f"tok{vocab}.bin",
                                "tokenizer.model", "tokenizer.bin"))
    return Checkpoint(config=config, weights=weights, tokenizer_path=tok, source=os.fspath(path))
