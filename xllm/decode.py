"""The generation loop: prefill, then one decode step per token; sampling, stop strings.

(Not in xllm/generate.py, the command line, so that ``python -m xllm.generate`` does not import
its own module twice.)"""
import math
import numbers
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _kernels
from .errors import ContextLengthError


def check_count(name, value, minimum=0):
    """`value` as an int if it is an integer (Python or NumPy, not bool) >= minimum; TypeError
    for other types (floats included: 2.5 tokens mean nothing), ValueError below minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name, value):
    """`value` as a float if it is a finite real number (not bool); TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


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
        self.p, self.rng = params, np.random.default_rng(params.seed)

    def __call__(self, logits, history):
        """Choose a token from logits [V] (modified in place by the repetition penalty)."""
        K, p = _kernels.backend, self.p
        if p.repetition_penalty != 1.0 and len(history):
            K.apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.temperature == 0:
            return K.argmax(logits)
        return K.sample(logits, p.temperature, p.top_k, p.top_p, p.min_p, self.rng.random())


def generate_ids(transformer, prompts, max_new_tokens, samplers, stop_ids, *, kvs=None,
                 stats=None, stopped=(), vocab_limit=None):
    """Yield (index, token id) for the prompts generated together: one ragged prefill, then one
    decode step per token for every running sequence, each with its own sampler. A sequence
    leaves (dropping its cache) at a stop id (not yielded), after its max_new_tokens (an int or
    one per prompt; counts past the context are clamped to it), at the context limit, or when
    the caller adds its index to `stopped`. Its tokens are exactly those it gets alone. `kvs`
    may give caches holding earlier sequences (their common prefix with the prompt is reused);
    `stats` receives counts and timings. Only ids below `vocab_limit` (default: all) are
    sampled: an embedding padded past the tokenizer's vocabulary never yields its padding."""
    n, max_len = len(prompts), transformer.config.max_seq_len
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. add_bos=True)")
        if len(ids) > max_len:
            raise ContextLengthError(f"prompt {i} has {len(ids)} tokens; the model's context "
                                     f"is {max_len}")
        limits[i] = min(limits[i], max_len + 1 - len(ids))  # the last token needs no KV row
    vocab = transformer.config.vocab_size if vocab_limit is None else vocab_limit
    hist = [np.zeros(len(p) + m, np.int64) for p, m in zip(prompts, limits)]
    kvs = list(kvs) if kvs is not None else [transformer.new_cache() for _ in prompts]
    for h, p, m, kv in zip(hist, prompts, limits, kvs):
        h[:len(p)] = p
        # re-feed at least the last prompt token (its logits are not kept); then reserve all
        # the rows the sequence can need at once (no regrowth)
        kv.truncate(min(kv.common_prefix(p), len(p) - 1))
        kv.reserve(min(len(p) + m, max_len) - kv.length)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=sum(map(len, prompts)), cached_tokens=sum(k.length for k in kvs),
                 generated=0, decode_steps=0, decode_seconds=0.0, finish="length")
    lens, live = [len(p) for p in prompts], list(range(n))
    logits = np.empty((n, transformer.config.vocab_size), np.float32)
    t = time.perf_counter()
    transformer.forward_batch([h[k.length:m] for h, k, m in zip(hist, kvs, lens)], kvs, logits)
    stats["prefill_seconds"] = time.perf_counter() - t
    while live:
        still = []
        for row, i in enumerate(live):
            if lens[i] - len(prompts[i]) >= limits[i] or i in stopped:
                continue
            token = samplers[i](logits[row, :vocab], hist[i][:lens[i]])
            if token in stop_ids:
                stats["finish"] = "stop"
                continue
            hist[i][lens[i]] = token
            lens[i] += 1
            stats["generated"] += 1
            yield i, token
            if lens[i] > max_len:
                stats["finish"] = "context"
            elif lens[i] - len(prompts[i]) < limits[i]:
                still.append(i)
        live = still
        if live:
            t = time.perf_counter()
            transformer.forward_batch([hist[i][lens[i] - 1:lens[i]] for i in live],
                                      [kvs[i] for i in live], logits)
            stats["decode_seconds"] += time.perf_counter() - t
            stats["decode_steps"] += 1


class StopFilter:
    """Cuts a stream of text pieces before the first stop string, never emitting part of one:
    text that could be the beginning of a stop string is held back until it is known not to be.

    The stop strings form an Aho-Corasick automaton, built once; each character of a piece
    advances it (amortized O(1)), so a push costs O(len(piece) + the text held back), however
    long or many the stop strings are. The automaton's node after the text seen so far is the
    longest end of that text that begins some stop string: the text to hold back."""

    def __init__(self, stop):
        self.stop, self.pending, self.done = [s for s in stop if s], "", False
        # Node 0 is the empty string. _goto maps node << 21 | code point to the child node;
        # _depth is a node's length; _fail is the node of its longest proper end that is also a
        # node; _found is the length of the longest stop string it ends with (0: none).
        goto = {}
        depth = [0]
        parent = [0]
        code = [0]
        is_stop = [False]
        for s in self.stop:
            node = 0
            for c in map(ord, s):
                if (child := goto.get(node << 21 | c)) is None:
                    child = goto[node << 21 | c] = len(depth)
                    depth.append(depth[node] + 1)
                    parent.append(node)
                    code.append(c)
                    is_stop.append(False)
                node = child
            is_stop[node] = True
        fail, found = [0] * len(depth), [0] * len(depth)
        self._goto, self._depth, self._fail, self._found, self._node = goto, depth, fail, found, 0
        for node in sorted(range(1, len(depth)), key=depth.__getitem__):  # shorter nodes first
            if parent[node]:  # a longer node's fail link follows its parent's
                fail[node] = self._advance(fail[parent[node]], code[node])
            found[node] = depth[node] if is_stop[node] else found[fail[node]]

    def _advance(self, node, code):
        """The node after `node` followed by the character `code`."""
        while (child := self._goto.get(node << 21 | code)) is None and node:
            node = self._fail[node]
        return child or 0

    def push(self, piece):
        """The text that can be emitted now ("" once a stop string was seen)."""
        if self.done or not self.stop:
            return "" if self.done else piece
        text = self.pending + piece
        node = self._node
        found = self._found
        cut = None
        end = len(self.pending)
        for c in piece:
            node = self._advance(node, ord(c))
            end += 1
            if found[node] and (cut is None or end - found[node] < cut):
                cut = end - found[node]  # the earliest start of a stop string seen
        if cut is not None:
            self.done, self.pending = True, ""
            return text[:cut]
        self._node, hold = node, self._depth[node]
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self):
        out, self.pending = self.pending, ""
        return out
