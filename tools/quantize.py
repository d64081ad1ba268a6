"""Quantize a model into xllm's quantized format (a directory) or a llama.cpp GGUF file.

    python tools/quantize.py --model SRC --out DST --bits {32,16,8,4} [--group-size 32]
        [--asymmetric | --symmetric] [--scale-dtype fp16|fp32] [--format xllm|gguf]
        [--keep embeddings,output] [--activation-parts {2,3}] [--force]

SRC is anything xllm loads (Hugging Face or Meta directory, GGUF, llama2.c .bin, an xllm
quantized directory) or a registered model name such as smollm2-135m-instruct; quantized
sources are dequantized first. --bits 8 / 4 quantize the matrices (int8 is symmetric; int4 is
asymmetric unless --symmetric in the xllm format, symmetric Q4_0 unless --asymmetric (Q4_1) in
GGUF); --bits 32 / 16 write dense float32 / float16. Norms always stay float32 (GGUF) or as
stored (xllm); --keep leaves the token embeddings and/or the output matrix unquantized.
--activation-parts (xllm format) records how many int8 parts qmatmul splits the activations
into for these weights: 2 (faster) or 3 (more exact); default 2 for int8, 3 for int4.

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
import struct
import sys
import time
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from xllm import hub
from xllm._kernels.layout import to_float32
from xllm.loaders import load_checkpoint
from xllm.model.weights import expected_shapes
from xllm.loaders.gguf import gguf_name
from xllm.loaders.quantized import is_quantized_dir
from xllm.formats.qtensor import QTensor, quantize_weights

KEEP_NAMES = {"embeddings": "tok_embeddings", "tok_embeddings": "tok_embeddings",
              "output": "output"}
SAFETENSORS_TAGS = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                    np.dtype(np.uint16): "BF16", np.dtype(np.uint8): "U8"}
GGUF_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # general.file_type
ALIGN = 64  # bytes; the data of most tensors starts at a multiple of this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="source: a path xllm loads or a registered name (smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="output directory (xllm) or .gguf file")
    p.add_argument("--bits", type=int, required=True, choices=[32, 16, 8, 4],
                   help="8 or 4: quantized; 32 or 16: dense float32 / float16")
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
    p.add_argument("--format", choices=["xllm", "gguf"], default="xllm")
    p.add_argument("--keep", default="",
                   help="comma-separated matrices to leave unquantized: embeddings, output")
    p.add_argument("--activation-parts", type=int, choices=[2, 3], default=None,
                   help="int8 parts per activation block in qmatmul (xllm format, --bits 8/4): "
                        "2 faster, 3 more exact (default: 2 for int8, 3 for int4)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def check_options(a):
    """The validated settings of the parsed arguments (ValueError if they do not fit)."""
    g, gguf = a.group_size, a.format == "gguf"
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
    keep = {k.strip() for k in a.keep.split(",") if k.strip()}
    unknown = keep - set(KEEP_NAMES)
    if unknown:
        raise ValueError(f"--keep {','.join(sorted(unknown))}: not one of embeddings, output")
    if a.activation_parts is not None and (gguf or a.bits > 8):
        raise ValueError("--activation-parts applies to the xllm format with --bits 8 or 4 "
                         "(GGUF Q8_0 files run with 2 parts, Q4_0/Q4_1 with 3)")
    asym = (not gguf) if a.asymmetric is None and a.bits == 4 else bool(a.asymmetric)
    parts = (a.activation_parts or (2 if a.bits == 8 else 3)) if a.bits <= 8 else None
    return SimpleNamespace(bits=a.bits, group=g if a.bits <= 8 else 0, asym=asym,
                           scale_dtype=np.float16 if a.scale_dtype == "fp16" else np.float32,
                           keep={KEEP_NAMES[k] for k in keep}, format=a.format, parts=parts)


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_paths(src, dst, force, tokenizer=None):
    """Refuse an output that is (or is inside, or contains) the source, or that exists."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if os.path.isfile(s) and s.endswith((".safetensors", ".pth", "config.json")):
        s = os.path.dirname(s)  # stands for its directory
    if _inside(d, s) or _inside(s, d):
        raise ValueError(f"--out {dst} is the source model, inside it or contains it")
    if tokenizer and _inside(os.path.realpath(tokenizer), d):
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
    if not is_quantized_dir(path):
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


def write_safetensors(path, tensors):
    """Write [(name, array)] as a safetensors file. The data starts 64-byte aligned and the
    tensors whose size is a multiple of 64 bytes come first (keeping them aligned), then the
    others by decreasing item size (keeping each naturally aligned); there are no holes."""
    order = sorted(tensors, key=lambda t: (t[1].nbytes % ALIGN != 0, -t[1].itemsize))
    header, offset = {"__metadata__": {"format": "xllm"}}, 0
    for name, a in order:
        header[name] = {"dtype": SAFETENSORS_TAGS[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, a in order:
            f.write(np.ascontiguousarray(a).data)


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
    os.mkdir(out)
    weights, kept = convert_weights(ckpt, o)
    tensors = []
    for name, w in weights.items():
        if isinstance(w, QTensor):
            tensors += [(f"{name}.{p}", getattr(w, p)) for p in ("qs", "scales", "mins")
                        if getattr(w, p) is not None]
        else:
            tensors.append((name, w))
    write_safetensors(os.path.join(out, "model.safetensors"), tensors)
    config = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(ckpt.config).items()}
    meta = {"xllm_format": 1, "config": config,
            "quantization": {"bits": o.bits, "group_size": o.group, "asymmetric": o.asym,
                             "scale_dtype": "fp16" if o.scale_dtype == np.float16 else "fp32",
                             "kept": kept, "parts": o.parts},
            "source": source, "chat_template": ckpt.chat_template,
            "tokenizer": write_tokenizer(out, ckpt, o.fields)}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=lambda x: x.item())  # .item(): NumPy scalars
    n = sum(isinstance(w, QTensor) for w in weights.values())
    return n, len(weights) - n, kept


# ----------------------------------------------------------------------------- GGUF


def _pre_tokenizer_name(tok):
    from xllm.tokenizers.byte_level import PRE_TOKENIZERS
    for name in ("gpt-2", "smollm", "llama-bpe", "default"):
        if tuple(PRE_TOKENIZERS[name]) == tok.pre_patterns:
            return name
    raise ValueError("the tokenizer's pre-tokenizer has no llama.cpp name (known: gpt-2, "
                     "smollm, llama-bpe, default)")


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
    tok, c, p = load_tokenizer(ckpt.tokenizer_path, ckpt.config.vocab_size), ckpt.config, \
        "tokenizer.ggml."
    out = [(p + "tokens", tok.pieces, T.ARRAY, T.STRING),
           (p + "token_type", tok.types, T.ARRAY, T.INT32),
           (p + "add_bos_token", tok.add_bos_default, T.BOOL, None)]
    if isinstance(tok, SentencePieceBPE):
        out += [(p + "model", "llama", T.STRING, None), (p + "pre", "default", T.STRING, None),
                (p + "scores", tok.scores, T.ARRAY, T.FLOAT32),
                (p + "add_space_prefix", tok.add_dummy_prefix, T.BOOL, None),
                (p + "remove_extra_whitespaces", tok.remove_extra_whitespaces, T.BOOL, None)]
    else:
        merges = [" ".join(m) for m, _ in sorted(tok._ranks.items(), key=lambda kv: kv[1])]
        out += [(p + "model", "gpt2", T.STRING, None),
                (p + "pre", _pre_tokenizer_name(tok), T.STRING, None),
                (p + "merges", merges, T.ARRAY, T.STRING)]
    ids = {"bos": c.bos_token_id if c.bos_token_id is not None else tok.bos_id,
           "eos": c.eos_token_id if c.eos_token_id is not None else tok.eos_id,
           "unknown": tok.unk_id, "eot": (*c.extra_eos_token_ids, -1)[0],
           "eom": (*c.extra_eos_token_ids, -1, -1)[1]}
    return out + [(f"{p}{k}_token_id", i, T.UINT32, None) for k, i in ids.items()
                  if i is not None and i >= 0]


def _gguf_types(ckpt, o):
    """Canonical name -> GGUF type of each tensor."""
    q = {32: "F32", 16: "F16", 8: "Q8_0", 4: "Q4_1" if o.asym else "Q4_0"}[o.bits]
    types = {}
    for name, shape in expected_shapes(ckpt.config).items():
        if len(shape) == 1:
            types[name] = "F32"
        elif name in o.keep:
            types[name] = "F16" if o.bits == 16 else "F32"
        elif q.startswith("Q") and shape[1] % 32:
            print(f"note: {name} stays F32: K = {shape[1]} is not a multiple of 32",
                  file=sys.stderr)
            types[name] = "F32"
        else:
            types[name] = q
    return q, types


def write_gguf(path, ckpt, o, source):
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize
    c, G = ckpt.config, gguf.GGMLQuantizationType
    kind, types = _gguf_types(ckpt, o)
    w = gguf.GGUFWriter(path, "llama")
    general = [f for f in o.fields if f[0].startswith("general.") and f[0] not in (
        "general.architecture", "general.file_type", "general.quantization_version")]
    for field in general:  # a GGUF source's name, license ...
        w.add_key_value(*field)
    if not general:
        w.add_name(os.path.basename(os.path.normpath(source)))
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(GGUF_FILE_TYPES[kind])
    if kind.startswith("Q"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for field in tokenizer_metadata(ckpt, o.fields):
        if field[0] != "tokenizer.chat_template" and (field[3] is None or len(field[1])):
            w.add_key_value(*field)
    if ckpt.chat_template:
        w.add_chat_template(ckpt.chat_template)
    extra = {}
    if c.rope_scaling:  # llama.cpp reads Llama 3 scaling as a tensor of frequency divisors
        plain = dataclasses.replace(c, rope_scaling=None)
        extra["rope_freqs.weight"] = (plain.inv_freq() / c.inv_freq()).astype(np.float32)
        w.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
    for name, t in types.items():  # all tensor infos first: then each tensor is streamed
        shape, dtype = expected_shapes(c)[name], np.dtype(np.float32 if t == "F32" else
                                                          np.float16 if t == "F16" else np.uint8)
        if t.startswith("Q"):
            shape = quant_shape_to_byte_shape(shape, G[t])
        w.add_tensor_info(gguf_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                          G[t])
    for name, a in extra.items():
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, t in _bar(types.items(), "writing"):
            a = dense(ckpt.weights[name], np.float32)
            if name.endswith((".wq", ".wk")) and not c.rope_interleaved:
                a = to_interleaved(a, c.num_heads if name.endswith(".wq") else c.num_kv_heads)
            a = np.ascontiguousarray(a)
            w.write_tensor_data(quantize(a, G[t]) if t.startswith("Q") else
                                a.astype(np.float16) if t == "F16" else a)
        for a in extra.values():
            w.write_tensor_data(a)
    finally:
        w.close()
    n = sum(t.startswith("Q") for t in types.values())
    kept = [k for k, t in types.items() if len(expected_shapes(c)[k]) == 2 and
            kind.startswith("Q") and not t.startswith("Q")]
    return n, len(types) - n, kept


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
        return convert(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert(args):
    """Run the parsed command line; the exit status."""
    start, tmp = time.time(), None
    try:
        o = check_options(args)
        src = hub.resolve(args.model)
        check_paths(src, args.out, args.force)
        ckpt = load_checkpoint(src)
        check_paths(src, args.out, args.force, ckpt.tokenizer_path)
        if o.bits <= 8 and ckpt.config.hidden_size % o.group:
            raise ValueError(f"--group-size {o.group} does not divide hidden_size "
                             f"{ckpt.config.hidden_size} (the K of most matrices)")
        if "output" in o.keep and "output" not in ckpt.weights:
            o.keep.add("tok_embeddings")  # tied: the output matrix is the embedding table
        if ckpt.tokenizer is None and ckpt.tokenizer_path is None:
            print("note: the source has no tokenizer (pass token ids, or xllm.load(..., "
                  "tokenizer=...)); llama.cpp needs one in a GGUF", file=sys.stderr)
        source = args.model if src != args.model else os.path.abspath(src)
        o.fields = source_fields(ckpt)
        tmp = args.out.rstrip("/" + os.sep) + f".tmp-{os.getpid()}"
        _remove(tmp)
        writer = write_gguf if o.format == "gguf" else write_xllm
        quantized, dense_count, kept = writer(tmp, ckpt, o, source)
        old = None
        if os.path.lexists(args.out):  # --force: move the old output away, then delete it
            old = args.out.rstrip("/" + os.sep) + f".old-{os.getpid()}"
            os.replace(args.out, old)
        os.replace(tmp, args.out)
        tmp = None
        _remove(old)
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
    what = f"int{o.bits} g{o.group}{' asym' if o.asym else ''}, {o.parts} activation parts" \
        if o.bits <= 8 else f"float{o.bits}"
    if o.format == "gguf":
        what = {32: "F32", 16: "F16", 8: "Q8_0", 4: "Q4_1" if o.asym else "Q4_0"}[o.bits]
    print(f"{args.out} ({o.format}, {what}): {quantized} tensors quantized, {dense_count} dense"
          + (f" (kept matrices: {', '.join(kept)})" if kept else "")
          + f"; {_size(args.out) / 1e6:.1f} MB in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
