"""xllm's quantized checkpoint format, read and written here (docs/quantization.rst).

A directory with ``config.json`` (``"xllm_format": 1``, the model config, the quantization
record, the source, the chat template and the tokenizer's file name), ``model.safetensors`` and
the tokenizer file. A QTensor is stored as its arrays ``<name>.qs``, ``<name>.scales`` and (if
asymmetric) ``<name>.mins``, a dense tensor as ``<name>``; on reading, all are read-only views of
the mapped file. Mapping the tensors onto a model (which names and shapes it needs) is the
loader's job (:mod:`xllm.loaders.quantized`)."""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import ModelFormatError
from ..formats.qtensor import QTensor
from ..formats.registry import PANELS, FORMATS, panel_block_bytes
from .common import read_json
from .safetensors import aligned_order, as_array, read_safetensors, write_safetensors

FORMAT_VERSION = 1
FORMAT_KEY = "xllm_format"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ALIGNMENT = 64  # bytes; the data of most tensors starts at a multiple of this
PACKED_PARTS = ("qs", "scales", "mins")
SCALE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
# The bits of a packed format, told by the bytes of a block of its codes.
BITS_OF_BLOCK_BYTES = {panel_block_bytes(f.bits): f.bits
                       for f in FORMATS.values() if f.packing == PANELS}


@dataclass
class Quantization:
    """config.json's "quantization" record: how the matrices were quantized (bits 32 or 16:
    dense float32 / float16), which stayed dense, and the activation parts qmatmul uses."""
    bits: int
    group_size: int
    asymmetric: bool
    scale_dtype: str  # "fp16" or "fp32"
    kept: list = field(default_factory=list)  # matrices left dense
    parts: Optional[int] = None  # None: the default for the bits

    def expected(self):
        """(bits, group, asymmetric, scale dtype name) every QTensor must have."""
        return (self.bits, self.group_size, self.asymmetric, self.scale_dtype)


@dataclass
class XllmHeader:
    """What config.json says, checked for its types (the config itself is the loader's)."""
    path: str
    config: dict
    quantization: Quantization
    tokenizer: Optional[str]
    chat_template: Optional[str]


def is_xllm_dir(directory) -> bool:
    """Whether `directory` has a config.json with the key "xllm_format"."""
    try:
        return FORMAT_KEY in read_json(os.path.join(directory, CONFIG_FILE))
    except (ModelFormatError, OSError):
        return False  # missing, or unreadable JSON (the Hugging Face loader reports it)


def read_header(directory) -> XllmHeader:
    """The checked contents of `directory`'s config.json (ModelFormatError naming it)."""
    path = os.path.join(directory, CONFIG_FILE)
    meta = read_json(path)
    try:
        quantization = _read_quantization(meta)
    except (ValueError, KeyError) as e:
        raise ModelFormatError(f"{path}: not a valid xllm quantized config ({e})") from None
    tokenizer = meta.get("tokenizer")
    template = meta.get("chat_template")
    if tokenizer is not None and (not isinstance(tokenizer, str)
                                  or tokenizer != os.path.basename(tokenizer)
                                  or not os.path.isfile(os.path.join(directory, tokenizer))):
        raise ModelFormatError(f"{path}: tokenizer file {tokenizer!r} is not in {directory}")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{path}: chat_template must be a string, got {template!r}")
    return XllmHeader(path, meta["config"], quantization, tokenizer, template)


def _read_quantization(meta):
    """The Quantization record of config.json's contents; ValueError or KeyError if invalid."""
    if meta.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(f"xllm_format {meta.get(FORMAT_KEY)!r} is not supported "
                         f"(this xllm reads {FORMAT_VERSION})")
    record = meta["quantization"]
    if not isinstance(record, dict) or not isinstance(meta["config"], dict):
        raise ValueError("quantization and config must be objects")
    quantization = Quantization(record["bits"], record["group_size"], record["asymmetric"],
                                record["scale_dtype"], record.get("kept", []),
                                record.get("parts"))
    want = quantization.expected()
    if tuple(map(type, want)) != (int, int, bool, str):
        raise ValueError(f"quantization (bits, group_size, asymmetric, scale_dtype) = "
                         f"{want} must be (integer, integer, true/false, string)")
    return quantization


def read_tensor(entries, name, shape, quantization, path):
    """Tensor `name` of shape `shape` from the safetensors `entries` of the file `path`: a
    QTensor if its packed arrays are there, else the dense array, else None (missing)."""
    if f"{name}.qs" not in entries:
        if name in entries:
            return as_array(entries[name], name, path)
        return None
    where = f"{path}: tensor {name!r}"
    parts = {part: entries.get(f"{name}.{part}") for part in PACKED_PARTS}
    qs_entry = parts["qs"]
    scales_entry = parts["scales"]
    if scales_entry is None or qs_entry[0] != "U8" or len(qs_entry[1]) != 3 \
            or len(scales_entry[1]) != 3 or not scales_entry[1][1]:
        raise ModelFormatError(f"{where}: needs {name}.qs (U8, 3-D) and {name}.scales (3-D)")
    qs = qs_entry[2].reshape(qs_entry[1])
    scales = as_array(scales_entry, f"{name}.scales", path)
    mins = None if parts["mins"] is None else as_array(parts["mins"], f"{name}.mins", path)
    found = _packed_parameters(qs, scales, mins, shape[1])
    if found != quantization.expected():
        raise ModelFormatError(f"{where}: its arrays give (bits, group, asymmetric, scales) "
                               f"= {found}, config.json records {quantization.expected()}")
    try:
        return QTensor(shape, quantization.bits, quantization.group_size, qs, scales, mins,
                       quantization.parts)
    except ModelFormatError as e:
        raise ModelFormatError(f"{where}: {str(e).removeprefix('QTensor: ')}") from None


def _packed_parameters(qs, scales, mins, k):
    """(bits, group, asymmetric, scale dtype name) that a QTensor's arrays show (0 or None
    where they show none)."""
    bits = BITS_OF_BLOCK_BYTES.get(qs.shape[-1], 0)
    groups = scales.shape[1]
    group = k // groups if k % groups == 0 else 0
    scale_dtype = next((name for name, dtype in SCALE_DTYPES.items()
                        if scales.dtype.type is dtype), None)
    return (bits, group, mins is not None, scale_dtype)


def read_tensors(directory):
    """(path, safetensors entries) of the directory's model.safetensors."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{path}: missing (an xllm quantized directory needs it)")
    return path, read_safetensors(path)


def stored_arrays(weights):
    """[(name, array)]: every array to store for {name: array or QTensor}."""
    arrays = []
    for name, weight in weights.items():
        if isinstance(weight, QTensor):
            for part in PACKED_PARTS:
                array = getattr(weight, part)
                if array is not None:
                    arrays.append((f"{name}.{part}", array))
        else:
            arrays.append((name, weight))
    return arrays


def write_weights(directory, weights):
    """Write {name: array or QTensor} as the directory's model.safetensors."""
    arrays = aligned_order(stored_arrays(weights), ALIGNMENT)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), arrays, ALIGNMENT,
                      metadata={"format": "xllm"})


def write_header(directory, config, quantization, source, chat_template, tokenizer):
    """Write the directory's config.json: `config` a ModelConfig, `quantization` a
    Quantization, `tokenizer` the tokenizer's file name in the directory (or None)."""
    config_record = {key: list(value) if isinstance(value, tuple) else value
                     for key, value in dataclasses.asdict(config).items()}
    quantization_record = {"bits": quantization.bits, "group_size": quantization.group_size,
                           "asymmetric": quantization.asymmetric,
                           "scale_dtype": quantization.scale_dtype,
                           "kept": quantization.kept, "parts": quantization.parts}
    meta = {FORMAT_KEY: FORMAT_VERSION, "config": config_record,
            "quantization": quantization_record, "source": source,
            "chat_template": chat_template, "tokenizer": tokenizer}
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=lambda x: x.item())  # .item(): NumPy scalars
