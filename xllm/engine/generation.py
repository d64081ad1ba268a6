"""The generation loop: one ragged prefill of every prompt, then one decode step per token for
all running sequences together.

A :class:`Sequence` is one prompt being continued: its tokens, its KV cache, its sampler, its
limit and, once it has ended, why. :func:`start_sequences` checks the prompts and prepares the
caches; :func:`run_sequences` generates. Each sequence's tokens are exactly those it gets alone
(the forward pass is batch-invariant, and each sequence samples with its own sampler and
follows its own grammar, if it has one: xllm/engine/constraints.py)."""
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ContextLengthError
from ..model.kv_cache import KVCache
from .constraints import MaskJob
from .sampling import apply_token_mask


@dataclass
class Sequence:
    """One prompt being continued.

    ``tokens[:length]`` is the sequence so far (the prompt, then what was generated);
    ``tokens`` has room for ``max_new_tokens`` more. ``finish`` is None while it runs, then
    "stop" (a stop token), "length" (max_new_tokens), "context" (the model's context is full),
    "constraint" (its grammar allows no token: a dead end) or "cancelled" (:meth:`cancel`).
    ``constraint`` is the sequence's :class:`xllm.engine.constraints.Matcher`, or None."""
    prompt_length: int
    tokens: np.ndarray
    length: int
    max_new_tokens: int
    kv: KVCache
    sampler: object
    finish: Optional[str] = None
    constraint: Optional[object] = None

    @property
    def generated(self) -> int:
        return self.length - self.prompt_length

    def cancel(self):
        """End the sequence before its next token (a caller's stop string was found, or its
        client went away)."""
        if self.finish is None:
            self.finish = "cancelled"


def start_sequences(transformer, prompts, max_new_tokens, samplers, kvs=None, constraints=None):
    """A :class:`Sequence` per prompt (a list of token ids), with `samplers[i]`, a cache and
    `constraints[i]` (a Matcher or None; `constraints` None: none for any).

    max_new_tokens is an int or one per prompt; counts past the context are clamped to it.
    `kvs` may give caches holding earlier sequences: the prefix they share with the prompt is
    reused, the rest dropped. Every cache gets room for all its sequence can need at once (no
    regrowth while generating)."""
    max_len = transformer.config.max_seq_len
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * len(prompts)
    else:
        limits = list(max_new_tokens)
    if kvs is None:
        kvs = [transformer.new_cache() for _ in prompts]
    sequences = []
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. add_bos=True)")
        if len(prompt) > max_len:
            raise ContextLengthError(f"prompt {i} has {len(prompt)} tokens; the model's context "
                                     f"is {max_len}")
        limit = min(limits[i], max_len + 1 - len(prompt))  # the last token needs no KV row
        tokens = np.zeros(len(prompt) + limit, np.int64)
        tokens[:len(prompt)] = prompt
        constraint = None if constraints is None else constraints[i]
        sequences.append(Sequence(len(prompt), tokens, len(prompt), limit, kvs[i], samplers[i],
                                  constraint=constraint))
    for sequence in sequences:
        _reuse_prefix(sequence, max_len)
    return sequences


def _reuse_prefix(sequence, max_len):
    """Keep the cache rows the prompt shares with what the cache holds, but re-feed at least
    the last prompt token (its logits are not kept); reserve every row the sequence can need."""
    kv = sequence.kv
    prompt = sequence.tokens[:sequence.prompt_length]
    kv.truncate(min(kv.common_prefix(prompt), sequence.prompt_length - 1))
    end = min(sequence.prompt_length + sequence.max_new_tokens, max_len)
    kv.reserve(end - kv.length)


def run_sequences(transformer, sequences, stop_ids, *, stats=None, vocab_limit=None):
    """Yield (index, token id) as `sequences` generate together. A sequence ends at a stop id
    (not yielded), after its max_new_tokens, at the context limit, or when the caller cancels
    it (between two of its tokens), or when its grammar allows no token. Only ids below
    `vocab_limit` (default: all) are sampled: an embedding padded past the tokenizer's
    vocabulary never yields its padding. `stats` receives counts and timings. The masks of
    constrained sequences are computed while each forward pass runs."""
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=sum(s.prompt_length for s in sequences),
                 cached_tokens=sum(s.kv.length for s in sequences),
                 generated=0, decode_steps=0, decode_seconds=0.0, finish="length")
    vocab = transformer.config.vocab_size if vocab_limit is None else vocab_limit
    logits = np.empty((len(sequences), transformer.config.vocab_size), np.float32)
    masks = MaskJob()
    running = list(range(len(sequences)))
    _start_masks(masks, [sequences[i] for i in running])
    started = time.perf_counter()
    transformer.forward_batch([s.tokens[s.kv.length:s.length] for s in sequences],
                              [s.kv for s in sequences], logits)
    stats["prefill_seconds"] = time.perf_counter() - started
    while running:
        still_running = []
        mask_rows = masks.wait()
        for row, index in enumerate(running):
            sequence = sequences[index]
            mask = mask_rows[row] if sequence.constraint is not None else None
            token = _next_token(sequence, logits[row, :vocab], stop_ids, mask)
            if token is None:
                _note_finish(stats, sequence)
                continue
            stats["generated"] += 1
            yield index, token
            _check_limits(sequence, transformer.config.max_seq_len)
            if sequence.finish is None:
                still_running.append(index)
            else:
                _note_finish(stats, sequence)
        running = still_running
        if running:
            _start_masks(masks, [sequences[i] for i in running])
            _decode_step(transformer, [sequences[i] for i in running], logits, stats)


def _start_masks(masks, sequences):
    """Start computing the masks of the constrained ones among `sequences` (row i: sequences[i])."""
    masks.start([(s.constraint, row) for row, s in enumerate(sequences)
                 if s.constraint is not None and s.finish is None])


def _next_token(sequence, logits, stop_ids, mask=None):
    """The sequence's next token, appended; None (and its finish set) if it ends instead.
    `mask`: the tokens its constraint allows (None: any)."""
    if sequence.finish is not None:
        return None
    if sequence.generated >= sequence.max_new_tokens:  # max_new_tokens=0
        sequence.finish = "length"
        return None
    if mask is not None and apply_token_mask(logits, mask) == 0:
        sequence.finish = "constraint"
        return None
    token = sequence.sampler(logits, sequence.tokens[:sequence.length])
    if sequence.constraint is not None and not sequence.constraint.accept(token):
        sequence.finish = "constraint"
        return None
    if token in stop_ids:
        sequence.finish = "stop"
        return None
    sequence.tokens[sequence.length] = token
    sequence.length += 1
    return token


def _check_limits(sequence, max_len):
    if sequence.finish is not None:
        return
    if sequence.length > max_len:
        sequence.finish = "context"
    elif sequence.generated >= sequence.max_new_tokens:
        sequence.finish = "length"


def _note_finish(stats, sequence):
    # stats["finish"]: why the last sequence to end ended ("length" unless one ended otherwise)
    if sequence.finish in ("stop", "context", "constraint"):
        stats["finish"] = sequence.finish


def _decode_step(transformer, sequences, logits, stats):
    """One forward pass of each sequence's last token; row i of logits gets sequences[i]'s."""
    started = time.perf_counter()
    transformer.forward_batch([s.tokens[s.length - 1:s.length] for s in sequences],
                              [s.kv for s in sequences], logits)
    stats["decode_seconds"] += time.perf_counter() - started
    stats["decode_steps"] += 1


def generate_ids(transformer, prompts, max_new_tokens, samplers, stop_ids, *, kvs=None,
                 stats=None, vocab_limit=None, constraints=None):
    """Yield (index, token id) of generating `prompts` together (see :func:`start_sequences`
    and :func:`run_sequences`): the loop for callers that need no handle on the sequences."""
    sequences = start_sequences(transformer, prompts, max_new_tokens, samplers, kvs,
                                constraints)
    yield from run_sequences(transformer, sequences, stop_ids, stats=stats,
                             vocab_limit=vocab_limit)
