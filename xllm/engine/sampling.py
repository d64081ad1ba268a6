"""How the next token is chosen: SamplingParams (checked) and the Sampler that applies them."""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import _kernels
from ..checks import check_count, check_real


@dataclass
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        self.temperature = check_real("temperature", self.temperature)
        self.top_p = check_real("top_p", self.top_p)
        self.min_p = check_real("min_p", self.min_p)
        self.repetition_penalty = check_real("repetition_penalty", self.repetition_penalty)
        self.top_k = check_count("top_k", self.top_k)
        if self.seed is not None:
            self.seed = check_count("seed", self.seed)
        for name, ok, rule in (("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
                               ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


class Sampler:
    """Picks tokens from logits; the same seed gives the same choices."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits, history):
        """Choose a token from logits [V] (modified in place by the repetition penalty)."""
        kernels = _kernels.backend
        p = self.params
        if p.repetition_penalty != 1.0 and len(history):
            kernels.apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.temperature == 0:
            return kernels.argmax(logits)
        return kernels.sample(logits, p.temperature, p.top_k, p.top_p, p.min_p,
                              self.rng.random())
