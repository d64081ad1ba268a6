"""ModelConfig: the shape of a Llama-family model (Llama, Mistral, Qwen2, Qwen3), whatever file
it came from."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ModelFormatError


# Inclusive [low, high] of the integer fields: generous for real models (a 1T-parameter model
# has ~16k hidden units, ~150 layers, a 256k vocabulary), small enough that nothing absurd is
# allocated from a hostile file. The loaders also check the config against the file's size.
LIMITS = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17),
          "intermediate_size": (1, 1 << 20), "num_layers": (1, 1 << 12), "num_heads": (1, 1 << 12),
          "num_kv_heads": (1, 1 << 12), "head_dim": (1, 1 << 12), "max_seq_len": (1, 1 << 24)}
MAX_WIDTH = 1 << 18  # num_heads * head_dim
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _is_int(v) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_float(source, name, v, low, high) -> None:
    """ModelFormatError unless `v` is a real number with low < v <= high."""
    number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    if not number or not low < v <= high:  # NaN fails the comparison
        raise ModelFormatError(f"{source}: {name} must be a number in ({low:g}, {high:g}], "
                               f"got {v!r}")


def _check_rope_scaling(source, s) -> None:
    """ModelFormatError unless `s` is None, {"rope_type": "default"} or Llama 3 scaling with a
    positive factor, 0 < low_freq_factor < high_freq_factor and a positive original context."""
    if s is None:
        return
    if not isinstance(s, dict):
        raise ModelFormatError(f"{source}: rope_scaling must be an object, got {s!r}")
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return
    if kind != "llama3":
        raise ModelFormatError(f"{source}: rope_scaling type {kind!r} is not supported")
    s = {**LLAMA3_DEFAULTS, **s}
    if "factor" not in s:
        raise ModelFormatError(f"{source}: llama3 rope_scaling needs factor")
    _check_float(source, "rope_scaling.factor", s["factor"], 0.0, 1e6)
    _check_float(source, "rope_scaling.low_freq_factor", s["low_freq_factor"], 0.0, 1e6)
    _check_float(source, "rope_scaling.high_freq_factor", s["high_freq_factor"],
                 s["low_freq_factor"], 1e6)
    old = s["original_max_position_embeddings"]
    if not _is_int(old) or not 0 < old <= LIMITS["max_seq_len"][1]:
        raise ModelFormatError(f"{source}: rope_scaling.original_max_position_embeddings must be "
                               f"a positive integer, got {old!r}")


def _check_window(source, window, context) -> None:
    """ModelFormatError unless `window` is None or a positive integer no larger than the
    context (a window past the context would be a misread file, or one for another context)."""
    if window is None:
        return
    if not _is_int(window) or window < 1:
        raise ModelFormatError(f"{source}: sliding_window must be a positive integer or null, "
                               f"got {window!r}")
    if window > context:
        raise ModelFormatError(f"{source}: sliding_window={window} is larger than the context "
                               f"(max_seq_len={context})")


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family model.

    ``rope_interleaved`` records the q/k row layout of the checkpoint: True for adjacent pairs
    (Meta, llama2.c, GGUF ``llama``), False for Hugging Face "rotate_half" (and GGUF ``qwen2``,
    ``qwen3``). The RoPE kernel follows it, so weights are never permuted (or copied) at load.

    Three switches describe the architectures beside Llama; the forward pass reads them:
    ``attention_bias``: the q, k and v projections add a bias (Qwen2); ``qk_norm``: queries and
    keys go through an RMSNorm per head (weights of head_dim) before RoPE (Qwen3);
    ``sliding_window``: each position attends to itself and the sliding_window - 1 before it
    only, and the KV cache drops what falls out of the window (Mistral); None: no window.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0                     # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_seq_len: int = 2048
    rope_interleaved: bool = False
    rope_scaling: Optional[dict] = None   # Llama 3.1 style {"rope_type": "llama3", ...}
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    extra_eos_token_ids: tuple = field(default_factory=tuple)
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self, source="config"):
        """Raise ModelFormatError naming `source` and the field unless every value is of the
        right type and within what a real model could have (see LIMITS); fills in head_dim."""
        for name, (low, high) in LIMITS.items():
            v = getattr(self, name)
            if name == "head_dim" and v == 0 and _is_int(v):
                continue  # derived below
            if not _is_int(v) or not low <= v <= high:
                raise ModelFormatError(f"{source}: {name} must be an integer in [{low}, {high}], "
                                       f"got {v!r}")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
            if self.head_dim == 0:
                raise ModelFormatError(f"{source}: hidden_size={self.hidden_size} is smaller "
                                       f"than num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(f"{source}: num_heads={self.num_heads} is not a multiple of "
                                   f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelFormatError(f"{source}: head_dim={self.head_dim} must be even for RoPE")
        if self.q_dim > MAX_WIDTH:
            raise ModelFormatError(f"{source}: num_heads * head_dim = {self.q_dim} is more than "
                                   f"{MAX_WIDTH}")
        _check_float(source, "rope_theta", self.rope_theta, 1.0, 1e15)
        _check_float(source, "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        self.rope_theta = float(self.rope_theta)
        self.rms_norm_eps = float(self.rms_norm_eps)
        for name in ("tie_word_embeddings", "rope_interleaved", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ModelFormatError(f"{source}: {name} must be true or false, "
                                       f"got {getattr(self, name)!r}")
        _check_rope_scaling(source, self.rope_scaling)
        _check_window(source, self.sliding_window, self.max_seq_len)
        if not isinstance(self.extra_eos_token_ids, tuple):
            raise ModelFormatError(f"{source}: extra_eos_token_ids must be a tuple, "
                                   f"got {self.extra_eos_token_ids!r}")
        ids = [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)]
        ids += [("eos_token_id", e) for e in self.extra_eos_token_ids]
        for name, v in ids:
            if v is not None and not (_is_int(v) and 0 <= v < self.vocab_size):
                raise ModelFormatError(f"{source}: {name} must be a token id in [0, "
                                       f"{self.vocab_size}) (the vocabulary), got {v!r}")

    @property
    def architecture(self) -> str:
        """The GGUF name of the architecture the switches describe: "qwen3" (q/k norms),
        "qwen2" (q/k/v biases) or "llama" (Llama and Mistral)."""
        if self.qk_norm:
            return "qwen3"
        if self.attention_bias:
            return "qwen2"
        return "llama"

    @property
    def q_dim(self) -> int:
        """Width of the query projection: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2], float32, with Llama 3 scaling if configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type"))
        if kind == "llama3":
            s = {**LLAMA3_DEFAULTS, **s}
            factor = s["factor"]
            lo = s["low_freq_factor"]
            hi = s["high_freq_factor"]
            old = s["original_max_position_embeddings"]
            wavelen = 2 * np.pi / inv
            smooth = (old / wavelen - lo) / (hi - lo)
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            mid = (wavelen <= old / lo) & (wavelen >= old / hi)
            inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        elif kind not in (None, "default"):
            raise ModelFormatError(f"rope_scaling type {kind!r} is not supported")
        return inv.astype(np.float32)


# Shapes the tools can build random models of (tools/benchmark.py --random NAME).
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                         max_seq_len=8192, bos_token_id=1, eos_token_id=2),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=22, num_heads=32, num_kv_heads=4, max_seq_len=2048),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, max_seq_len=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                 num_heads=8, num_kv_heads=4, max_seq_len=512),
}
