"""llama2.c checkpoints (.bin): the legacy v0 format and the "ak42" version 1 export (fp32).

Both store every per-layer tensor stacked for all layers ([n_layers, ...]), so the loader maps
the file once and hands out views: ``layers.{i}.wq`` is ``wq_all[i]``. llama2.c rotates adjacent
pairs in RoPE, hence ``rope_interleaved=True``."""
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from ..files.common import map_file
from ..model.weights import check_weights
from .checkpoint import Checkpoint, find_file, make_config

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32, written by llama2.c's export.py
V1_HEADER_BYTES = 256
HEADER_BYTES = 28  # the seven int32 FIELDS (all of v0's header)
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def looks_like_llama2c(path) -> bool:
    """True for a .bin file, a file with the "ak42" magic, or one whose first 28 bytes read as
    a sensible v0 header (v0 has no magic number, so this is the best detection possible)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if path.endswith(".bin") or head[:4] == struct.pack("<I", MAGIC):
        return True
    if len(head) < HEADER_BYTES:
        return False
    h = dict(zip(FIELDS, struct.unpack("<7i", head)))
    sizes = (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
             abs(h["vocab_size"]), h["seq_len"])
    small = all(0 < v < (1 << 20) for v in sizes)
    return small and h["dim"] % h["n_heads"] == 0 and h["n_heads"] % h["n_kv_heads"] == 0


def _layout(h, version):
    """[(name, shape)] of the float32 arrays in file order; names starting with '_' are skipped."""
    dim = h["dim"]
    hidden = h["hidden_dim"]
    n_layers = h["n_layers"]
    vocab = abs(h["vocab_size"])
    head_size = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_size
    attention = [("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
                 ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim))]
    ffn = [("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
           ("w3", (n_layers, hidden, dim))]
    if version == 0:
        rope_table = (h["seq_len"], head_size // 2)
        out = [("tok_embeddings", (vocab, dim)), ("attention_norm", (n_layers, dim)),
               *attention, ("ffn_norm", (n_layers, dim)), *ffn, ("norm", (dim,)),
               ("_freq_cis_real", rope_table), ("_freq_cis_imag", rope_table)]
    else:
        out = [("attention_norm", (n_layers, dim)), ("ffn_norm", (n_layers, dim)),
               ("norm", (dim,)), ("tok_embeddings", (vocab, dim)), *attention, *ffn]
    if not h["tied"]:
        out.append(("output", (vocab, dim)))
    return out


@dataclass
class _Header:
    """A llama2.c header: the export version, its fields (FIELDS, and "tied"), and where the
    weights start."""
    version: int
    fields: dict
    data_offset: int

    def shown(self):
        """The header's fields as "dim=... seq_len=..." for error messages."""
        return " ".join(f"{k}={v}" for k, v in self.fields.items() if k in FIELDS)


def load_llama2c(path) -> Checkpoint:
    """Load a llama2.c .bin checkpoint (v0 legacy, or export version 1) as zero-copy views."""
    buf = map_file(path)
    header = _read_header(buf, path)
    layout = _layout(header.fields, header.version)
    # Python ints: no overflow however large the header values are.
    expected = header.data_offset + 4 * sum(int(np.prod(s, dtype=object)) for _, s in layout)
    if buf.size != expected:
        raise ModelFormatError(f"{path}: llama2.c v{header.version} header ({header.shown()}) "
                               f"implies {expected} bytes but the file has {buf.size} "
                               f"(truncated or wrong format?)")
    h = header.fields
    vocab = abs(h["vocab_size"])
    config = make_config(
        path, vocab_size=vocab, hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_layers=h["n_layers"], num_heads=h["n_heads"], num_kv_heads=h["n_kv_heads"],
        rope_interleaved=True, tie_word_embeddings=h["tied"], max_seq_len=h["seq_len"],
        bos_token_id=1, eos_token_id=2)
    weights = _weights(buf[header.data_offset:].view("<f4"), layout, h["n_layers"])
    check_weights(weights, config, path)
    return Checkpoint(config=config, weights=weights, tokenizer_path=_find_tokenizer(path, vocab),
                      source=os.fspath(path))


def _read_header(buf, path):
    """The checked header of the mapped file `buf`."""
    if buf.size >= 8 and int(buf[:4].view("<u4")[0]) == MAGIC:
        version = int(buf[4:8].view("<i4")[0])
        if version == 2:
            raise ModelFormatError(f"{path}: llama2.c version 2 (int8 Q8_0) checkpoints are not "
                                   f"supported yet; export with --version 0 or 1")
        if version != 1:
            raise ModelFormatError(f"{path}: unknown llama2.c export version {version}")
        fields_start = 8
        data_offset = V1_HEADER_BYTES
    else:
        version = 0
        fields_start = 0
        data_offset = HEADER_BYTES
    if buf.size < data_offset:
        raise ModelFormatError(f"{path}: {buf.size} bytes is too short for a llama2.c header")
    values = buf[fields_start:fields_start + HEADER_BYTES].view("<i4")
    fields = dict(zip(FIELDS, map(int, values)))
    # v0 flags an untied classifier with a negative vocab size; v1 has a separate byte.
    if version == 0:
        fields["tied"] = fields["vocab_size"] > 0
    else:
        fields["tied"] = bool(buf[36])
    header = _Header(version, fields, data_offset)
    problem = _header_problem(fields, version)
    if problem:
        raise ModelFormatError(f"{path}: not a valid llama2.c v{version} header "
                               f"({header.shown()}): {problem}")
    return header


def _header_problem(h, version):
    """What is wrong with the header fields `h`, or None."""
    sizes = [v for k, v in h.items() if k not in ("vocab_size", "tied")]
    if min(sizes) <= 0 or h["vocab_size"] == 0:
        return "sizes must be positive"
    if version and h["vocab_size"] < 0:
        return "vocab_size must be positive in version 1"
    if h["dim"] % h["n_heads"]:
        return "n_heads does not divide dim"
    if h["n_heads"] % h["n_kv_heads"]:
        return "n_kv_heads does not divide n_heads"
    if h["dim"] // h["n_heads"] % 2:
        return "head size must be even"
    return None


def _weights(values, layout, n_layers):
    """{canonical name: view of the float32 `values`} of the arrays in `layout`, the stacked
    per-layer ones split into one view per layer."""
    weights = {}
    position = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        array = values[position:position + size].reshape(shape)
        position += size
        if name.startswith("_"):
            continue  # the old RoPE tables: xllm computes RoPE itself
        if name in ("tok_embeddings", "norm", "output"):
            weights[name] = array
        else:
            weights.update({f"layers.{i}.{name}": array[i] for i in range(n_layers)})
    return weights


def _find_tokenizer(path, vocab):
    """The tokenizer file next to the checkpoint: a model-specific "<stem>_tok<vocab>" first
    (two 512-token models can share a folder with different vocabularies, as aidreams260K and
    stories260K do), then "tok<vocab>", then "tokenizer"."""
    directory = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    return find_file(directory, (f"{stem}_tok{vocab}.model", f"{stem}_tok{vocab}.bin",
                                 f"tok{vocab}.model", f"tok{vocab}.bin",
                                 "tokenizer.model", "tokenizer.bin"))
