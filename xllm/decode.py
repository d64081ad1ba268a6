"""The generation loop: prefill, then one decode step per token; sampling, stop strings.

(The command line lives in xllm/generate.py; this module is separate so that
``python -m xllm.generate`` does not import its own module twice.)
"""
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _kernels
from .errors import ContextLengthError


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
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Picks tokens from logits; the same seed gives the same choices."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits, history):
        """Choose a token from logits [V] (modified in place by the repetition penalty)."""
        K, p = _kernels.backend, self.p
        if p.repetition_penalty != 1.0 and len(history):
            K.apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.temperature == 0:
            return K.argmax(logits)
        return K.sample(logits, p.temperature, p.top_k, p.top_p, p.min_p, self.rng.random())


def generate_ids(transformer, prompt_ids, max_new_tokens, sampler, stop_ids, stats, kv=None):
    """Yield generated token ids: prefill the prompt, then one decode step per token.

    With `kv` (a cache holding an earlier sequence), the longest prefix it shares with the prompt
    is reused and only the rest is prefilled. Stops at a token in stop_ids (not yielded), after
    max_new_tokens, or when the context is full. `stats` (a dict) receives timings and the
    reason for stopping.
    """
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. add_bos=True)")
    max_len = transformer.config.max_seq_len
    if n_prompt > max_len:
        raise ContextLengthError(f"the prompt has {n_prompt} tokens; the model's context is "
                                 f"{max_len}")
    history = np.zeros(n_prompt + max_new_tokens, np.int64)  # for the repetition penalty
    history[:n_prompt] = prompt_ids
    if kv is None:
        kv = transformer.new_cache()
    # Re-feed at least the last prompt token: its logits are not kept.
    kv.truncate(min(kv.common_prefix(prompt_ids), n_prompt - 1))
    stats.update(prompt_tokens=n_prompt, cached_tokens=kv.length, generated=0, decode_steps=0,
                 decode_seconds=0.0, finish="length")
    t = time.perf_counter()
    logits = transformer.forward(history[kv.length:n_prompt], kv)
    stats["prefill_seconds"] = time.perf_counter() - t
    n = n_prompt
    while n - n_prompt < max_new_tokens:
        token = sampler(logits, history[:n])
        if token in stop_ids:
            stats["finish"] = "stop"
            return
        history[n] = token
        n += 1
        stats["generated"] += 1
        yield token
        if n - n_prompt >= max_new_tokens:
            return
        if kv.length >= max_len:
            stats["finish"] = "context"
            return
        t = time.perf_counter()
        logits = transformer.forward(history[n - 1:n], kv)
        stats["decode_seconds"] += time.perf_counter() - t
        stats["decode_steps"] += 1


def stream_text(pieces, stop):
    """Yield text from `pieces`, cut before the first stop string, never printing part of one.

    Text that could be the beginning of a stop string is held back until it is known not to be.
    """
    stop = [s for s in stop if s]
    if not stop:
        yield from (p for p in pieces if p)
        return
    pending = ""
    for piece in pieces:
        pending += piece
        hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
        if hits:
            if min(hits):
                yield pending[:min(hits)]
            return
        hold = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])),
                   default=0)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending
