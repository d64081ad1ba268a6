"""Checkpoint loaders: Hugging Face safetensors, Meta consolidated.*.pth, llama2.c .bin, GGUF.

Every loader returns a :class:`Checkpoint` whose weights use Meta-style canonical names
(``tok_embeddings``, ``norm``, ``output``, ``layers.{i}.wq`` ...), shaped [out, in], kept in the
dtype they were stored in (float32, float16, uint16 = bfloat16 bits, or a ``QTensor``) and
memory-mapped where the format allows. q/k rows are never permuted (see ``rope_interleaved``)."""
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..quant import QTensor, check_qtensor

MAX_JSON_BYTES = 64 << 20  # config files are kilobytes; refuse to parse gigabytes
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))


@dataclass
class Checkpoint:
    """A loaded model: its config, canonical weights, a tokenizer file found next to it (or the
    GGUF file itself), if any, and the chat template (Jinja source) the checkpoint carries."""
    config: ModelConfig
    weights: dict
    tokenizer_path: Optional[str]
    source: str
    chat_template: Optional[str] = None
    tokenizer: object = None  # built from the checkpoint itself (GGUF metadata), if it has one


def expected_shapes(c: ModelConfig) -> dict:
    """Canonical name -> shape for every weight a model with config `c` needs."""
    h, q, kv, f = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size
    shapes = {"tok_embeddings": (c.vocab_size, h), "norm": (h,)}
    if not c.tie_word_embeddings:
        shapes["output"] = (c.vocab_size, h)
    per_layer = {"attention_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
                 "ffn_norm": (h,), "w1": (f, h), "w2": (h, f), "w3": (f, h)}
    for i in range(c.num_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def check_regular_file(path) -> None:
    """ModelFormatError naming `path` unless it is a regular file (symlinks followed): opening
    a FIFO would block forever, and a device, socket or directory is no model file.
    FileNotFoundError if it does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot stat ({e})") from None
    if not stat.S_ISREG(mode):
        raise ModelFormatError(f"{path}: not a regular file (a FIFO, device, socket or "
                               f"directory); refused")


def value_or(value, default):
    """`value`, or `default` if it is None (JSON null or absent): 0, "" or [] are kept, so
    ModelConfig reports them."""
    return default if value is None else value


def read_json(path) -> dict:
    """The JSON object in `path` (a regular file of at most MAX_JSON_BYTES); ModelFormatError
    naming the file if it cannot be read or is not an object."""
    check_regular_file(path)
    try:
        if (size := os.path.getsize(path)) > MAX_JSON_BYTES:
            raise ValueError(f"{size} bytes is more than the {MAX_JSON_BYTES} allowed")
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_fits(config: ModelConfig, n_tensors: int, nbytes: int, source) -> None:
    """ModelFormatError naming `source` if `config` needs more tensors than the files hold
    (`n_tensors`) or more weight bytes than their size (`nbytes`), at 1 bit per weight, the
    least any format stores. Runs before anything is allocated from the config's sizes."""
    c = config
    layers = c.num_layers
    need = 2 + 9 * layers  # tok_embeddings, norm, 9 per layer (output may be tied)
    if n_tensors < need:
        raise ModelFormatError(f"{source}: num_layers={layers} needs at least {need} tensors but "
                               f"the file holds {n_tensors}")
    h = c.hidden_size
    per_layer = 2 * h + 2 * c.q_dim * h + 2 * c.kv_dim * h + 3 * c.intermediate_size * h
    weights = c.vocab_size * h + h + layers * per_layer  # Python ints: no overflow
    if weights // 8 > nbytes:
        raise ModelFormatError(f"{source}: the config (vocab_size={c.vocab_size}, hidden_size="
                               f"{h}, num_layers={layers}, intermediate_size="
                               f"{c.intermediate_size}) needs {weights} weights, more than "
                               f"the {nbytes} bytes of the file can hold")


def check_weights(weights: dict, config: ModelConfig, source: str, names=None) -> None:
    """Raise ModelFormatError unless `weights` has every tensor `config` needs, with the right
    shape and a supported dtype. `names` maps canonical names to labels naming the tensor as
    the file does (and the file), so messages point at something the user can find."""
    for key, shape in expected_shapes(config).items():
        label = (names or {}).get(key) or repr(key)
        w = weights.get(key)
        if w is None:
            raise ModelFormatError(f"{source}: missing tensor {label}")
        if tuple(w.shape) != shape:
            raise ModelFormatError(f"{source}: tensor {label} has shape {tuple(w.shape)}, "
                                   f"expected {shape} from the config")
        if isinstance(w, QTensor):
            check_qtensor(w, f"{source}: tensor {label}")
        elif w.dtype not in SUPPORTED_DTYPES or not w.flags.c_contiguous:
            raise ModelFormatError(f"{source}: tensor {label} has unsupported dtype {w.dtype} "
                                   "or is not C-contiguous")


def make_config(source, **kwargs) -> ModelConfig:
    """ModelConfig(**kwargs), with any validation error re-raised naming `source`."""
    try:
        return ModelConfig(**kwargs)
    except (ModelFormatError, TypeError) as e:
        raise ModelFormatError(f"{source}: {str(e).removeprefix('config: ')}") from None


def find_file(directory, candidates):
    """The first of `candidates` that exists in `directory`, or None."""
    paths = (os.path.join(directory, name) for name in candidates)
    return next((p for p in paths if os.path.isfile(p)), None)


def load_checkpoint(path) -> Checkpoint:
    """Load a model from `path`, detecting its format: a directory with config.json (xllm
    quantized if it has the key "xllm_format", else Hugging Face) or params.json (Meta); a GGUF
    file (b"GGUF" or *.gguf); a llama2.c .bin (magic "ak42" or a plausible v0 header). A
    *.safetensors, *.pth or config.json file stands for its directory. Anything else raises
    ModelFormatError naming the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    if os.path.isfile(path) and path.endswith((".safetensors", ".pth", "config.json")):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            from .quantized import is_quantized_dir, load_quantized
            if is_quantized_dir(path):
                return load_quantized(path)
            from .hf import load_hf
            return load_hf(path)
        if os.path.isfile(os.path.join(path, "params.json")):
            from .meta import load_meta
            return load_meta(path)
        raise ModelFormatError(f"{path}: unknown model format (a directory needs config.json for "
                               f"Hugging Face or params.json for Meta checkpoints)")
    check_regular_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.endswith(".gguf"):
        from .gguf import load_gguf
        return load_gguf(path)
    from . import llama2c
    if llama2c.looks_like_llama2c(path):
        return llama2c.load_llama2c(path)
    raise ModelFormatError(f"{path}: unknown model format (not a Hugging Face or Meta directory, "
                           f"a GGUF file or a llama2.c .bin file)")
