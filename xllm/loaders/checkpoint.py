"""What every loader returns (Checkpoint) and the checks they share."""
import os
from dataclasses import dataclass
from typing import Optional

from ..config import ModelConfig
from ..errors import ModelFormatError


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


def value_or(value, default):
    """`value`, or `default` if it is None (JSON null or absent): 0, "" or [] are kept, so
    ModelConfig reports them."""
    return default if value is None else value


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


def name_in_file(canonical, top, layer, layer_name):
    """A file format's name for the canonical weight name `canonical`, from the loader's tables:
    `top` maps file names to the canonical names of whole-model weights, `layer` file names to
    the canonical short names of layer weights; `layer_name` has ``{i}`` (the layer) and
    ``{name}`` (the file's short name)."""
    for file_name, name in top.items():
        if name == canonical:
            return file_name
    _, index, short = canonical.split(".")
    return layer_name.format(i=index, name=next(k for k, v in layer.items() if v == short))
