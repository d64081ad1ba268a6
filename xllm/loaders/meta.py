"""Meta reference checkpoints: params.json + consolidated.NN.pth (one file per model-parallel
shard). Meta's RoPE rotates adjacent pairs, hence ``rope_interleaved=True``."""
import glob
import json
import os
import pickle

import numpy as np

from ..errors import ModelFormatError
from . import Checkpoint, check_weights, expected_shapes, find_file, make_config

# Axis along which model-parallel shards split each weight (norms are replicated).
_SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _load_shard(torch, path):
    """{canonical name: read-only numpy view} of one consolidated.NN.pth file."""
    try:
        # weights_only refuses to unpickle anything but tensors and plain containers, so a
        # malicious .pth cannot run code; mmap keeps the tensors on disk instead of in RAM.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ModelFormatError(f"{path}: refused: it holds pickled Python objects other than "
                               f"tensors, which xllm does not unpickle") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for corrupt files
        first_line = (str(e).splitlines() or [""])[0]
        raise ModelFormatError(f"{path}: cannot load as a PyTorch weights file "
                               f"({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    out = {}
    for key, t in state.items():
        if not (isinstance(key, str) and key.endswith(".weight") and isinstance(t, torch.Tensor)):
            continue  # e.g. Llama 1's rope.freqs, which xllm recomputes
        name = key[:-len(".weight")].replace(".attention.", ".").replace(".feed_forward.", ".")
        if t.dtype == torch.bfloat16:  # numpy has no bf16: expose the raw bits as uint16
            a = t.view(torch.int16).numpy().view(np.uint16)
        elif t.dtype in (torch.float32, torch.float16):
            a = t.numpy()
        else:
            raise ModelFormatError(f"{path}: tensor {key!r} has unsupported dtype {t.dtype}")
        a.flags.writeable = False  # the array's base chain keeps the tensor and its mmap alive
        out[name] = a
    return out


def _merge(shards, name, dim):
    """Join one weight from all shards along its model-parallel axis (a copy only if > 1 shard);
    None if some shard lacks it (then it is reported as missing)."""
    parts = [s.get(name) for s in shards]
    if any(x is None for x in parts):
        return None
    if len(parts) == 1 or name.endswith("norm"):  # norms are the same in every shard
        return parts[0]
    axis = _SPLIT_AXIS.get(name.rsplit(".", 1)[-1])
    if name == "tok_embeddings":  # Llama 2 splits the embedding dim, Llama 3 the vocabulary
        axis = 0 if parts[0].shape[1] == dim else 1
    return None if axis is None else np.concatenate(parts, axis=axis)  # None: not ours


def _meta_name(canonical):
    """The name Meta's files use for a canonical weight name."""
    if not canonical.startswith("layers."):
        return canonical + ".weight"
    _, i, short = canonical.split(".")
    group = ("feed_forward." if short in ("w1", "w2", "w3")
             else "attention." if short.startswith("w") else "")  # norms sit on the layer
    return f"layers.{i}.{group}{short}.weight"


def load_meta(directory) -> Checkpoint:
    """Load a Meta checkpoint directory (params.json + consolidated.*.pth)."""
    try:
        import torch
    except ImportError:
        raise ImportError("loading Meta .pth files needs PyTorch (pip install torch)") from None
    ppath = os.path.join(directory, "params.json")
    try:
        with open(ppath, encoding="utf-8") as f:
            p = json.load(f)
        dim, n_layers, n_heads = p["dim"], p["n_layers"], p["n_heads"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{ppath}: cannot read params ({type(e).__name__}: {e})") from None
    files = sorted(glob.glob(os.path.join(glob.escape(directory), "consolidated.*.pth")))
    if not files:
        raise ModelFormatError(f"{directory}: params.json but no consolidated.*.pth files")
    shards = [_load_shard(torch, f) for f in files]
    weights = {k: w for k in shards[0] if (w := _merge(shards, k, dim)) is not None}
    emb, w1 = weights.get("tok_embeddings"), weights.get("layers.0.w1")
    if emb is None or w1 is None:
        raise ModelFormatError(f"{files[0]}: missing tok_embeddings.weight or "
                               f"layers.0.feed_forward.w1.weight")
    vocab = p.get("vocab_size", -1)
    # use_scaled_rope: Llama 3.1's frequency scaling, constants from Meta's code
    scaling = {"rope_type": "llama3", "factor": p.get("rope_scaling_factor") or 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192} if p.get("use_scaled_rope") else None
    config = make_config(
        ppath, vocab_size=vocab if vocab and vocab > 0 else emb.shape[0], hidden_size=dim,
        intermediate_size=w1.shape[0], num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=p.get("n_kv_heads") or n_heads, rope_theta=float(p.get("rope_theta", 1e4)),
        rms_norm_eps=float(p.get("norm_eps", 1e-5)), max_seq_len=p.get("max_seq_len", 2048),
        tie_word_embeddings="output" not in weights, rope_interleaved=True, rope_scaling=scaling)
    weights = {k: weights[k] for k in expected_shapes(config) if k in weights}
    labels = {k: repr(_meta_name(k)) for k in expected_shapes(config)}
    check_weights(weights, config, directory, labels)
    return Checkpoint(config=config, weights=weights,
                      tokenizer_path=find_file(directory, ("tokenizer.model",)),
                      source=os.fspath(directory))
