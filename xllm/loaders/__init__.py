"""Checkpoint loaders: Hugging Face safetensors, Meta consolidated.*.pth, llama2.c .bin, GGUF.

Every loader returns a :class:`Checkpoint` whose weights use Meta-style canonical names
(``tok_embeddings``, ``norm``, ``output``, ``layers.{i}.wq`` ...), shaped [out, in], kept in the
dtype they were stored in (float32, float16, uint16 = bfloat16 bits, or a ``QTensor``) and
memory-mapped where the format allows. q/k rows are never permuted (see ``rope_interleaved``)."""
import os

from ..errors import ModelFormatError
from ..files.common import check_regular_file
from ..files.xllm_format import is_xllm_dir
from .checkpoint import Checkpoint


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
            if is_xllm_dir(path):
                from .quantized import load_quantized
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
