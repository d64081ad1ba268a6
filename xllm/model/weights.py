"""The weights a model needs: canonical names, shapes from the config, supported dtypes."""
import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..formats.qtensor import QTensor, check_qtensor

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))


def expected_shapes(c: ModelConfig) -> dict:
    """Canonical name -> shape for every weight a model with config `c` needs. Per layer:
    attention_norm, wq, wk, wv, wo, ffn_norm, w1 (gate), w2 (down), w3 (up); with
    ``attention_bias`` also bq, bk, bv; with ``qk_norm`` also q_norm, k_norm."""
    h = c.hidden_size
    q = c.q_dim
    kv = c.kv_dim
    f = c.intermediate_size
    shapes = {"tok_embeddings": (c.vocab_size, h), "norm": (h,)}
    if not c.tie_word_embeddings:
        shapes["output"] = (c.vocab_size, h)
    per_layer = {"attention_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
                 "ffn_norm": (h,), "w1": (f, h), "w2": (h, f), "w3": (f, h)}
    if c.attention_bias:  # Qwen2: q, k and v add a bias
        per_layer.update({"bq": (q,), "bk": (kv,), "bv": (kv,)})
    if c.qk_norm:  # Qwen3: an RMSNorm per head on queries and keys
        per_layer.update({"q_norm": (c.head_dim,), "k_norm": (c.head_dim,)})
    for i in range(c.num_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


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
