"""GGUF files (llama.cpp) of the ``llama`` (Llama, Mistral), ``qwen2`` and ``qwen3``
architectures, parsed by :mod:`xllm.files.gguf`, which checks every size and offset.

What each tensor type becomes is the weight-format registry's ``packing``
(:mod:`xllm.formats.registry`): F32, F16 and BF16 (as uint16 bits) tensors are zero-copy views
of the memory-mapped file. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K run natively:
repacked once at load (same size) into a ``QTensor``, then the file's pages are dropped; a file
may mix them tensor by tensor (Q4_K_M does). The other types the registry knows are expanded once, a chunk of rows at a time, into float32 (``EXPANDED_TO``; float16 halves that
memory but moved SmolLM2-135M Q4_1's logits by up to 0.041, against 1e-4, from transformers'
float32 expansion). q/k rows of ``llama`` files are in llama.cpp's interleaved RoPE layout,
used as stored (``rope_interleaved=True``); ``qwen2`` and ``qwen3`` files keep Hugging Face's
order (llama.cpp runs them with NEOX RoPE: ``rope_interleaved=False``)."""
import os

import numpy as np

from ..errors import ModelFormatError
from ..files.gguf import open_gguf, typed_value
from ..formats.arena import Arena
from ..formats.qtensor import from_gguf_blocks
from ..formats.registry import EXPANDED_TO, FLOAT, PANELS, gguf_formats
from ..model.weights import check_weights, expected_shapes
from ..tokenizers import tokenizer_from_gguf
from .checkpoint import Checkpoint, check_fits, make_config, name_in_file

_CHUNK = 1 << 20  # float32 elements dequantized per step

_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER = {"attn_norm.weight": "attention_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
          "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
          "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3",
          # qwen2
          "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
          # qwen3
          "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm"}
# general.architecture -> the ModelConfig switches it sets; only ``llama`` files hold q/k rows
# in the interleaved RoPE order
ARCHITECTURES = {"llama": dict(rope_interleaved=True),
                 "qwen2": dict(rope_interleaved=False, attention_bias=True),
                 "qwen3": dict(rope_interleaved=False, qk_norm=True)}


def gguf_name(canonical):
    """The GGUF tensor name of a canonical xllm weight name."""
    top = {name + ".weight": weight for name, weight in _TOP.items()}
    return name_in_file(canonical, top, _LAYER, "blk.{i}.{name}")


def _array(tensor, path, gguf_file, arena):
    """A canonical [out, in] array of GGUFTensor `tensor` of `gguf_file`, as the registry says:
    a view for a FLOAT format, a QTensor for a PANELS one (matrices only, its arrays from
    `arena`: huge pages), else expanded."""
    formats = gguf_formats()
    weight_format = formats.get(tensor.kind)
    if weight_format is None:
        raise ModelFormatError(f"{path}: tensor {tensor.name!r} has type {tensor.kind}, which "
                               f"xllm does not support (supported: {', '.join(formats)})")
    if weight_format.packing == PANELS and len(tensor.dims) == 2:
        rows = tensor.dims[1]
        cols = tensor.dims[0]
        packed = from_gguf_blocks(tensor.data, tensor.kind, (rows, cols), empty=arena.empty)
        gguf_file.drop_pages(tensor.data)  # the copy is all we need
        return packed
    if weight_format.packing == FLOAT:
        return tensor.data
    return _expand(tensor, weight_format)


def _expand(tensor, weight_format):
    """The tensor dequantized into a new array of the EXPANDED_TO dtype, a chunk at a time."""
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])
    out = np.empty((rows.shape[0], tensor.dims[0]), EXPANDED_TO.dtype)
    step = max(1, _CHUNK // out.shape[1])
    for r in range(0, rows.shape[0], step):
        out[r:r + step] = weight_format.dequantize(rows[r:r + step])
    return out.reshape(tuple(reversed(tensor.dims)))


def _llama3_scaling(tensor, theta, head_dim, original_context, path):
    """Llama 3 rope_scaling parameters reproducing llama.cpp's rope_freqs tensor (None if there
    is none or it scales nothing), or an error."""
    if tensor is not None and tensor.kind not in ("F32", "F16"):
        raise ModelFormatError(f"{path}: rope_freqs.weight has type {tensor.kind}, not F32/F16")
    factors = None if tensor is None else np.asarray(tensor.data, np.float32).reshape(-1)
    if factors is None or np.allclose(factors, 1.0):
        return None
    if not np.isfinite(factors).all():
        raise ModelFormatError(f"{path}: rope_freqs.weight holds values that are not finite")
    scaling = {"rope_type": "llama3", "factor": round(float(factors.max()), 4),
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original_context}
    # a one-head config of this head size: only its RoPE frequencies matter
    one_head = dict(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                    num_heads=1, num_kv_heads=1, rope_theta=theta, bos_token_id=None,
                    eos_token_id=None)
    plain = make_config(path, **one_head).inv_freq()
    scaled = make_config(path, **one_head, rope_scaling=scaling).inv_freq()
    expect = plain / scaled
    if factors.shape != expect.shape or not np.allclose(factors, expect, rtol=1e-3):
        raise ModelFormatError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling "
                               f"(factor {scaling['factor']}, low 1, high 4); not supported")
    return scaling


def load_gguf(path) -> Checkpoint:
    """Load a GGUF file: config from its ``<architecture>.*`` metadata, canonical weights."""
    path = os.fspath(path)
    gguf_file = open_gguf(path)
    _check_architecture(gguf_file, path)
    config = _read_config(gguf_file, path)
    check_fits(config, len(gguf_file.tensors), gguf_file.buf.size, path)
    template = typed_value(gguf_file.metadata, "tokenizer.chat_template", str, None, path)
    tokenizer = _read_tokenizer(gguf_file.metadata, config, path)
    del gguf_file.metadata  # the parsed metadata (lists of a whole vocabulary) before the weights
    weights = _read_weights(gguf_file, config, path)
    return Checkpoint(config=config, weights=weights, tokenizer_path=None, source=path,
                      chat_template=template, tokenizer=tokenizer)


def _check_architecture(gguf_file, path):
    """ModelFormatError unless the file holds a model of a supported architecture with a token
    embedding matrix."""
    arch = gguf_file.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:  # a list is not hashable
        raise ModelFormatError(f"{path}: GGUF architecture {arch!r} is not supported; xllm loads "
                               f"{', '.join(map(repr, ARCHITECTURES))} models")
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelFormatError(f"{path}: missing tensor 'token_embd.weight'")
    if len(embedding.dims) != 2:
        raise ModelFormatError(f"{path}: tensor 'token_embd.weight' has dims "
                               f"{list(embedding.dims)}, expected 2")


def _read_config(gguf_file, path):
    """The ModelConfig that the ``<architecture>.*`` and ``tokenizer.ggml.*`` metadata
    describe."""
    meta = gguf_file.metadata
    tensors = gguf_file.tensors
    arch = meta["general.architecture"]

    def get(key, kind, default=None):
        return typed_value(meta, key, kind, default, path)

    hidden = get(f"{arch}.embedding_length", int, 0)
    heads = get(f"{arch}.attention.head_count", int, 0)
    head_dim = get(f"{arch}.attention.key_length", int) or hidden // max(heads, 1)
    rotary_dims = get(f"{arch}.rope.dimension_count", int, head_dim)
    value_dim = get(f"{arch}.attention.value_length", int, head_dim)
    if rotary_dims != head_dim or value_dim != head_dim:
        raise ModelFormatError(f"{path}: rope.dimension_count={rotary_dims} or key/value lengths "
                               f"differ from head_dim={head_dim} (partial RoPE is not supported)")
    theta = float(get(f"{arch}.rope.freq_base", float, 10000.0))
    scaling_type = get(f"{arch}.rope.scaling.type", str, "none")
    if scaling_type != "none":
        raise ModelFormatError(f"{path}: RoPE scaling type {scaling_type!r} is not supported")
    original_context = get(f"{arch}.rope.scaling.original_context_length", int, 8192)
    scaling = _llama3_scaling(tensors.get("rope_freqs.weight"), theta, head_dim,
                              original_context, path)
    eos = [get(f"tokenizer.ggml.{k}_token_id", int) for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(e for e in eos if e is not None))  # in order, without repeats
    return make_config(
        path, vocab_size=tensors["token_embd.weight"].dims[1], hidden_size=hidden,
        intermediate_size=get(f"{arch}.feed_forward_length", int, 0),
        num_heads=heads, num_kv_heads=get(f"{arch}.attention.head_count_kv", int) or heads,
        head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-5)),
        num_layers=get(f"{arch}.block_count", int, 0),
        tie_word_embeddings="output.weight" not in tensors,
        max_seq_len=get(f"{arch}.context_length", int, 2048),
        sliding_window=get(f"{arch}.attention.sliding_window", int),
        bos_token_id=get("tokenizer.ggml.bos_token_id", int),
        eos_token_id=eos[0] if eos else None, extra_eos_token_ids=tuple(eos[1:]),
        **ARCHITECTURES[arch])


def _read_tokenizer(meta, config, path):
    """The tokenizer the metadata describes (None if it has none), checked against the
    embedding's rows."""
    if "tokenizer.ggml.model" not in meta:
        return None
    tokenizer = tokenizer_from_gguf(meta, path)
    if tokenizer.vocab_size > config.vocab_size:  # a padded embedding (larger) is normal
        raise ModelFormatError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} "
                               f"tokens, more than the {config.vocab_size} rows of "
                               f"token_embd.weight")
    return tokenizer


def _read_weights(gguf_file, config, path):
    """{canonical name: array or QTensor} of the tensors the config needs, checked."""
    names = {canonical: gguf_name(canonical) for canonical in expected_shapes(config)}
    arena = Arena()
    weights = {canonical: _array(gguf_file.tensors[name], path, gguf_file, arena)
               for canonical, name in names.items() if name in gguf_file.tensors}
    labels = {canonical: repr(name) for canonical, name in names.items()}
    check_weights(weights, config, path, labels)
    return weights
