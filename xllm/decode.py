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
    kv.reserve(min(n_prompt + max_new_tokens, max_len) - kv.length)  # all it can need, at once
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


def generate_batch_ids(transformer, prompts, max_new_tokens, samplers, stop_ids, stopped=()):
    """Yield (index, token id) for several prompts generated together: one ragged prefill of
    all prompts, then one decode step per token for all sequences still running, each sampled
    by its own sampler. A sequence leaves the batch (and its cache is freed) at a stop id, its
    max_new_tokens (an int, or one per prompt) or the context limit; its tokens are exactly
    those it gets alone (forward_batch is bitwise batch-invariant). The caller may add indices
    to the set `stopped` (a stop string seen) to make those sequences leave too."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    max_len = transformer.config.max_seq_len
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. add_bos=True)")
        if len(ids) > max_len:
            raise ContextLengthError(f"prompt {i} has {len(ids)} tokens; the model's context "
                                     f"is {max_len}")
    hist = [np.zeros(len(p) + m, np.int64) for p, m in zip(prompts, limits)]
    for h, p in zip(hist, prompts):
        h[:len(p)] = p
    lens = [len(p) for p in prompts]
    kvs = [transformer.new_cache() for _ in prompts]
    for kv, p, m in zip(kvs, prompts, limits):  # exactly the rows it can need: no regrowth
        kv.reserve(min(len(p) + m, max_len))
    logits = np.empty((n, transformer.config.vocab_size), np.float32)
    live = [i for i in range(n) if limits[i] > 0]
    transformer.forward_batch([prompts[i] for i in live], [kvs[i] for i in live], logits)
    while live:
        still = []
        for row, i in enumerate(live):
            token = None if i in stopped else samplers[i](logits[row], hist[i][:lens[i]])
            if token is None or token in stop_ids:
                kvs[i] = None
                continue
            hist[i][lens[i]] = token
            lens[i] += 1
            yield i, token
            if lens[i] - len(prompts[i]) >= limits[i] or lens[i] >= max_len:
                kvs[i] = None
            else:
                still.append(i)
        live = still
        if live:
            transformer.forward_batch([hist[i][lens[i] - 1:lens[i]] for i in live],
                                      [kvs[i] for i in live], logits)


class StopFilter:
    """Cuts a stream of text pieces before the first stop string, never emitting part of one:
    text that could be the beginning of a stop string is held back until it is known not to be."""

    def __init__(self, stop):
        self.stop, self.pending, self.done = [s for s in stop if s], "", False

    def push(self, piece):
        """The text that can be emitted now ("" once a stop string was seen)."""
        if self.done or not self.stop:
            return "" if self.done else piece
        p = self.pending + piece
        hits = [i for i in (p.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.done, self.pending = True, ""
            return p[:min(hits)]
        hold = max((k for s in self.stop for k in range(1, len(s)) if p.endswith(s[:k])),
                   default=0)
        self.pending = p[len(p) - hold:]
        return p[:len(p) - hold]

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def stream_text(pieces, stop):
    """Yield text from `pieces`, cut before the first stop string (see StopFilter)."""
    f = StopFilter(stop)
    for piece in pieces:
        text = f.push(piece)
        if text:
            yield text
        if f.done:
            return
    text = f.flush()
    if text:
        yield text
