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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        self.temperature = check_real("temperature", self.temperature)
        self.top_p = check_real("top_p", self.top_p)
        self.min_p = check_real("min_p", self.min_p)
        self.repetition_penalty = check_real("repetition_penalty", self.repetition_penalty)
        self.presence_penalty = check_real("presence_penalty", self.presence_penalty)
        self.frequency_penalty = check_real("frequency_penalty", self.frequency_penalty)
        self.top_k = check_count("top_k", self.top_k)
        if self.seed is not None:
            self.seed = check_count("seed", self.seed)
        for name, ok, rule in (("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
                               ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                               ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0,
                                "in [-2, 2]"),
                               ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0,
                                "in [-2, 2]")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


class Sampler:
    """Picks tokens from logits; the same seed gives the same choices."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits, history, generated=None):
        """Choose a token from logits [V] (modified in place by the penalties). `history` is
        the whole sequence (the repetition penalty looks at it); `generated` the tokens
        generated so far (the presence and frequency penalties look at them, as OpenAI's do)."""
        kernels = _kernels.backend
        p = self.params
        if p.repetition_penalty != 1.0 and len(history):
            kernels.apply_repetition_penalty(logits, history, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated is not None \
                and len(generated):
            apply_presence_frequency(logits, generated, p.presence_penalty, p.frequency_penalty)
        if p.temperature == 0:
            return kernels.argmax(logits)
        return kernels.sample(logits, p.temperature, p.top_k, p.top_p, p.min_p,
                              self.rng.random())


def apply_token_mask(logits, mask) -> int:
    """Give every token that `mask` forbids a logit of -inf, in place; return how many tokens
    it allows. `mask` holds 32-bit words (int32), bit ``t % 32`` of word ``t // 32`` set when
    token ``t`` is allowed (llguidance's layout; see xllm/engine/constraints.py); it covers at
    least ``len(logits)`` tokens. Nothing is drawn at random: masking keeps determinism."""
    allowed = np.unpackbits(mask.view(np.uint8), count=logits.size, bitorder="little")
    allowed = allowed.view(bool)
    np.copyto(logits, -np.inf, where=~allowed)
    return int(np.count_nonzero(allowed))


def apply_presence_frequency(logits, generated, presence, frequency):
    """OpenAI's penalties: logits[t] -= presence + frequency * count(t), for each token t that
    occurs `count(t)` > 0 times in `generated`."""
    tokens, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    penalty = (presence + frequency * counts).astype(np.float32)
    logits[tokens] -= penalty


def log_softmax_top(logits, token, top_n):
    """(log-probability of `token`, [(id, log-probability)] of the `top_n` most likely ids,
    descending, ties by lower id) under the softmax of `logits` [V] (raw: before temperature
    and penalties). Computed in float64."""
    z = logits.astype(np.float64)
    peak = z.max()
    log_total = peak + np.log(np.exp(z - peak).sum())
    top = []
    if top_n > 0:
        # every id at least as likely as the n-th (ties at that place included), then sorted
        nth = np.partition(z, z.size - min(top_n, z.size))[z.size - min(top_n, z.size)]
        candidates = np.flatnonzero(z >= nth)
        order = np.lexsort((candidates, -z[candidates]))[:top_n]
        top = [(int(candidates[i]), float(z[candidates[i]] - log_total)) for i in order]
    return float(z[token] - log_total), top
