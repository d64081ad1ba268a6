"""GGUF files (llama.cpp) of the ``llama`` architecture, read with ``gguf.GGUFReader``.

F32, F16 and BF16 (as uint16 bits) tensors are zero-copy views of the memory-mapped file.
Q8_0, Q4_0 and Q4_1 run natively: repacked once at load (same size) into a ``QTensor``, then
the file's pages are dropped. Other quantized types are expanded once, a chunk of rows at a
time, into float32 (``EXPANDED_DTYPE``; float16 halves that memory but moved SmolLM2-135M
Q4_1's logits by up to 0.041, against 1e-4, from transformers' float32 expansion).
q/k rows are in llama.cpp's interleaved RoPE layout, used as stored (``rope_interleaved=True``).
The file is parsed by :mod:`xllm.loaders.gguf_file`, which checks every size and offset."""
import os

import numpy as np

from ..errors import ModelFormatError
from ..files.gguf import open_gguf, typed_value
from ..formats.qtensor import GGUF_NATIVE, from_gguf_blocks
from ..model.weights import check_weights, expected_shapes
from ..tokenizers import tokenizer_from_gguf
from .checkpoint import Checkpoint, check_fits, make_config

EXPANDED_DTYPE = np.float32
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_CHUNK = 1 << 20  # float32 elements dequantized per step

_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER = {"attn_norm": "attention_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
          "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_down": "w2",
          "ffn_up": "w3"}


def gguf_name(canonical):
    """The GGUF tensor name of a canonical xllm weight name."""
    if canonical in _TOP.values():
        return next(k for k, v in _TOP.items() if v == canonical) + ".weight"
    _, i, short = canonical.split(".")
    return f"blk.{i}.{next(k for k, v in _LAYER.items() if v == short)}.weight"


def _array(t, path, f):
    """A canonical [out, in] array of GGUFTensor `t` of GGUFFile `f`: a view for F32/F16/BF16,
    a QTensor for Q8_0/Q4_0/Q4_1, else expanded."""
    kind = t.kind
    if kind in GGUF_NATIVE and len(t.dims) == 2:
        q = from_gguf_blocks(t.data, kind, (t.dims[1], t.dims[0]))
        f.drop_pages()  # the copy is all we need
        return q
    if kind in ("F32", "F16", "BF16"):
        return t.data
    if kind not in QUANTIZED:
        raise ModelFormatError(f"{path}: tensor {t.name!r} has type {kind}, which xllm does not "
                               f"support (supported: F32, F16, BF16, {', '.join(QUANTIZED)})")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rows = t.data.reshape(-1, t.data.shape[-1])
    out = np.empty((rows.shape[0], t.dims[0]), EXPANDED_DTYPE)
    step = max(1, _CHUNK // out.shape[1])
    for r in range(0, rows.shape[0], step):
        out[r:r + step] = dequantize(rows[r:r + step], GGMLQuantizationType[kind])
    return out.reshape(tuple(reversed(t.dims)))


def _llama3_scaling(tensor, theta, head_dim, orig_ctx, path):
    """Llama 3 rope_scaling parameters reproducing llama.cpp's rope_freqs tensor (None if there
    is none or it scales nothing), or an error."""
    if tensor is not None and tensor.kind not in ("F32", "F16"):
        raise ModelFormatError(f"{path}: rope_freqs.weight has type {tensor.kind}, not F32/F16")
    factors = None if tensor is None else np.asarray(tensor.data, np.float32).reshape(-1)
    if factors is None or np.allclose(factors, 1.0):
        return None
    if not np.isfinite(factors).all():
        raise ModelFormatError(f"{path}: rope_freqs.weight holds values that are not finite")
    s = {"rope_type": "llama3", "factor": round(float(factors.max()), 4), "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": orig_ctx}
    kw = dict(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
              num_heads=1, num_kv_heads=1, rope_theta=theta, bos_token_id=None,
              eos_token_id=None)
    expect = (make_config(path, **kw).inv_freq()
              / make_config(path, **kw, rope_scaling=s).inv_freq())
    if factors.shape != expect.shape or not np.allclose(factors, expect, rtol=1e-3):
        raise ModelFormatError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling "
                               f"(factor {s['factor']}, low 1, high 4); not supported")
    return s


def load_gguf(path) -> Checkpoint:
    """Load a llama GGUF file: config from its ``llama.*`` metadata, canonical weights."""
    path = os.fspath(path)
    f = open_gguf(path)
    meta = f.metadata

    def get(key, kind, default=None):
        return typed_value(meta, key, kind, default, path)

    if (arch := meta.get("general.architecture")) != "llama":
        raise ModelFormatError(f"{path}: GGUF architecture {arch!r} is not supported; xllm loads "
                               f"'llama' models")
    tensors = f.tensors
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: missing tensor 'token_embd.weight'")
    embd = tensors["token_embd.weight"]
    if len(embd.dims) != 2:
        raise ModelFormatError(f"{path}: tensor 'token_embd.weight' has dims {list(embd.dims)}, "
                               f"expected 2")
    hidden = get("llama.embedding_length", int, 0)
    heads = get("llama.attention.head_count", int, 0)
    head_dim = get("llama.attention.key_length", int) or hidden // max(heads, 1)
    rot = get("llama.rope.dimension_count", int, head_dim)
    if rot != head_dim or get("llama.attention.value_length", int, head_dim) != head_dim:
        raise ModelFormatError(f"{path}: rope.dimension_count={rot} or key/value lengths differ "
                               f"from head_dim={head_dim} (partial RoPE is not supported)")
    theta = float(get("llama.rope.freq_base", float, 10000.0))
    if (kind := get("llama.rope.scaling.type", str, "none")) != "none":
        raise ModelFormatError(f"{path}: RoPE scaling type {kind!r} is not supported")
    scaling = _llama3_scaling(tensors.get("rope_freqs.weight"), theta, head_dim,
                              get("llama.rope.scaling.original_context_length", int, 8192), path)
    eos = [get(f"tokenizer.ggml.{k}_token_id", int) for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(e for e in eos if e is not None))  # in order, without repeats
    config = make_config(
        path, vocab_size=embd.dims[1], hidden_size=hidden,
        intermediate_size=get("llama.feed_forward_length", int, 0),
        num_heads=heads, num_kv_heads=get("llama.attention.head_count_kv", int) or heads,
        head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", float, 1e-5)),
        num_layers=get("llama.block_count", int, 0),
        tie_word_embeddings="output.weight" not in tensors,
        max_seq_len=get("llama.context_length", int, 2048), rope_interleaved=True,
        bos_token_id=get("tokenizer.ggml.bos_token_id", int),
        eos_token_id=eos[0] if eos else None, extra_eos_token_ids=tuple(eos[1:]))
    check_fits(config, len(tensors), f.buf.size, path)
    tokenizer, template = None, get("tokenizer.chat_template", str)
    if "tokenizer.ggml.model" in meta:
        tokenizer = tokenizer_from_gguf(meta, path)
        if tokenizer.vocab_size > config.vocab_size:  # a padded embedding (larger) is normal
            raise ModelFormatError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} "
                                   f"tokens, more than the {config.vocab_size} rows of "
                                   f"token_embd.weight")
    del meta, f.metadata  # the parsed metadata (lists of a whole vocabulary) before the weights
    files = {k: gguf_name(k) for k in expected_shapes(config)}
    weights = {k: _array(tensors[n], path, f) for k, n in files.items() if n in tensors}
    check_weights(weights, config, path, {k: repr(n) for k, n in files.items()})
    return Checkpoint(config=config, weights=weights, tokenizer_path=None, source=path,
                      chat_template=template, tokenizer=tokenizer)
