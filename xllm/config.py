"""ModelConfig: the shape of a Llama-architecture model, whatever file it came from."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ModelFormatError


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family model.

    ``rope_interleaved`` records the q/k row layout of the checkpoint: True for adjacent pairs
    (Meta, llama2.c, GGUF), False for Hugging Face "rotate_half". The RoPE kernel follows it, so
    weights are never permuted (or copied) at load.
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

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        self.validate()

    def validate(self, source="config"):
        """Raise ModelFormatError naming `source` if the numbers cannot describe a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ModelFormatError(f"{source}: {name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(f"{source}: num_heads={self.num_heads} is not a multiple of "
                                   f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelFormatError(f"{source}: head_dim={self.head_dim} must be even for RoPE")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ModelFormatError(f"{source}: rms_norm_eps and rope_theta must be positive")

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
            factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
            old = s.get("original_max_position_embeddings", 8192)
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
