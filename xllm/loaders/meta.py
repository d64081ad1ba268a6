"""Meta reference checkpoints: params.json + consolidated.NN.pth (one file per model-parallel
shard). Meta's RoPE rotates adjacent pairs, hence ``rope_interleaved=True``."""
import glob
import os
import pickle
import struct
import zipfile

import numpy as np

from ..errors import ModelFormatError
from ..files.common import check_regular_file, read_json
from ..model.weights import check_weights, expected_shapes
from .checkpoint import Checkpoint, check_fits, find_file, make_config, value_or

# Axis along which model-parallel shards split each weight (norms are replicated).
_SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _check_archive(path):
    """ModelFormatError naming `path` unless it is a zip archive (torch.save's format) whose
    members are stored uncompressed inside the file: nothing is then read or allocated beyond
    the file's own bytes (a compressed member could expand without bound; the legacy non-zip
    format allocates storages of sizes it reads from the file)."""
    check_regular_file(path)
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, OverflowError,
            NotImplementedError, IndexError, KeyError) as e:
        raise ModelFormatError(f"{path}: not a PyTorch zip archive ({type(e).__name__}: {e}); "
                               f"re-save legacy .pth files with torch.save") from None
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.compress_size != m.file_size \
                or m.header_offset + m.file_size > size:
            raise ModelFormatError(f"{path}: archive member {m.filename!r} is compressed or "
                                   f"runs past the end of the file")


def _load_shard(torch, path):
    """{canonical name: read-only numpy view} of one consolidated.NN.pth file."""
    _check_archive(path)
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


def _merge(shards, name, dim, source):
    """Join one weight from all shards along its model-parallel axis (a copy only if > 1 shard);
    None if some shard lacks it (then it is reported as missing)."""
    parts = [s.get(name) for s in shards]
    if any(x is None for x in parts):
        return None
    if len(parts) == 1 or name.endswith("norm"):  # norms are the same in every shard
        return parts[0]
    axis = _SPLIT_AXIS.get(name.rsplit(".", 1)[-1])
    if name == "tok_embeddings":  # Llama 2 splits the embedding dim, Llama 3 the vocabulary
        axis = 0 if parts[0].shape[1:2] == (dim,) else 1
    if axis is None:
        return None  # not ours
    if any(p.ndim != 2 or p.shape[1 - axis] != parts[0].shape[1 - axis] for p in parts):
        raise ModelFormatError(f"{source}: the shards' shapes of {name} "
                               f"({[p.shape for p in parts]}) do not join along axis {axis}")
    return np.concatenate(parts, axis=axis)


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
    params_path = os.path.join(directory, "params.json")
    params = read_json(params_path)
    if missing := [k for k in ("dim", "n_layers", "n_heads") if k not in params]:
        raise ModelFormatError(f"{params_path}: missing {', '.join(missing)}")
    files = sorted(glob.glob(os.path.join(glob.escape(directory), "consolidated.*.pth")))
    if not files:
        raise ModelFormatError(f"{directory}: params.json but no consolidated.*.pth files")
    shards = [_load_shard(torch, f) for f in files]
    weights = {}
    for name in shards[0]:
        merged = _merge(shards, name, params["dim"], directory)
        if merged is not None:
            weights[name] = merged
    config = _make_config(params, params_path, weights, files[0])
    check_fits(config, len(weights), sum(map(os.path.getsize, files)), directory)
    weights = {k: weights[k] for k in expected_shapes(config) if k in weights}
    labels = {k: repr(_meta_name(k)) for k in expected_shapes(config)}
    check_weights(weights, config, directory, labels)
    return Checkpoint(config=config, weights=weights,
                      tokenizer_path=find_file(directory, ("tokenizer.model",)),
                      source=os.fspath(directory))


def _make_config(params, params_path, weights, first_file):
    """The ModelConfig of params.json; the vocabulary (when params.json leaves it to them) and
    the feed-forward size come from the embedding and the first w1."""
    embedding = weights.get("tok_embeddings")
    w1 = weights.get("layers.0.w1")
    if embedding is None or w1 is None or embedding.ndim != 2 or w1.ndim != 2:
        raise ModelFormatError(f"{first_file}: missing tok_embeddings.weight or "
                               f"layers.0.feed_forward.w1.weight (or they are not matrices)")
    vocab = params.get("vocab_size")
    if vocab is None or (isinstance(vocab, int) and vocab <= 0):  # -1: the embedding decides
        vocab = embedding.shape[0]
    return make_config(
        params_path, vocab_size=vocab, hidden_size=params["dim"], intermediate_size=w1.shape[0],
        num_layers=params["n_layers"], num_heads=params["n_heads"],
        num_kv_heads=value_or(params.get("n_kv_heads"), params["n_heads"]),
        rope_theta=params.get("rope_theta", 1e4),
        rms_norm_eps=params.get("norm_eps", 1e-5), max_seq_len=params.get("max_seq_len", 2048),
        tie_word_embeddings="output" not in weights, rope_interleaved=True,
        rope_scaling=_rope_scaling(params, params_path))


def _rope_scaling(params, params_path):
    """use_scaled_rope: Llama 3.1's frequency scaling, constants from Meta's code (or None)."""
    scaled = params.get("use_scaled_rope", False)
    if scaled not in (True, False):
        raise ModelFormatError(f"{params_path}: use_scaled_rope must be true or false, "
                               f"got {scaled!r}")
    if not scaled:
        return None
    return {"rope_type": "llama3", "factor": value_or(params.get("rope_scaling_factor"), 8.0),
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
