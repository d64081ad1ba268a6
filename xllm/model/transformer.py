"""The Llama forward pass, composed in Python from the compiled kernels.

Shapes below: R = rows processed at once (prompt chunk or 1 for decode), D = hidden_size,
Q = num_heads*head_dim, KV = num_kv_heads*head_dim, F = intermediate_size, V = vocab_size."""
import os
import threading
import time
from contextlib import contextmanager

import numpy as np

from .. import _kernels
from .._kernels.layout import to_float32
from ..config import ModelConfig
from ..formats.dispatch import ops
from .batcher import StepBatcher
from .governor import ThreadGovernor
from .kv_cache import KVCache
from .rope import rope_tables
from .weights import check_weights

# Kernel work runs one forward pass at a time in a process, whatever model and thread it comes
# from: each pass already uses all the kernel threads, so N callers x T threads would only
# oversubscribe the cores (and OpenMP threads spinning at barriers for a descheduled peer make
# that collapse, not just slow down). The pass holding this lock owns its model's Workspace.
_KERNEL_LOCK = threading.Lock()


class Layer:
    """One transformer block's weights (as loaded: fp32, fp16 or bf16, often memory-mapped)."""
    __slots__ = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")

    def __init__(self, weights, i):
        for name in self.__slots__:
            setattr(self, name, weights[f"layers.{i}.{name}"])
        self.attention_norm, self.ffn_norm = _f32(self.attention_norm), _f32(self.ffn_norm)


def _f32(norm_weight):
    # Norm weights are tiny: keep them as float32 whatever the checkpoint stores.
    return np.ascontiguousarray(to_float32(norm_weight))


class Workspace:
    """Every activation buffer of the forward pass, allocated once for up to `rows` tokens."""

    def __init__(self, config: ModelConfig, rows: int):
        c, f32, self.rows = config, np.float32, rows
        d, q, kv, f = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size
        self.x, self.xn = np.zeros((rows, d), f32), np.zeros((rows, d), f32)  # [R, D] x, normed
        self.q, self.attn = np.zeros((rows, q), f32), np.zeros((rows, q), f32)  # [R, Q] q, output
        self.kn, self.vn = np.zeros((rows, kv), f32), np.zeros((rows, kv), f32)  # [R, KV] new k, v
        # [R, F] w1 x (then silu(w1 x) * w3 x) and w3 x
        self.gate, self.up = np.zeros((rows, f), f32), np.zeros((rows, f), f32)
        self.tokens = np.zeros(rows, np.int64)                     # [R] token ids
        self.positions = np.zeros(rows, np.int64)                  # [R] their positions
        self.arange = np.arange(rows, dtype=np.int64)              # [R] 0..R-1
        self.bounds = np.zeros(rows + 1, np.int64)                 # [S+1] each sequence's rows
        self.starts = np.zeros(rows, np.int64)                     # [S] its keys cached before

    @property
    def nbytes(self):
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


class Transformer:
    """Llama weights plus the forward pass. ``forward`` serves prefill and decode alike."""

    def __init__(self, config: ModelConfig, weights: dict, *, max_batch_rows=512,
                 kv_dtype="float16", threads=None):
        c = self.config = config
        self.kv_dtype = np.dtype(kv_dtype)
        if self.kv_dtype not in (np.float32, np.float16):
            raise ValueError(f"kv_dtype must be float32 or float16, got {kv_dtype!r}")
        check_weights(weights, c, "weights")
        self.tok_embeddings, self.norm = weights["tok_embeddings"], _f32(weights["norm"])
        self.output = weights.get("output", self.tok_embeddings)  # absent: tied embeddings
        self.layers = [Layer(weights, i) for i in range(c.num_layers)]
        self.ws = Workspace(c, min(max_batch_rows, c.max_seq_len))  # used under _KERNEL_LOCK
        self.threads = threads  # kernel threads of this model's passes; None: xllm.get_threads()
        # fewer threads while the machine is busy (xllm/governor.py); XLLM_ADAPTIVE_THREADS=0
        # or governor = None keeps the count fixed
        adaptive = os.environ.get("XLLM_ADAPTIVE_THREADS", "1") != "0"
        self.governor = ThreadGovernor() if adaptive else None
        self._inv_freq = c.inv_freq()
        self.rope_cos = self.rope_sin = np.zeros((0, c.head_dim // 2), np.float32)
        self.steps = StepBatcher(self)

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence of this model (rows of ``kv_dtype``)."""
        c = self.config
        return KVCache(c.num_layers, c.kv_dim, c.max_seq_len, n_kv_heads=c.num_kv_heads,
                       dtype=self.kv_dtype)

    def _ensure_rope(self, n):
        # cos/sin tables grow with the longest sequence seen (doubling), never per token; only
        # passes read them, and a pass holds the kernel lock, so growing is safe here.
        if n > self.rope_cos.shape[0]:
            size = min(self.config.max_seq_len, max(n, 2 * self.rope_cos.shape[0], 256))
            self.rope_cos, self.rope_sin = rope_tables(self._inv_freq, size)

    @contextmanager
    def _kernel_pass(self, rows):
        """Hold the process's kernel lock for one pass of `rows` rows, with the thread count
        the governor chooses (at most this model's count), and tell it the pass's time."""
        with _KERNEL_LOCK:
            before = _kernels.get_threads()
            limit = self.threads or before
            threads = limit if self.governor is None else self.governor.choose(rows, limit)
            _kernels.set_threads(threads)
            start = time.perf_counter()
            try:
                yield
            finally:
                _kernels.set_threads(before)
            if self.governor is not None:
                self.governor.record(rows, threads, time.perf_counter() - start)

    def forward(self, tokens, kv: KVCache, logits_out=None, last_out=None):
        """Run `tokens` (continuing the sequence in `kv`) through the model.

        Fills ``logits_out`` [len(tokens), V] with every row's logits when it is given, else
        ``last_out`` [V] (a new array when None) with the last row's; returns what it filled
        (its last row for logits_out). Safe to call from several threads (one pass at a time)."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        self._check_segment(tokens, kv)
        if logits_out is None and last_out is None:
            last_out = np.empty(self.config.vocab_size, np.float32)
        rows, n = self.ws.rows, len(tokens)
        with self._kernel_pass(n):
            kv.reserve(n)
            for s in range(0, n, rows):
                part = tokens[s:s + rows]
                if logits_out is not None:
                    self._forward_chunk([(part, kv)], None, logits_out[s:s + len(part)])
                elif s + rows < n:  # a head whose logits nobody reads
                    self._forward_chunk([(part, kv)], None, None)
                else:
                    self._forward_chunk([(part, kv)], last_out.reshape(1, -1), None)
        return last_out if logits_out is None else logits_out[-1]

    def _check_segment(self, tokens, kv):
        """Raise unless `tokens` (int64 [n]) can continue the sequence in `kv` (checked before
        any kernel runs, so that a bad segment cannot fail a batch half-way)."""
        if len(tokens) == 0:
            raise ValueError("no tokens to run")
        if len(tokens) == 1:  # a decode step: cheaper than two reductions
            lo = hi = int(tokens[0])
        else:
            lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        kv.check_room(len(tokens))

    def forward_batch(self, seqs, kvs, out):
        """``seqs[i]`` (token ids) continues the sequence in ``kvs[i]``; ``out[i]`` [V] gets the
        logits of its last token. All rows form one matrix (no padding; attention per sequence)
        and go through the same operations as alone: bitwise batch-invariant logits.

        Safe to call from several threads: calls that arrive while a pass runs are run together
        as one batch by the next pass (see :class:`StepBatcher`)."""
        return self.steps.run(seqs, kvs, out)

    def _forward_batch(self, seqs, kvs, out):
        """forward_batch's pass; the caller holds the kernel lock and has checked the segments."""
        rows, chunk, first = self.ws.rows, [], 0
        for i, (toks, kv) in enumerate(zip(seqs, kvs)):
            while len(toks) > rows:  # too long to share a chunk: its head runs alone
                self._forward_chunk([(toks[:rows], kv)], None, None)
                toks = toks[rows:]
            if sum(len(t) for t, _ in chunk) + len(toks) > rows:
                self._forward_chunk(chunk, out[first:first + len(chunk)], None)
                chunk, first = [], i
            chunk.append((toks, kv))
        if chunk:
            self._forward_chunk(chunk, out[first:first + len(chunk)], None)
        return out

    def _forward_chunk(self, segments, last_out, all_out):
        """One pass over the rows of `segments` [(tokens, kv), ...] (at most ws.rows in all):
        the logits of each segment's last row go to last_out, or of every row to all_out."""
        K, c, ws = ops(), self.config, self.ws
        m, a = sum(len(t) for t, _ in segments), 0
        spans = []  # (first row, rows, kv, start position)
        for j, (toks, kv) in enumerate(segments):
            kv.reserve(len(toks))
            self._ensure_rope(kv.length + len(toks))
            b = a + len(toks)
            ws.tokens[a:b] = toks
            kv.ids[kv.length:kv.length + len(toks)] = toks
            np.add(ws.arange[:b - a], kv.length, out=ws.positions[a:b])
            ws.bounds[j], ws.starts[j] = a, kv.length
            spans.append((a, b, kv, kv.length))
            a = b
        ws.bounds[len(spans)] = m
        bounds, starts = ws.bounds[:len(spans) + 1], ws.starts[:len(spans)]
        k_caches = list(zip(*(sp[2].k for sp in spans)))  # [layer][sequence]
        v_caches = list(zip(*(sp[2].v for sp in spans)))
        x, xn, q, attn = ws.x[:m], ws.xn[:m], ws.q[:m], ws.attn[:m]
        kn, vn, gate, up, pos = ws.kn[:m], ws.vn[:m], ws.gate[:m], ws.up[:m], ws.positions[:m]
        cos, sin, eps, inter = self.rope_cos, self.rope_sin, c.rms_norm_eps, c.rope_interleaved
        nh, nkv, scale = c.num_heads, c.num_kv_heads, 1.0 / np.sqrt(c.head_dim)
        K.embedding(self.tok_embeddings, ws.tokens[:m], x)
        for li, layer in enumerate(self.layers):
            # attention: x += wo · attention(rope(wq·n(x)), rope(wk·n(x)), wv·n(x))
            K.rmsnorm(x, layer.attention_norm, eps, xn)
            K.matmul(xn, (layer.wq, layer.wk, layer.wv), (q, kn, vn))  # one quantization of xn
            K.rope(q, pos, cos, sin, nh, inter)
            K.rope(kn, pos, cos, sin, nkv, inter)
            # each sequence stores its new keys and values and attends to its own cache
            K.attention_batch(q, kn, vn, k_caches[li], v_caches[li], bounds, starts, attn, nh,
                              nkv, scale)
            K.matmul(attn, layer.wo, x, accumulate=True)
            # feed-forward: x += w2 · (silu(w1·n(x)) * w3·n(x))
            K.rmsnorm(x, layer.ffn_norm, eps, xn)
            K.matmul(xn, (layer.w1, layer.w3), (gate, up))
            K.silu_mul(gate, up, gate)
            K.matmul(gate, layer.w2, x, accumulate=True)
        for a, b, kv, start in spans:
            kv.length = start + b - a
        if all_out is not None:
            K.rmsnorm(x, self.norm, eps, xn)
            K.matmul(xn, self.output, all_out)
        elif last_out is not None:
            n = len(spans)
            for r in range(n):  # each sequence's last row (no temporary array)
                xn[r] = x[bounds[r + 1] - 1]
            K.rmsnorm(xn[:n], self.norm, eps, xn[:n])
            K.matmul(xn[:n], self.output, last_out[:n])
