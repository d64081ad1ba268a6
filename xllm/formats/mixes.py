"""The format of each tensor in a file of one of llama.cpp's file types (``--type`` names).

llama.cpp's ``llama-quantize`` does not write every matrix of a file in the format the file type
names: ``llama_tensor_get_type`` (src/llama-quant.cpp) gives some tensors more bits, and a
matrix whose rows do not fit the format's block falls back to another format.
``tensor_format`` states those rules for the file types xllm writes (the registry's
``quantize_type`` names) and the tensors of a dense Llama-family model, in this order:

1. Vectors (the norms) stay F32; F32 and F16 files hold every matrix in their format.
2. The output matrix (``output.weight``, or ``token_embd.weight`` when the embeddings are tied
   and the file has no output matrix) is Q6_K in every quantized file type but Q8_0, which keeps
   Q8_0; it is Q8_0 if its row length is not a multiple of 256.
3. In Q4_K_M and Q5_K_M, ``attn_v.weight`` and ``ffn_down.weight`` are Q6_K in the layers where
   llama.cpp's ``use_more_bits(i, n)`` holds: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2 (integer
   division; i counts the layers in file order, which llama.cpp sorts by layer number).
4. A 70B model (80 layers, grouped-query attention: llama.cpp's LLM_TYPE_70B) has its attn_v
   matrices that would be Q4_K in Q5_K.
5. Every other matrix: the file type's own format (``FILE_TYPE_FORMATS``).
6. Fallback: a K-quant needs rows whose length K is a multiple of 256; otherwise Q4_K becomes
   Q5_0, Q5_K becomes Q5_1 and Q6_K becomes Q8_0, and a format whose block does not divide K
   either becomes F16 (llama.cpp's ``tensor cols ... are not divisible by 256`` warning and
   ``using fallback quantization``).

The rules for mixture-of-experts, Falcon, fused QKV and the IQ/Q2_K/Q3_K file types are not
here: xllm writes none of those. ``tests/test_kquants.py`` checks the table against the types
llama.cpp chose for every tensor of two small models (tests/data/kquant_golden.npz).
"""
import re

from .registry import FORMATS, writable_formats

QK_K = 256
# The file type's own format: the registry row whose quantize_type is the name.
FILE_TYPE_FORMATS = {name: f.name for name, f in writable_formats().items()}
# File types whose attn_v and ffn_down get Q6_K in the use_more_bits layers.
MORE_BITS_TYPES = ("q4_k_m", "q5_k_m")
# Formats without a block of 256 values they fall back to (llama.cpp's switch).
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
LAYER_NAME = re.compile(r"blk\.(\d+)\.")


def use_more_bits(layer, n_layers):
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer
    between them."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def is_llama_70b(config):
    """llama.cpp's LLM_TYPE_70B of the llama architecture: 80 layers with grouped-query
    attention (80 layers without it are its 65B)."""
    return config.num_layers == 80 and config.num_heads != config.num_kv_heads


def tensor_format(quantize_type, name, shape, config):
    """The registry format of GGUF tensor `name` (shape [rows, ..., K]) in a file of llama.cpp
    file type `quantize_type` (``q4_k_m``, ``q8_0``, ``f16`` ...) for a model of `config`
    (its num_layers, tie_word_embeddings, num_heads and num_kv_heads): the rules of the
    module docstring."""
    return fallback(mix_format(quantize_type, name, shape, config), shape[-1])


def mix_format(quantize_type, name, shape, config):
    """The format the mix gives tensor `name` (rules 1-5 of the module docstring), before the
    fallback for rows that do not fit it."""
    chosen = FORMATS[FILE_TYPE_FORMATS[quantize_type]]
    if len(shape) == 1:
        return FORMATS["F32"]
    if chosen.block == 1:  # F32, F16: not quantized, no mix
        return chosen
    k = shape[-1]
    is_output = name == "output.weight" or (
        config.tie_word_embeddings and name == "token_embd.weight")
    layer_match = LAYER_NAME.match(name)
    layer = int(layer_match.group(1)) if layer_match else None
    more_bits = layer is not None and use_more_bits(layer, config.num_layers)
    if is_output:
        if k % QK_K:
            kind = "Q8_0"
        elif chosen.name == "Q8_0":
            kind = "Q8_0"
        else:
            kind = "Q6_K"
    elif quantize_type in MORE_BITS_TYPES and name.endswith(("attn_v.weight", "ffn_down.weight")) \
            and more_bits:
        kind = "Q6_K"
    else:
        kind = chosen.name
    if is_llama_70b(config) and name.endswith("attn_v.weight") and kind == "Q4_K":
        kind = "Q5_K"
    return FORMATS[kind]


def fallback(weight_format, k):
    """`weight_format`, or what llama.cpp uses instead when rows of length `k` do not fit it
    (rule 6 of the module docstring)."""
    if weight_format.name in K_QUANT_FALLBACK and k % QK_K:
        weight_format = FORMATS[K_QUANT_FALLBACK[weight_format.name]]
    if k % weight_format.block:
        weight_format = FORMATS["F16"]
    return weight_format
