"""Write a random-weight Llama model as a Hugging Face directory or a GGUF file.

For tests, benchmarks and demos:

    python tools/random_model.py --shape tiny --out /tmp/xllm-tiny [--dtype bf16] [--seed 0]
    python tools/random_model.py --shape llama2-7b --out /tmp/7b-q4_k_m.gguf --type q4_k_m
    (or python -m xllm.random_model ...)

The directory holds config.json, model.safetensors (fp32, fp16 or bf16) and a byte-level
SentencePiece ``tokenizer.model``, so xllm and transformers both load it. Shapes are the presets
of ``xllm.config.PRESETS`` (smollm2-135m, tinyllama-1.1b, llama2-7b, tiny).

With ``--type`` (any of tools/quantize.py's llama.cpp file types: q8_0, q4_0, q4_k_m, q6_k,
f16 ...) or an ``--out`` ending in ``.gguf``, the model is written directly as a GGUF file in
that file type, each tensor in the format of llama.cpp's mix (``xllm.formats.mixes``), with
the same tokenizer in its metadata: xllm and llama.cpp both load it. No float32 copy of the
model exists at any time: a tensor is written in chunks of rows (``GGUF_CHUNK_BYTES``), and the
blocks of a quantized one are drawn at random from a pool of blocks quantized once per format
from Gaussian values of standard deviation 0.02 (``GGUF_POOL_VALUES`` values), so the weights
are i.i.d. blocks of quantized Gaussians. Writing Llama-2-7B's shape in q4_k_m this way peaks
at a few hundred MB of memory (docs/quantization.rst has the figure).
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

from xllm.config import PRESETS
from xllm.formats.mixes import FILE_TYPE_FORMATS
from xllm.files.safetensors import write_safetensors
from xllm.tokenizers import BYTE, CONTROL, NORMAL, UNKNOWN
from xllm.tokenizers.sentencepiece_model import (BPE, NormalizerField, TrainerField,
                                                  write_model_proto)


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def spm_pieces(vocab_size):
    """[(piece, score, type)] of the random models' SentencePiece vocabulary: <unk> <s> </s>,
    256 byte pieces, then letters, '▁'+letters and letter pairs as normal pieces."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    extra = ["▁"] + list(letters) + ["▁" + c for c in letters] + [a + b for a in letters for b in letters]
    extra += [f"▁w{i}" for i in range(vocab_size)]
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [(p, -float(i), NORMAL) for i, p in enumerate(extra[:vocab_size - len(pieces)])]
    if len(pieces) != vocab_size:
        raise ValueError(f"vocab_size must be at least 259, got {vocab_size}")
    return pieces


def write_spm_model(path, vocab_size):
    """A SentencePiece BPE ``tokenizer.model`` of spm_pieces(vocab_size) (the file format is
    xllm.tokenizers.sentencepiece_model's)."""
    pieces = spm_pieces(vocab_size)
    trainer = {
        TrainerField.MODEL_TYPE: BPE,
        TrainerField.VOCAB_SIZE: vocab_size,
        TrainerField.BYTE_FALLBACK: True,
        TrainerField.UNK_ID: 0,
        TrainerField.BOS_ID: 1,
        TrainerField.EOS_ID: 2,
        TrainerField.PAD_ID: -1,  # no padding piece
    }
    normalizer = {
        NormalizerField.NAME: "identity",
        NormalizerField.ADD_DUMMY_PREFIX: True,
        NormalizerField.REMOVE_EXTRA_WHITESPACES: False,
    }
    write_model_proto(path, pieces, trainer, normalizer)


DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}  # uint16: bfloat16 bits
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Hugging Face names and shapes of one layer's weights: q, kv, d, f stand for the query and
# key/value widths, the hidden and the feed-forward size.
LAYER_WEIGHTS = (("self_attn.q_proj", ("q", "d")), ("self_attn.k_proj", ("kv", "d")),
                 ("self_attn.v_proj", ("kv", "d")), ("self_attn.o_proj", ("d", "q")),
                 ("mlp.gate_proj", ("f", "d")), ("mlp.up_proj", ("f", "d")),
                 ("mlp.down_proj", ("d", "f")), ("input_layernorm", ("d",)),
                 ("post_attention_layernorm", ("d",)))


def write_random_model(out, shape="tiny", dtype="fp32", seed=0, **overrides):
    """Write a random model of a preset shape to directory `out`; returns `out`."""
    cfg = dict(PRESETS[shape], **overrides)
    os.makedirs(out, exist_ok=True)
    weights = random_weights(cfg, dtype, seed)
    write_safetensors(os.path.join(out, "model.safetensors"), weights)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(hf_config(cfg, dtype), fh, indent=1)
    write_spm_model(os.path.join(out, "tokenizer.model"), cfg["vocab_size"])
    return out


def random_weights(cfg, dtype, seed):
    """{Hugging Face name: array of `dtype`}: normal weights of standard deviation 0.02, norm
    weights around 1, drawn in file order from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    sizes = {"d": cfg["hidden_size"], "f": cfg["intermediate_size"],
             "q": cfg["num_heads"] * head_dim, "kv": cfg["num_kv_heads"] * head_dim}
    vocab = cfg["vocab_size"]

    def tensor(*shape, std=0.02):
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if len(shape) == 1:
            a += 1.0  # norm weights around 1
        if dtype == "bf16":
            return to_bf16_bits(a)
        return a.astype(DTYPES[dtype])

    weights = {"model.embed_tokens.weight": tensor(vocab, sizes["d"])}
    for i in range(cfg["num_layers"]):
        for name, dims in LAYER_WEIGHTS:
            weights[f"model.layers.{i}.{name}.weight"] = tensor(*(sizes[d] for d in dims))
    weights["model.norm.weight"] = tensor(sizes["d"])
    if not cfg.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = tensor(vocab, sizes["d"])
    return weights


def hf_config(cfg, dtype):
    """The config.json of a random model of preset `cfg`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "num_hidden_layers": cfg["num_layers"], "num_attention_heads": cfg["num_heads"],
            "num_key_value_heads": cfg["num_kv_heads"], "vocab_size": cfg["vocab_size"],
            "max_position_embeddings": cfg["max_seq_len"],
            "rope_theta": cfg.get("rope_theta", 10000.0), "rms_norm_eps": 1e-5,
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "torch_dtype": TORCH_DTYPES[dtype]}


# ----------------------------------------------------------------------------- GGUF

# Bytes of one chunk of rows of a tensor being written (its only copy in memory).
GGUF_CHUNK_BYTES = 16 << 20
# Gaussian values quantized once per format into the pool of blocks tensors draw from.
GGUF_POOL_VALUES = 1 << 22
WEIGHT_STD = 0.02


def gguf_tensor_shapes(cfg):
    """{GGUF tensor name: shape [rows, columns] or [n]} of a llama model of preset dict `cfg`,
    in file order."""
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    d = cfg["hidden_size"]
    f = cfg["intermediate_size"]
    q = cfg["num_heads"] * head_dim
    kv = cfg["num_kv_heads"] * head_dim
    shapes = {"token_embd.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_layers"]):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (q, d),
                       p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d),
                       p + "attn_output.weight": (d, q), p + "ffn_norm.weight": (d,),
                       p + "ffn_gate.weight": (f, d), p + "ffn_up.weight": (f, d),
                       p + "ffn_down.weight": (d, f)})
    shapes["output_norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["output.weight"] = (cfg["vocab_size"], d)
    return shapes


class _ChunkedTensor:
    """A tensor's data produced chunk by chunk while it is written: ``gguf.GGUFWriter.
    write_tensor_data`` needs only ``nbytes`` and ``tofile(file)`` (native byte order)."""

    def __init__(self, nbytes, chunks):
        self.nbytes = nbytes
        self._chunks = chunks

    def tofile(self, fout):
        written = 0
        for chunk in self._chunks():
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes of a tensor of {self.nbytes}")


class _BlockSource:
    """Random data for the tensors of a GGUF file: float rows drawn from `rng`, and for each
    quantized format a pool of its blocks (quantized once, on first use) to draw rows from."""

    def __init__(self, rng):
        self.rng = rng
        self.pools = {}

    def pool(self, weight_format):
        """uint8 [blocks, block bytes]: GGUF_POOL_VALUES Gaussian values (std WEIGHT_STD) as
        blocks of `weight_format`."""
        if weight_format.name not in self.pools:
            width = 256  # a multiple of every block size
            values = self.rng.standard_normal((GGUF_POOL_VALUES // width, width),
                                              dtype=np.float32) * np.float32(WEIGHT_STD)
            blocks = weight_format.from_float(values)
            self.pools[weight_format.name] = blocks.reshape(-1, weight_format.block_bytes)
        return self.pools[weight_format.name]

    def chunks(self, shape, weight_format):
        """The rows of a tensor of `shape` stored in `weight_format`, a chunk at a time:
        vectors around 1 (norms), matrices Gaussian (float formats) or random pool blocks."""
        if len(shape) == 1:
            values = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)
            yield weight_format.from_float(values + np.float32(1))
            return
        rows, columns = shape
        blocks_per_row = columns // weight_format.block
        row_bytes = blocks_per_row * weight_format.block_bytes
        rows_per_chunk = max(1, GGUF_CHUNK_BYTES // row_bytes)
        for start in range(0, rows, rows_per_chunk):
            n = min(rows_per_chunk, rows - start)
            if weight_format.dtype is not None:  # F32, F16
                values = self.rng.standard_normal((n, columns), dtype=np.float32)
                yield weight_format.from_float(values * np.float32(WEIGHT_STD))
                continue
            pool = self.pool(weight_format)
            picks = self.rng.integers(0, pool.shape[0], (n, blocks_per_row))
            yield pool[picks].reshape(n, row_bytes)


def _gguf_metadata(writer, cfg, file_type, name):
    """The hyperparameters, file type and SentencePiece tokenizer of a random llama GGUF."""
    import gguf
    from xllm.formats.registry import FLOAT, writable_formats
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    writer.add_name(name)
    writer.add_context_length(cfg["max_seq_len"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_heads"])
    writer.add_head_count_kv(cfg["num_kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_vocab_size(cfg["vocab_size"])
    chosen = writable_formats()[file_type]
    writer.add_file_type(int(chosen.file_type))
    if chosen.packing != FLOAT:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pieces = spm_pieces(cfg["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p[0] for p in pieces])
    writer.add_token_scores([p[1] for p in pieces])
    writer.add_token_types([p[2] for p in pieces])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(False)


def write_random_gguf(path, shape="tiny", file_type="q8_0", seed=0, progress=None,
                      **overrides):
    """Write a random model of a preset shape as a GGUF file of llama.cpp file type
    `file_type` (a tools/quantize.py --type name), tensor by tensor and chunk by chunk (see the
    module docstring); returns `path`. `progress` wraps the iteration over the tensors."""
    import gguf
    from xllm.formats import mixes
    cfg = dict(PRESETS[shape], **overrides)
    if file_type not in FILE_TYPE_FORMATS:
        raise ValueError(f"file type {file_type!r} is not one of "
                         f"{', '.join(sorted(FILE_TYPE_FORMATS))}")
    mix_config = SimpleNamespace(num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
                                 num_kv_heads=cfg["num_kv_heads"],
                                 tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    shapes = gguf_tensor_shapes(cfg)
    formats = {name: mixes.tensor_format(file_type, name, s, mix_config)
               for name, s in shapes.items()}
    source = _BlockSource(np.random.default_rng(seed))
    writer = gguf.GGUFWriter(path, "llama")
    _gguf_metadata(writer, cfg, file_type, f"random {shape} {file_type}")
    for name, s in shapes.items():
        weight_format = formats[name]
        if weight_format.dtype is not None:  # F32, F16: typed values
            stored = s
            dtype = weight_format.dtype
        else:  # uint8 rows of blocks
            stored = s[:-1] + (s[-1] // weight_format.block * weight_format.block_bytes,)
            dtype = np.dtype(np.uint8)
        nbytes = int(np.prod(stored)) * dtype.itemsize
        writer.add_tensor_info(name, stored, dtype, nbytes, weight_format.gguf_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in (progress or list)(list(shapes)):
            weight_format = formats[name]
            info = writer.tensors[0][name]
            chunks = (lambda s=shapes[name], f=weight_format: source.chunks(s, f))
            writer.write_tensor_data(_ChunkedTensor(info.nbytes, chunks))
    finally:
        writer.close()
    return path


def main(argv=None):
    from .generate import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(PRESETS),
                   help="the preset shape of the model")
    p.add_argument("--out", required=True,
                   help="the Hugging Face directory to write, or a .gguf file")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="of a Hugging Face directory")
    p.add_argument("--type", default=None, choices=sorted(FILE_TYPE_FORMATS),
                   help="write a GGUF file of this llama.cpp file type (default q8_0 for an "
                        "--out ending in .gguf)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = p.parse_args(argv)
    if a.type is not None or a.out.endswith(".gguf"):
        from tqdm import tqdm

        def bar(items):
            return tqdm(items, desc="writing", unit="tensor", file=sys.stderr, leave=False)
        print(write_random_gguf(a.out, a.shape, a.type or "q8_0", a.seed, progress=bar))
        return
    print(write_random_model(a.out, a.shape, a.dtype, a.seed))


if __name__ == "__main__":
    main()
