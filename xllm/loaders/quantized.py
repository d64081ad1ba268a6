"""xllm's quantized checkpoint format (written by ``tools/quantize.py``; docs/quantization.rst):
a directory with config.json (``"xllm_format": 1``), model.safetensors and the tokenizer. A
QTensor is stored as its arrays ``<name>.qs``, ``<name>.scales`` and (if asymmetric)
``<name>.mins``, a dense tensor as ``<name>``; all are read-only views of the mapped file."""
import os

import numpy as np

from ..errors import ModelFormatError
from ..files.common import read_json
from ..files.safetensors import as_array, read_safetensors
from ..formats.qtensor import QTensor
from ..model.weights import check_weights, expected_shapes
from .checkpoint import Checkpoint, check_fits, make_config

FORMAT_VERSION = 1


def is_quantized_dir(directory) -> bool:
    """Whether `directory` has a config.json with the key "xllm_format"."""
    try:
        return "xllm_format" in read_json(os.path.join(directory, "config.json"))
    except (ModelFormatError, OSError):
        return False  # missing, or unreadable JSON (the Hugging Face loader reports it)


def load_quantized(directory) -> Checkpoint:
    """Load an xllm quantized directory; every tensor is checked against config.json."""
    directory = os.fspath(directory)
    cpath, fpath = (os.path.join(directory, n) for n in ("config.json", "model.safetensors"))
    meta = read_json(cpath)
    try:
        if meta.get("xllm_format") != FORMAT_VERSION:
            raise ValueError(f"xllm_format {meta.get('xllm_format')!r} is not supported "
                             f"(this xllm reads {FORMAT_VERSION})")
        q, raw = meta["quantization"], meta["config"]
        if not isinstance(q, dict) or not isinstance(raw, dict):
            raise ValueError("quantization and config must be objects")
        want = (q["bits"], q["group_size"], q["asymmetric"], q["scale_dtype"])
        if tuple(map(type, want)) != (int, int, bool, str):
            raise ValueError(f"quantization (bits, group_size, asymmetric, scale_dtype) = "
                             f"{want} must be (integer, integer, true/false, string)")
    except (ValueError, KeyError) as e:
        raise ModelFormatError(f"{cpath}: not a valid xllm quantized config ({e})") from None
    eos = raw.get("extra_eos_token_ids") or []
    if not isinstance(eos, list):
        raise ModelFormatError(f"{cpath}: config.extra_eos_token_ids must be a list, got {eos!r}")
    config = make_config(cpath, **{**raw, "extra_eos_token_ids": tuple(eos)})
    if not os.path.isfile(fpath):
        raise ModelFormatError(f"{fpath}: missing (an xllm quantized directory needs it)")
    entries, weights = read_safetensors(fpath), {}
    check_fits(config, len(entries), os.path.getsize(fpath), fpath)
    for name, shape in expected_shapes(config).items():
        if f"{name}.qs" not in entries:
            if name in entries:
                weights[name] = as_array(entries[name], name, fpath)
            continue  # check_weights reports a missing tensor
        where = f"{fpath}: tensor {name!r}"
        parts = {p: entries.get(f"{name}.{p}") for p in ("qs", "scales", "mins")}
        if parts["scales"] is None or parts["qs"][0] != "U8" or len(parts["qs"][1]) != 3 \
                or len(parts["scales"][1]) != 3 or not parts["scales"][1][1]:
            raise ModelFormatError(f"{where}: needs {name}.qs (U8, 3-D) and {name}.scales (3-D)")
        qs = parts["qs"][2].reshape(parts["qs"][1])
        scales, mins = (None if parts[p] is None else as_array(parts[p], f"{name}.{p}", fpath)
                        for p in ("scales", "mins"))
        k, groups = shape[1], scales.shape[1]
        got = ({512: 8, 256: 4}.get(qs.shape[-1], 0), k // groups if k % groups == 0 else 0,
               mins is not None, {np.float16: "fp16", np.float32: "fp32"}.get(scales.dtype.type))
        if got != want:
            raise ModelFormatError(f"{where}: its arrays give (bits, group, asymmetric, scales) "
                                   f"= {got}, config.json records {want}")
        try:
            weights[name] = QTensor(shape, *got[:2], qs, scales, mins, q.get("parts"))
        except ModelFormatError as e:
            raise ModelFormatError(f"{where}: {str(e).removeprefix('QTensor: ')}") from None
    check_weights(weights, config, fpath)
    tok, template = meta.get("tokenizer"), meta.get("chat_template")
    if tok is not None and (not isinstance(tok, str) or tok != os.path.basename(tok)
                            or not os.path.isfile(os.path.join(directory, tok))):
        raise ModelFormatError(f"{cpath}: tokenizer file {tok!r} is not in {directory}")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{cpath}: chat_template must be a string, got {template!r}")
    return Checkpoint(config=config, weights=weights, source=directory,
                      tokenizer_path=tok and os.path.join(directory, tok), chat_template=template)
