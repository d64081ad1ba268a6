"""Hugging Face checkpoints of the Llama family (``model_type`` llama, mistral, qwen2, qwen3):
config.json plus model.safetensors, or shards listed in model.safetensors.index.json. Weights
stay in HF's q/k row order (rotate_half RoPE), so ``rope_interleaved=False``."""
import os
import re
from pathlib import Path

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..files.common import read_json
from ..files.safetensors import as_array, read_safetensors
from ..model.weights import check_weights, expected_shapes
from .checkpoint import Checkpoint, check_fits, find_file, make_config, name_in_file, value_or

_TOP = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
        "lm_head.weight": "output"}
_LAYER = {"input_layernorm.weight": "attention_norm", "self_attn.q_proj.weight": "wq",
          "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
          "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "ffn_norm",
          "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3",
          # qwen2
          "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
          "self_attn.v_proj.bias": "bv",
          # qwen3
          "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def canonical_name(hf_name):
    """Canonical xllm name of a HF tensor name, or None for tensors xllm does not use."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    if (m := _LAYER_RE.fullmatch(hf_name)) and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _hf_name(canonical):
    return name_in_file(canonical, _TOP, _LAYER, "model.layers.{i}.{name}")


def _object(raw, key, path):
    """raw[key] if it is a JSON object, {} if absent or null; else ModelFormatError."""
    value = raw.get(key)
    if value is not None and not isinstance(value, dict):
        raise ModelFormatError(f"{path}: {key} must be an object, got {value!r}")
    return value or {}


def _token_ids(value, key, path):
    """A token id or a list of them (as HF allows for eos_token_id) as a list; the ids are
    range-checked by ModelConfig."""
    ids = value if isinstance(value, list) else [] if value is None else [value]
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelFormatError(f"{path}: {key} must be a token id or a list of them, "
                                   f"got {value!r}")
    return ids


# model_type -> the switches of ModelConfig it sets (qwen2's q/k/v biases are always there)
_ARCHITECTURES = {"llama": {}, "mistral": {}, "qwen2": {"attention_bias": True},
                  "qwen3": {"qk_norm": True}}


def _sliding_window(raw, path):
    """The sliding window config.json sets (None for none). Mistral: "sliding_window". Qwen2
    and Qwen3 only with "use_sliding_window", and then only on layers from
    "max_window_layers" on: all of them, or none, is supported."""
    kind = raw["model_type"]
    if kind == "llama":
        return None
    window = raw.get("sliding_window")
    if kind == "mistral" or window is None:
        return window
    if not raw.get("use_sliding_window", False):
        return None
    first = value_or(raw.get("max_window_layers"), 0)
    layers = raw["num_hidden_layers"]
    if first == 0:
        return window
    if isinstance(first, int) and isinstance(layers, int) and first >= layers:
        return None
    raise ModelFormatError(f"{path}: use_sliding_window with max_window_layers={first!r} of "
                           f"{layers!r} layers (a window on some layers only) is not supported")


def read_config(directory) -> ModelConfig:
    """ModelConfig from a HF directory's config.json (transformers 4.x or 5.x layout), with
    extra end-of-sequence ids from generation_config.json if present."""
    path = os.path.join(directory, "config.json")
    raw = read_json(path)
    kind = raw.get("model_type")
    if kind not in _ARCHITECTURES:
        raise ModelFormatError(f"{path}: model_type {kind!r} is not supported; xllm loads "
                               f"{', '.join(map(repr, _ARCHITECTURES))} checkpoints")
    if raw.get("attention_bias") or raw.get("mlp_bias") or raw.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{path}: attention_bias, mlp_bias or a hidden_act other than silu "
                               f"are not supported")
    if missing := [k for k in _REQUIRED if k not in raw]:
        raise ModelFormatError(f"{path}: missing {', '.join(missing)}")
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = _object(raw, "rope_parameters", path) or _object(raw, "rope_scaling", path)
    scaling = _rope_scaling(rope, path)
    eos = _eos_ids(raw, directory, path)
    return make_config(
        path, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], head_dim=value_or(raw.get("head_dim"), 0),
        num_kv_heads=value_or(raw.get("num_key_value_heads"), raw["num_attention_heads"]),
        rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        max_seq_len=raw.get("max_position_embeddings", 2048), rope_interleaved=False,
        rope_scaling=scaling, bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if eos else None, extra_eos_token_ids=tuple(eos[1:]),
        sliding_window=_sliding_window(raw, path), **_ARCHITECTURES[kind])


def _rope_scaling(rope, path):
    """The Llama 3 rope_scaling of the RoPE settings `rope`, None for the default RoPE."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelFormatError(f"{path}: rope scaling type {kind!r} is not supported")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if any(k not in rope for k in keys):
        raise ModelFormatError(f"{path}: llama3 rope scaling needs {', '.join(keys)}")
    return {"rope_type": "llama3", **{k: rope[k] for k in keys}}


def _eos_ids(raw, directory, path):
    """The end-of-sequence ids of config.json (`raw`, read from `path`) and, after them,
    generation_config.json's, in order, without repeats."""
    generation_path = os.path.join(directory, "generation_config.json")
    generation = read_json(generation_path) if os.path.isfile(generation_path) else {}
    eos = (_token_ids(raw.get("eos_token_id"), "eos_token_id", path)
           + _token_ids(generation.get("eos_token_id"), "eos_token_id", generation_path))
    return list(dict.fromkeys(eos))


def _shard_path(directory, fname, index):
    """The path of shard `fname` named by `index`: a file inside `directory` (symlinks
    resolved), else ModelFormatError."""
    if not isinstance(fname, str) or not fname:
        raise ModelFormatError(f"{index}: weight_map values must be file names, got {fname!r}")
    root = os.path.realpath(directory)
    fpath = os.path.realpath(os.path.join(directory, fname))
    if os.path.commonpath([root, fpath]) != root:
        raise ModelFormatError(f"{index}: weight_map names {fname!r}, which is outside the "
                               f"model directory {directory}; refused")
    if not os.path.exists(fpath):
        raise ModelFormatError(f"{index}: lists shard {fname}, which does not exist")
    return fpath


def load_hf(directory) -> Checkpoint:
    """Load a HF Llama-family checkpoint directory; tensors are read-only views of the mapped
    files."""
    config = read_config(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no weight_map")
        files = [_shard_path(directory, f, index) for f in weight_map.values()]
        files = sorted(set(files))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = [os.path.join(directory, "model.safetensors")]
    else:
        raise ModelFormatError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                               f"(only safetensors checkpoints are supported)")
    entries = {fpath: read_safetensors(fpath) for fpath in files}
    check_fits(config, sum(map(len, entries.values())), sum(map(os.path.getsize, files)),
               directory)
    weights = {}
    names = {}
    for fpath, tensors in entries.items():
        fname = os.path.relpath(fpath, os.path.realpath(directory))
        for key, entry in tensors.items():
            if (canon := canonical_name(key)) is not None:
                weights[canon] = as_array(entry, key, fpath)
                names[canon] = f"{key!r} in {fname}"
    # transformers omits lm_head.weight when it is tied; treat a missing one as tied.
    if config.tie_word_embeddings or "output" not in weights:
        config.tie_word_embeddings = True
        weights.pop("output", None)
    for canon in expected_shapes(config):
        names.setdefault(canon, repr(_hf_name(canon)))
    check_weights(weights, config, directory, names)
    tok = find_file(directory, ("tokenizer.model", "tokenizer.json"))
    return Checkpoint(config=config, weights=weights, tokenizer_path=tok,
                      source=os.fspath(directory), chat_template=read_chat_template(directory))


def read_chat_template(directory):
    """The chat template: chat_template.jinja (transformers 5) or tokenizer_config.json's
    "chat_template" (a string, or a list of named templates: "default" is used), else None."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            return Path(jinja).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{jinja}: cannot read the chat template ({e})") from None
    path = os.path.join(directory, "tokenizer_config.json")
    t = read_json(path).get("chat_template") if os.path.isfile(path) else None
    if isinstance(t, list):
        named = (d for d in t if isinstance(d, dict) and d.get("name") == "default")
        t = next((d.get("template") for d in named), None)
    return t if isinstance(t, str) else None
