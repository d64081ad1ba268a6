"""The generation loop: prefill, then one decode step per token for every running sequence."""
import time

import numpy as np

from ..errors import ContextLengthError


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
