"""xllm's quantized checkpoint format (:mod:`xllm.files.xllm_format`, written by
``tools/quantize.py``) mapped onto a Checkpoint: the config from config.json, every tensor
checked against it."""
import os

from ..errors import ModelFormatError
from ..files.xllm_format import read_header, read_tensor, read_tensors
from ..model.weights import check_weights, expected_shapes
from .checkpoint import Checkpoint, check_fits, make_config


def load_quantized(directory) -> Checkpoint:
    """Load an xllm quantized directory; every tensor is checked against config.json."""
    directory = os.fspath(directory)
    header = read_header(directory)
    config = _make_config(header)
    weights_path, entries = read_tensors(directory)
    check_fits(config, len(entries), os.path.getsize(weights_path), weights_path)
    weights = {}
    for name, shape in expected_shapes(config).items():
        tensor = read_tensor(entries, name, shape, header.quantization, weights_path)
        if tensor is not None:
            weights[name] = tensor  # check_weights reports a missing one
    check_weights(weights, config, weights_path)
    tokenizer_path = None
    if header.tokenizer is not None:
        tokenizer_path = os.path.join(directory, header.tokenizer)
    return Checkpoint(config=config, weights=weights, source=directory,
                      tokenizer_path=tokenizer_path, chat_template=header.chat_template)


def _make_config(header):
    """The ModelConfig of config.json's "config" record (a JSON list of extra EOS ids becomes
    the tuple ModelConfig keeps)."""
    extra_eos = header.config.get("extra_eos_token_ids") or []
    if not isinstance(extra_eos, list):
        raise ModelFormatError(f"{header.path}: config.extra_eos_token_ids must be a list, "
                               f"got {extra_eos!r}")
    return make_config(header.path, **{**header.config, "extra_eos_token_ids": tuple(extra_eos)})
