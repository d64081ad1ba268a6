"""Quantize a model into xllm's quantized format (a directory) or a llama.cpp GGUF file.

    python tools/quantize.py --model SRC --out DST (--bits {32,16,8,4} | --type TYPE [--pure])
        [--group-size 32] [--asymmetric | --symmetric] [--scale-dtype fp16|fp32]
        [--format xllm|gguf] [--keep embeddings,output] [--activation-parts {1,2,3}] [--force]

SRC is anything xllm loads (Hugging Face or Meta directory, GGUF, llama2.c .bin, an xllm
quantized directory) or a registered model name such as smollm2-135m-instruct; quantized
sources are dequantized first. --bits 8 / 4 quantize the matrices (int8 is symmetric; int4 is
asymmetric unless --symmetric in the xllm format, symmetric Q4_0 unless --asymmetric (Q4_1) in
GGUF); --bits 32 / 16 write dense float32 / float16.

--type names one of llama.cpp's file types instead: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1,
q4_k_m, q5_k_m, q6_k (the weight-format registry's writable formats). In GGUF each tensor then
gets the format llama.cpp's llama-quantize gives it (xllm/formats/mixes.py states the rules):
the output matrix (or the tied embeddings) is Q6_K in every quantized type but q8_0; attn_v and
ffn_down are Q6_K in a third of the layers of q4_k_m and q5_k_m; a matrix whose rows are not a
multiple of 256 long falls back from Q4_K / Q5_K / Q6_K to Q5_0 / Q5_1 / Q8_0 (and to F16 if 32
does not divide them either). --pure writes every matrix in the type's own format (fallbacks
aside), as llama-quantize --pure does. The blocks are llama.cpp's to the bit
(tests/test_kquants.py). In the xllm format, --type q8_0, q4_0, q4_1, f32 and f16 stand for the
--bits options; the other types are GGUF only. The output is GGUF if --format gguf is given,
--out ends in .gguf, or --type is GGUF only; else the xllm format.
Norms always stay float32 (GGUF) or as stored (xllm); --keep leaves the token embeddings
and/or the output matrix unquantized.
--activation-parts (xllm format) records how many int8 parts qmatmul splits the activations
into for these weights: 1 (fastest, llama.cpp's precision), 2 or 3 (most exact); default 2 for
int8, 3 for int4.

The xllm format is described in docs/quantization.rst. The output is written next to DST
under a temporary name and moved into place at the end: on an error, Ctrl-C or SIGTERM nothing is
left behind and the exit status is 2. --force replaces only what this tool writes (a GGUF file,
or a folder with an xllm config.json and only the files the xllm format has).
"""
import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from xllm import hub
from xllm._kernels.layout import BLOCK, to_float32
from xllm.files import gguf as gguf_file
from xllm.files import xllm_format
from xllm.formats import mixes
from xllm.formats.qtensor import QTensor, add_activation_parts_option, quantize_weights
from xllm.formats.registry import (FLOAT, FORMATS, PANELS, float_format, packed_format,
                                   writable_formats)
from xllm.loaders import load_checkpoint
from xllm.loaders.gguf import gguf_name
from xllm.model.weights import expected_shapes

KEEP_NAMES = {"embeddings": "tok_embeddings", "tok_embeddings": "tok_embeddings",
              "output": "output"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="source: a path xllm loads or a registered name (smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="output directory (xllm) or .gguf file")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--bits", type=int, choices=[32, 16, 8, 4],
                      help="8 or 4: quantized; 32 or 16: dense float32 / float16")
    kind.add_argument("--type", choices=sorted(writable_formats()),
                      help="a llama.cpp file type, with its mix of formats in GGUF (xllm format: "
                           "q8_0 = --bits 8, q4_0 = --bits 4 --symmetric, q4_1 = --bits 4 "
                           "--asymmetric, f32, f16)")
    p.add_argument("--pure", action="store_true",
                   help="--type, GGUF: every matrix in the type's own format (no Q6_K for the "
                        "output, attn_v, ffn_down); rows that fit no block still fall back")
    p.add_argument("--group-size", type=int, default=32,
                   help="values per scale along K (int8: a power of two >= 32; int4 and GGUF: 32)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--asymmetric", dest="asymmetric", action="store_true",
                     help="int4 with a minimum per group (xllm default; GGUF Q4_1)")
    sym.add_argument("--symmetric", dest="asymmetric", action="store_false",
                     help="int4 without minimums (GGUF default: Q4_0)")
    p.set_defaults(asymmetric=None)
    p.add_argument("--scale-dtype", choices=["fp16", "fp32"], default="fp16",
                   help="dtype of the group scales (GGUF: fp16)")
    p.add_argument("--format", choices=["xllm", "gguf"], default=None,
                   help="default: gguf if --out ends in .gguf or --type is GGUF only, else xllm")
    p.add_argument("--keep", default="",
                   help="comma-separated matrices to leave unquantized: embeddings, output")
    add_activation_parts_option(p, metavar=None,
                                help="int8 parts per activation block in qmatmul (xllm format, "
                                     "--bits 8/4): 1 fastest, 3 most exact (default: 2 for int8, "
                                     "3 for int4)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def apply_type(a):
    """Set --bits and --asymmetric from --type, if given (ValueError if they disagree with
    the other options)."""
    if a.type is None:
        return
    chosen = writable_formats()[a.type]
    if not in_xllm_format(chosen):
        raise ValueError(f"--type {a.type}: the xllm format cannot hold {chosen.name}; write "
                         "GGUF (--format gguf, or an --out ending in .gguf)")
    if chosen.packing != PANELS:
        if a.asymmetric is not None:
            raise ValueError(f"--type {a.type} is not quantized: no --symmetric/--asymmetric")
        a.bits = 8 * chosen.dtype.itemsize
        return
    if a.asymmetric is not None and a.asymmetric != chosen.asymmetric:
        raise ValueError(f"--type {a.type} is {'a' if chosen.asymmetric else ''}symmetric")
    if a.group_size != chosen.block:
        raise ValueError(f"--group-size {a.group_size}: --type {a.type} has blocks of "
                         f"{chosen.block} values")
    a.bits = chosen.bits
    a.asymmetric = chosen.asymmetric


def in_xllm_format(weight_format):
    """Whether the xllm format holds `weight_format`: a float one, or int8/int4 in blocks of 32
    (not a codec of the kernels: Q5_0, Q5_1 and the K-quants are GGUF only)."""
    return weight_format.packing == FLOAT or (weight_format.packing == PANELS
                                              and weight_format.block == BLOCK
                                              and weight_format.codec is None)


def output_format(a):
    """--format, else gguf if --out ends in .gguf or --type is GGUF only, else xllm."""
    if a.format is not None:
        return a.format
    if a.out.endswith(".gguf"):
        return "gguf"
    if a.type is not None and not in_xllm_format(writable_formats()[a.type]):
        return "gguf"
    return "xllm"


def _keep(a):
    """The canonical names --keep names (ValueError for an unknown one)."""
    keep = {k.strip() for k in a.keep.split(",") if k.strip()}
    unknown = keep - set(KEEP_NAMES)
    if unknown:
        raise ValueError(f"--keep {','.join(sorted(unknown))}: not one of embeddings, output")
    return {KEEP_NAMES[k] for k in keep}


def check_file_type(a):
    """The validated settings of --type with GGUF output: llama.cpp's file type a.type, whose
    tensors get the formats formats/mixes.py gives them (ValueError if an option conflicts)."""
    chosen = writable_formats()[a.type]
    if a.asymmetric is not None:
        if chosen.packing == FLOAT:
            raise ValueError(f"--type {a.type} is not quantized: no --symmetric/--asymmetric")
        if chosen.packing != PANELS or chosen.codec is not None:
            raise ValueError(f"--type {a.type} fixes its layout: no --symmetric/--asymmetric")
        if a.asymmetric != chosen.asymmetric:
            raise ValueError(f"--type {a.type} is {'a' if chosen.asymmetric else ''}symmetric")
    if a.group_size not in (32, chosen.block):
        raise ValueError(f"--group-size {a.group_size}: --type {a.type} has blocks of "
                         f"{chosen.block} values")
    if a.scale_dtype != "fp16":
        raise ValueError("--scale-dtype fp32: GGUF blocks store float16 scales")
    if a.activation_parts is not None:
        raise ValueError("--activation-parts applies to the xllm format with --bits 8 or 4 "
                         "(GGUF Q8_0 files run with 2 parts, Q4_0/Q4_1 with 3)")
    return SimpleNamespace(bits=None, group=chosen.block, asym=chosen.asymmetric,
                           scale_dtype=np.float16, keep=_keep(a), format="gguf", parts=None,
                           type=a.type, pure=a.pure)


def check_options(a):
    """The validated settings of the parsed arguments (ValueError if they do not fit)."""
    a.format = output_format(a)
    if a.pure and (a.type is None or a.format != "gguf"):
        raise ValueError("--pure applies to --type with GGUF output")
    if a.type is not None and a.format == "gguf":
        return check_file_type(a)
    apply_type(a)
    g = a.group_size
    gguf = a.format == "gguf"
    if a.asymmetric and a.bits != 4:
        raise ValueError("--asymmetric applies to --bits 4 only (int8 is always symmetric)")
    if a.bits <= 8:
        if g < 32 or g & (g - 1):
            raise ValueError(f"--group-size {g} is not a power of two >= 32")
        if (a.bits == 4 or gguf) and g != 32:
            raise ValueError(f"--group-size {g}: " + ("GGUF blocks hold 32 values" if gguf else
                                                      "int4 supports group size 32 only"))
    if gguf and a.scale_dtype != "fp16":
        raise ValueError("--scale-dtype fp32: GGUF blocks store float16 scales")
    keep = _keep(a)
    if a.activation_parts is not None and (gguf or a.bits > 8):
        raise ValueError("--activation-parts applies to the xllm format with --bits 8 or 4 "
                         "(GGUF Q8_0 files run with 2 parts, Q4_0/Q4_1 with 3)")
    asym = (not gguf) if a.asymmetric is None and a.bits == 4 else bool(a.asymmetric)
    parts = (a.activation_parts or (2 if a.bits == 8 else 3)) if a.bits <= 8 else None
    return SimpleNamespace(bits=a.bits, group=g if a.bits <= 8 else 0, asym=asym,
                           scale_dtype=np.float16 if a.scale_dtype == "fp16" else np.float32,
                           keep=keep, format=a.format, parts=parts, type=None, pure=False)


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_paths(src, dst, force, tokenizer=None):
    """Refuse an output that is (or is inside, or contains) the source, or that exists."""
    source = os.path.realpath(src)
    out = os.path.realpath(dst)
    if os.path.isfile(source) and source.endswith((".safetensors", ".pth", "config.json")):
        source = os.path.dirname(source)  # stands for its directory
    if _inside(out, source) or _inside(source, out):
        raise ValueError(f"--out {dst} is the source model, inside it or contains it")
    if tokenizer and _inside(os.path.realpath(tokenizer), out):
        raise ValueError(f"--out {dst} would overwrite the source's tokenizer {tokenizer}")
    if os.path.lexists(dst) and not force:
        raise ValueError(f"--out {dst} exists (pass --force to replace it)")
    if os.path.lexists(dst) and not written_here(dst):
        raise ValueError(f"--out {dst} exists and is not a model this tool wrote (a GGUF file, or "
                         "a folder with config.json's \"xllm_format\" and only the files it "
                         "writes): --force replaces only those; remove it yourself or choose "
                         "another --out")


def written_here(path):
    """Whether `path` is recognisably an output of this tool, which --force may replace: a GGUF
    file, or an xllm quantized folder holding nothing but the files write_xllm writes."""
    if os.path.islink(path):
        return False
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    if not xllm_format.is_xllm_dir(path):
        return False
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        tokenizer = json.load(f).get("tokenizer")
    expected = {"config.json", "model.safetensors", str(tokenizer)}
    if tokenizer == "tokenizer.json":
        expected.add("tokenizer_config.json")  # see write_tokenizer
    return all(name in expected and os.path.isfile(os.path.join(path, name))
               and not os.path.islink(os.path.join(path, name)) for name in os.listdir(path))


def _remove(path):
    if path and os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif path and os.path.lexists(path):
        os.unlink(path)


def dense(w, dtype):
    """A weight (array or QTensor) as a dense array of `dtype` (a view when it already is)."""
    a = w.dequantize() if isinstance(w, QTensor) else w
    return a if a.dtype == dtype else to_float32(a).astype(dtype)


def to_interleaved(w, heads):
    """q/k rows from Hugging Face's half-split RoPE layout to GGUF's interleaved one: within
    each head, row j * hd/2 + i moves to 2i + j (the inverse of HF's conversion script)."""
    n, k = w.shape
    return w.reshape(heads, 2, n // heads // 2, k).swapaxes(1, 2).reshape(n, k)


def _bar(items, desc):
    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- xllm format


def convert_weights(ckpt, o):
    """(new weight dict, names of matrices left dense) for the xllm format."""
    if o.bits >= 16:
        dt = np.float32 if o.bits == 32 else np.float16
        return {n: dense(w, np.float32 if len(w.shape) == 1 else dt)
                for n, w in _bar(ckpt.weights.items(), "converting")}, []
    out = quantize_weights(ckpt.weights, o.bits, o.group, o.asym, o.scale_dtype, o.keep,
                           lambda items: _bar(items, "quantizing"), o.parts)
    kept = [n for n, w in out.items() if not isinstance(w, QTensor) and w.ndim == 2]
    for n in kept:
        if n not in o.keep:
            print(f"note: {n} stays dense: K = {out[n].shape[1]} is not a multiple of the "
                  f"group size {o.group}", file=sys.stderr)
    return out, kept


def write_tokenizer(directory, ckpt, fields):
    """Copy (or, from GGUF metadata, write) the tokenizer into `directory`; its file name."""
    if ckpt.tokenizer_path:
        name = os.path.basename(ckpt.tokenizer_path)
        shutil.copyfile(ckpt.tokenizer_path, os.path.join(directory, name))
        config = os.path.join(os.path.dirname(ckpt.tokenizer_path), "tokenizer_config.json")
        if name == "tokenizer.json" and os.path.isfile(config):  # BOS/EOS live there
            shutil.copyfile(config, os.path.join(directory, "tokenizer_config.json"))
        return name
    if ckpt.tokenizer is None:
        return None
    import gguf
    w = gguf.GGUFWriter(os.path.join(directory, "tokenizer.gguf"), "llama")
    for field in tokenizer_metadata(ckpt, fields):
        w.add_key_value(*field)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return "tokenizer.gguf"


def write_xllm(out, ckpt, o, source):
    """Write the xllm format into the new directory `out`; (quantized, dense, kept) counts."""
    os.mkdir(out)
    weights, kept = convert_weights(ckpt, o)
    xllm_format.write_weights(out, weights)
    quantization = xllm_format.Quantization(
        bits=o.bits, group_size=o.group, asymmetric=o.asym,
        scale_dtype="fp16" if o.scale_dtype == np.float16 else "fp32", kept=kept, parts=o.parts)
    tokenizer = write_tokenizer(out, ckpt, o.fields)
    xllm_format.write_header(out, ckpt.config, quantization, source, ckpt.chat_template,
                             tokenizer)
    quantized = sum(isinstance(w, QTensor) for w in weights.values())
    return quantized, len(weights) - quantized, kept


# ----------------------------------------------------------------------------- GGUF


def _pre_tokenizer_name(tok):
    """llama.cpp's name (the first PRE_TOKENIZERS gives) for the tokenizer's regexes and its
    ignore_merges."""
    from xllm.tokenizers.byte_level import IGNORE_MERGES, PRE_TOKENIZERS
    for name, patterns in PRE_TOKENIZERS.items():
        if tuple(patterns) == tok.pre_patterns and (name in IGNORE_MERGES) == tok.ignore_merges:
            return name
    raise ValueError(f"the tokenizer's pre-tokenizer has no llama.cpp name (known: "
                     f"{', '.join(sorted(PRE_TOKENIZERS))})")


def source_fields(ckpt):
    """[(key, value, GGUFValueType, array item type)]: the metadata of the GGUF file the
    checkpoint's tokenizer came from (the model itself, or an xllm directory's tokenizer.gguf),
    or [] if it has another tokenizer or none. (Parsed once: it is slow for big vocabularies.)"""
    path = ckpt.tokenizer_path if (ckpt.tokenizer_path or "").endswith(".gguf") else \
        ckpt.source if ckpt.tokenizer is not None and ckpt.tokenizer_path is None else None
    if path is None:
        return []
    from gguf import GGUFReader, GGUFValueType as T
    return [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == T.ARRAY else None)
            for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")]


def tokenizer_metadata(ckpt, fields):
    """[(key, value, GGUFValueType, array item type)]: tokenizer.* GGUF metadata describing the
    checkpoint's tokenizer (from `fields`, see source_fields, else built from the tokenizer)."""
    from gguf import GGUFValueType as T
    if fields:
        return [f for f in fields if f[0].startswith("tokenizer.")]
    if ckpt.tokenizer_path is None:
        return []
    from xllm.tokenizers import SentencePieceBPE, load_tokenizer
    tok = load_tokenizer(ckpt.tokenizer_path, ckpt.config.vocab_size)
    c = ckpt.config
    p = "tokenizer.ggml."
    out = [(p + "tokens", tok.pieces, T.ARRAY, T.STRING),
           (p + "token_type", tok.types, T.ARRAY, T.INT32),
           (p + "add_bos_token", tok.add_bos_default, T.BOOL, None)]
    if isinstance(tok, SentencePieceBPE):
        out += [(p + "model", "llama", T.STRING, None), (p + "pre", "default", T.STRING, None),
                (p + "scores", tok.scores, T.ARRAY, T.FLOAT32),
                (p + "add_space_prefix", tok.add_dummy_prefix, T.BOOL, None),
                (p + "remove_extra_whitespaces", tok.remove_extra_whitespaces, T.BOOL, None)]
    else:
        merges = tok.merges()
        out += [(p + "model", "gpt2", T.STRING, None),
                (p + "pre", _pre_tokenizer_name(tok), T.STRING, None),
                (p + "merges", merges, T.ARRAY, T.STRING)]
    ids = {"bos": c.bos_token_id if c.bos_token_id is not None else tok.bos_id,
           "eos": c.eos_token_id if c.eos_token_id is not None else tok.eos_id,
           "unknown": tok.unk_id, "eot": (*c.extra_eos_token_ids, -1)[0],
           "eom": (*c.extra_eos_token_ids, -1, -1)[1]}
    return out + [(f"{p}{k}_token_id", i, T.UINT32, None) for k, i in ids.items()
                  if i is not None and i >= 0]


def weight_format(o):
    """The registry format of the quantized (or dense) matrices that the options ask for (of
    --type: the file type's own format, which most matrices get)."""
    if o.type is not None:
        return writable_formats()[o.type]
    if o.bits == 32:
        return float_format(np.float32)
    if o.bits == 16:
        return float_format(np.float16)
    return packed_format(o.bits, o.group, o.asym)


def _gguf_formats(ckpt, o):
    """(format of the matrices, {canonical name: format of that tensor}) of a GGUF output: norms
    and kept matrices stay float (F32, or F16 for --bits 16), and so do matrices whose K is not
    a multiple of the format's block. With --type: llama.cpp's mix (see _file_type_formats)."""
    if o.type is not None:
        return _file_type_formats(ckpt, o)
    chosen = weight_format(o)
    formats = {}
    for name, shape in expected_shapes(ckpt.config).items():
        if len(shape) == 1:
            formats[name] = FORMATS["F32"]
        elif name in o.keep:
            formats[name] = FORMATS["F16"] if o.bits == 16 else FORMATS["F32"]
        elif shape[1] % chosen.block:
            print(f"note: {name} stays F32: K = {shape[1]} is not a multiple of "
                  f"{chosen.block}", file=sys.stderr)
            formats[name] = FORMATS["F32"]
        else:
            formats[name] = chosen
    return chosen, formats


def _file_type_formats(ckpt, o):
    """(format of the file type, {canonical name: format}) of --type o.type: each tensor's format
    in llama.cpp's mix (formats/mixes.py), or with --pure the type's own format for every
    matrix; matrices whose rows fit neither get llama.cpp's fallback (noted); --keep leaves
    matrices F32."""
    c = ckpt.config
    chosen = writable_formats()[o.type]
    formats = {}
    fallbacks = {}  # (wanted, used, K) -> number of matrices
    for name, shape in expected_shapes(c).items():
        file_name = gguf_name(name)
        if len(shape) == 2 and name in o.keep:
            formats[name] = FORMATS["F32"]
            continue
        if o.pure and len(shape) == 2:
            wanted = chosen
        else:
            wanted = mixes.mix_format(o.type, file_name, shape, c)
        formats[name] = mixes.fallback(wanted, shape[-1])
        if formats[name] is not wanted:
            key = (wanted.name, formats[name].name, shape[-1])
            fallbacks[key] = fallbacks.get(key, 0) + 1
    for (wanted, used, k), count in fallbacks.items():
        print(f"note: {count} matrices with rows of {k} values (not a multiple of the {wanted} "
              f"block) are {used} instead of {wanted}, as llama.cpp falls back", file=sys.stderr)
    return chosen, formats


def gguf_fields(ckpt, o, source, chosen):
    """[(key, value, GGUFValueType, item type)]: the GGUF metadata of the output, in order."""
    from gguf import GGML_QUANT_VERSION, Keys
    from gguf import GGUFValueType as T
    c = ckpt.config
    arch = c.architecture
    fields = [f for f in o.fields if f[0].startswith("general.") and f[0] not in (
        "general.architecture", "general.file_type", "general.quantization_version")]
    if not fields:  # a GGUF source's name, license ... else the source's file name
        fields.append((Keys.General.NAME, os.path.basename(os.path.normpath(source)),
                       T.STRING, None))
    hyperparameters = [(Keys.LLM.VOCAB_SIZE, c.vocab_size),
                       (Keys.LLM.CONTEXT_LENGTH, c.max_seq_len),
                       (Keys.LLM.EMBEDDING_LENGTH, c.hidden_size),
                       (Keys.LLM.BLOCK_COUNT, c.num_layers),
                       (Keys.LLM.FEED_FORWARD_LENGTH, c.intermediate_size),
                       (Keys.Attention.HEAD_COUNT, c.num_heads),
                       (Keys.Attention.HEAD_COUNT_KV, c.num_kv_heads),
                       (Keys.Rope.DIMENSION_COUNT, c.head_dim)]
    if c.head_dim != c.hidden_size // c.num_heads:
        hyperparameters += [(Keys.Attention.KEY_LENGTH, c.head_dim),
                            (Keys.Attention.VALUE_LENGTH, c.head_dim)]
    fields += [(key.format(arch=arch), value, T.UINT32, None) for key, value in hyperparameters]
    fields.append((Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), c.rms_norm_eps,
                   T.FLOAT32, None))
    fields.append((Keys.Rope.FREQ_BASE.format(arch=arch), c.rope_theta, T.FLOAT32, None))
    if c.sliding_window:
        fields.append((Keys.Attention.SLIDING_WINDOW.format(arch=arch), c.sliding_window,
                       T.UINT32, None))
    fields.append((Keys.General.FILE_TYPE, int(chosen.file_type), T.UINT32, None))
    if chosen.packing != FLOAT:
        fields.append((Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, T.UINT32, None))
    for field in tokenizer_metadata(ckpt, o.fields):
        if field[0] != "tokenizer.chat_template" and (field[3] is None or len(field[1])):
            fields.append(field)
    if ckpt.chat_template:
        fields.append((Keys.Tokenizer.CHAT_TEMPLATE, ckpt.chat_template, T.STRING, None))
    if c.rope_scaling:
        original_context = int(c.rope_scaling["original_max_position_embeddings"])
        fields.append((Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), original_context,
                       T.UINT32, None))
    return fields


def gguf_matrix(ckpt, name):
    """Weight `name` as float32 in GGUF's layout (q/k rows in the interleaved RoPE order for the
    llama architecture; qwen2 and qwen3 keep Hugging Face's order)."""
    c = ckpt.config
    a = dense(ckpt.weights[name], np.float32)
    if name.endswith((".wq", ".wk")) and not c.rope_interleaved and c.architecture == "llama":
        a = to_interleaved(a, c.num_heads if name.endswith(".wq") else c.num_kv_heads)
    return np.ascontiguousarray(a)


def write_gguf(path, ckpt, o, source):
    """Write a GGUF file; (quantized, dense, kept) counts."""
    c = ckpt.config
    chosen, formats = _gguf_formats(ckpt, o)
    shapes = expected_shapes(c)
    tensors = [gguf_file.TensorToWrite(gguf_name(name), shapes[name], weight_format,
                                       lambda name=name: gguf_matrix(ckpt, name))
               for name, weight_format in formats.items()]
    if c.rope_scaling:  # llama.cpp reads Llama 3 scaling as a tensor of frequency divisors
        plain = dataclasses.replace(c, rope_scaling=None)
        divisors = (plain.inv_freq() / c.inv_freq()).astype(np.float32)
        tensors.append(gguf_file.TensorToWrite("rope_freqs.weight", divisors.shape,
                                               FORMATS["F32"], lambda: divisors))
    gguf_file.write_gguf(path, c.architecture, gguf_fields(ckpt, o, source, chosen), tensors,
                         progress=lambda items: _bar(items, "writing"))
    quantized = sum(f.packing != FLOAT for f in formats.values())
    kept = [name for name, f in formats.items() if len(shapes[name]) == 2
            and chosen.packing != FLOAT and f.packing == FLOAT]
    return quantized, len(formats) - quantized, kept


# ----------------------------------------------------------------------------- main


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv=None):
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = convert(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status == 0 and _size(args.out) > (source_bytes := _size(hub.resolve(args.model))):
        print(f"note: {args.out} ({_size(args.out) / 1e6:.1f} MB) is bigger than its source "
              f"({source_bytes / 1e6:.1f} MB), which holds fewer bits per weight than the "
              "chosen format", file=sys.stderr)
    return status


def load_source(args, o):
    """(checkpoint, how config.json names the source) of --model, checked against the
    options; sets o.keep for a tied output and o.fields (the source's GGUF metadata)."""
    src = hub.resolve(args.model)
    check_paths(src, args.out, args.force)
    ckpt = load_checkpoint(src)
    check_paths(src, args.out, args.force, ckpt.tokenizer_path)
    if o.type is None and o.bits <= 8 and ckpt.config.hidden_size % o.group:
        raise ValueError(f"--group-size {o.group} does not divide hidden_size "
                         f"{ckpt.config.hidden_size} (the K of most matrices)")
    if "output" in o.keep and "output" not in ckpt.weights:
        o.keep.add("tok_embeddings")  # tied: the output matrix is the embedding table
    if ckpt.tokenizer is None and ckpt.tokenizer_path is None:
        print("note: the source has no tokenizer (pass token ids, or xllm.load(..., "
              "tokenizer=...)); llama.cpp needs one in a GGUF", file=sys.stderr)
    o.fields = source_fields(ckpt)
    source = args.model if src != args.model else os.path.abspath(src)
    return ckpt, source


def move_into_place(tmp, out):
    """Rename the finished output `tmp` to `out` (an old `out`, with --force, is moved away
    first and deleted after)."""
    old = None
    if os.path.lexists(out):
        old = out.rstrip("/" + os.sep) + f".old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


def convert(args):
    """Run the parsed command line; the exit status."""
    start = time.time()
    tmp = None
    try:
        o = check_options(args)
        ckpt, source = load_source(args, o)
        tmp = args.out.rstrip("/" + os.sep) + f".tmp-{os.getpid()}"
        _remove(tmp)
        writer = write_gguf if o.format == "gguf" else write_xllm
        quantized, dense_count, kept = writer(tmp, ckpt, o, source)
        move_into_place(tmp, args.out)
        tmp = None
    except KeyboardInterrupt:
        _remove(tmp)
        print("quantize: interrupted; nothing was written", file=sys.stderr)
        return 2
    except Exception as e:  # one line for the user, and no partial output
        _remove(tmp)
        known = isinstance(e, (ValueError, OSError))  # ModelFormatError is a ValueError
        msg = str(e) if known else f"{type(e).__name__}: {e}"
        print(f"quantize: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    if o.type is not None:
        what = o.type.upper() + (" pure" if o.pure else "")
    elif o.format == "gguf":
        what = weight_format(o).name
    elif o.bits <= 8:
        what = f"int{o.bits} g{o.group}{' asym' if o.asym else ''}, {o.parts} activation parts"
    else:
        what = f"float{o.bits}"
    print(f"{args.out} ({o.format}, {what}): {quantized} tensors quantized, {dense_count} dense"
          + (f" (kept matrices: {', '.join(kept)})" if kept else "")
          + f"; {_size(args.out) / 1e6:.1f} MB in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
