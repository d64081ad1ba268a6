"""The Llama-family forward pass (Llama, Mistral, Qwen2, Qwen3: the config's switches say which
steps run), composed in Python from the compiled kernels.

Shapes below: R = rows processed at once (prompt chunk or 1 for decode), D = hidden_size,
Q = num_heads*head_dim, KV = num_kv_heads*head_dim, F = intermediate_size, V = vocab_size."""
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .. import _kernels
from .._kernels.layout import to_float32
from ..config import ModelConfig
from ..formats.dispatch import ops as kernel_ops
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
    """One transformer block's weights (as loaded: fp32, fp16 or bf16, often memory-mapped).
    The vectors (norms, biases) are float32; bq, bk, bv, q_norm and k_norm are None unless the
    config asks for them."""
    __slots__ = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3",
                 "bq", "bk", "bv", "q_norm", "k_norm")
    VECTORS = ("attention_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm")

    def __init__(self, weights, i):
        for name in self.__slots__:
            weight = weights.get(f"layers.{i}.{name}")
            if name in self.VECTORS and weight is not None:
                weight = _float32_vector(weight)
            setattr(self, name, weight)


def _float32_vector(weight):
    # Norm weights and biases are tiny: keep them as float32 whatever the checkpoint stores.
    return np.ascontiguousarray(to_float32(weight))


class Workspace:
    """Every activation buffer of the forward pass, allocated once for up to `rows` tokens
    (R below) of up to `rows` sequences (S below)."""

    def __init__(self, config: ModelConfig, rows: int):
        self.rows = rows
        hidden = config.hidden_size
        self.x = _zeros(rows, hidden)                        # [R, D] the residual stream
        self.xn = _zeros(rows, hidden)                       # [R, D] x normalized
        self.q = _zeros(rows, config.q_dim)                  # [R, Q] queries
        self.attn = _zeros(rows, config.q_dim)               # [R, Q] attention output
        self.kn = _zeros(rows, config.kv_dim)                # [R, KV] new keys
        self.vn = _zeros(rows, config.kv_dim)                # [R, KV] new values
        self.gate = _zeros(rows, config.intermediate_size)   # [R, F] w1 x, then silu(w1 x) * w3 x
        self.up = _zeros(rows, config.intermediate_size)     # [R, F] w3 x
        self.tokens = np.zeros(rows, np.int64)               # [R] token ids
        self.positions = np.zeros(rows, np.int64)            # [R] their positions
        self.arange = np.arange(rows, dtype=np.int64)        # [R] 0..R-1
        self.bounds = np.zeros(rows + 1, np.int64)           # [S+1] each sequence's first row
        self.starts = np.zeros(rows, np.int64)               # [S] its keys cached before

    @property
    def nbytes(self):
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


def _zeros(rows, columns):
    return np.zeros((rows, columns), np.float32)


@dataclass
class _Segment:
    """Rows of one sequence in a chunk: workspace rows first..end, continuing `kv` at `start`."""
    first: int
    end: int
    kv: KVCache
    start: int


class Transformer:
    """Llama weights plus the forward pass. ``forward`` serves prefill and decode alike."""

    def __init__(self, config: ModelConfig, weights: dict, *, max_batch_rows=512,
                 kv_dtype="float16", threads=None):
        self.config = config
        self.kv_dtype = np.dtype(kv_dtype)
        if self.kv_dtype not in (np.float32, np.float16):
            raise ValueError(f"kv_dtype must be float32 or float16, got {kv_dtype!r}")
        check_weights(weights, config, "weights")
        self.tok_embeddings = weights["tok_embeddings"]
        self.norm = _float32_vector(weights["norm"])
        self.output = weights.get("output", self.tok_embeddings)  # absent: tied embeddings
        self.layers = [Layer(weights, i) for i in range(config.num_layers)]
        self.ws = Workspace(config, min(max_batch_rows, config.max_seq_len))  # under the lock
        self.threads = threads  # kernel threads of this model's passes; None: xllm.get_threads()
        # fewer threads while the machine is busy (xllm/model/governor.py);
        # XLLM_ADAPTIVE_THREADS=0 or governor = None keeps the count fixed
        adaptive = os.environ.get("XLLM_ADAPTIVE_THREADS", "1") != "0"
        self.governor = ThreadGovernor() if adaptive else None
        self._inv_freq = config.inv_freq()
        self.rope_cos = np.zeros((0, config.head_dim // 2), np.float32)
        self.rope_sin = self.rope_cos
        self.steps = StepBatcher(self)

    def new_cache(self, max_len=None) -> KVCache:
        """An empty KV cache for one sequence of this model (rows of ``kv_dtype``) that holds
        at most `max_len` rows (default: the context), with the model's sliding window."""
        c = self.config
        if max_len is None:
            max_len = c.max_seq_len
        return KVCache(c.num_layers, c.kv_dim, max_len, n_kv_heads=c.num_kv_heads,
                       dtype=self.kv_dtype, window=c.sliding_window, chunk_rows=self.ws.rows)

    def _ensure_rope(self, n):
        # cos/sin tables grow with the longest sequence seen (doubling), never per token; only
        # passes read them, and a pass holds the kernel lock, so growing is safe here.
        if n > self.rope_cos.shape[0]:
            size = min(self.config.max_seq_len, max(n, 2 * self.rope_cos.shape[0], 256))
            self.rope_cos, self.rope_sin = rope_tables(self._inv_freq, size)

    @contextmanager
    def kernel_pass(self, rows):
        """Hold the process's kernel lock for one pass of `rows` rows, with the thread count
        the governor chooses (at most this model's count), and tell it the pass's time."""
        with _KERNEL_LOCK:
            before = _kernels.get_threads()
            limit = self.threads or before
            if self.governor is None:
                threads = limit
            else:
                threads = self.governor.choose(rows, limit)
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
        self.check_segment(tokens, kv)
        if logits_out is None and last_out is None:
            last_out = np.empty(self.config.vocab_size, np.float32)
        rows = self.ws.rows
        n = len(tokens)
        with self.kernel_pass(n):
            kv.reserve(n)
            for first in range(0, n, rows):
                part = tokens[first:first + rows]
                segments = self._forward_chunk([(part, kv)])
                if logits_out is not None:
                    self._head_all_rows(len(part), logits_out[first:first + len(part)])
                elif first + rows >= n:  # only the last chunk's head is read
                    self._head_last_rows(segments, last_out.reshape(1, -1))
        if logits_out is None:
            return last_out
        return logits_out[-1]

    def check_segment(self, tokens, kv):
        """Raise unless `tokens` (int64 [n]) can continue the sequence in `kv` (checked before
        any kernel runs, so that a bad segment cannot fail a batch half-way)."""
        if len(tokens) == 0:
            raise ValueError("no tokens to run")
        if len(tokens) == 1:  # a decode step: cheaper than two reductions
            lowest = int(tokens[0])
            highest = lowest
        else:
            lowest = int(tokens.min())
            highest = int(tokens.max())
        if lowest < 0 or highest >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        kv.check_room(len(tokens))

    def forward_batch(self, seqs, kvs, out):
        """``seqs[i]`` (token ids) continues the sequence in ``kvs[i]``; ``out[i]`` [V] gets the
        logits of its last token. All rows form one matrix (no padding; attention per sequence)
        and go through the same operations as alone: bitwise batch-invariant logits.

        Safe to call from several threads: calls that arrive while a pass runs are run together
        as one batch by the next pass (see :class:`StepBatcher`)."""
        return self.steps.run(seqs, kvs, out)

    def forward_batch_locked(self, seqs, kvs, out):
        """The pass of :meth:`forward_batch`, for the StepBatcher: the caller holds
        :meth:`kernel_pass` and has checked every segment. Sequences share chunks of at most
        ``ws.rows`` rows; a sequence longer than that runs its head rows alone first (no output
        head for them: only each sequence's last row is read)."""
        rows = self.ws.rows
        chunk = []
        first_index = 0  # the index in seqs of chunk[0]
        for i, (tokens, kv) in enumerate(zip(seqs, kvs)):
            while len(tokens) > rows:
                self._forward_chunk([(tokens[:rows], kv)])
                tokens = tokens[rows:]
            if sum(len(t) for t, _ in chunk) + len(tokens) > rows:
                self._forward_chunk_to_last(chunk, out[first_index:first_index + len(chunk)])
                chunk = []
                first_index = i
            chunk.append((tokens, kv))
        if chunk:
            self._forward_chunk_to_last(chunk, out[first_index:first_index + len(chunk)])
        return out

    def _forward_chunk_to_last(self, chunk, out):
        segments = self._forward_chunk(chunk)
        self._head_last_rows(segments, out)

    def _forward_chunk(self, chunk):
        """Run the rows of `chunk` [(tokens, kv), ...] (at most ws.rows in all) through every
        layer, leaving the last layer's output in ws.x; their keys and values join the caches.
        Returns the chunk's segments."""
        segments = self._place(chunk)
        self._layers(segments)
        for segment in segments:
            segment.kv.length = segment.start + segment.end - segment.first
        return segments

    def _place(self, chunk):
        """Lay out the chunk's tokens, positions and sequence bounds in the workspace (and make
        room in each cache and the RoPE tables)."""
        ws = self.ws
        segments = []
        row = 0
        for tokens, kv in chunk:
            n = len(tokens)
            kv.reserve(n)
            self._ensure_rope(kv.length + n)
            ws.tokens[row:row + n] = tokens
            kv.ids[kv.length:kv.length + n] = tokens
            np.add(ws.arange[:n], kv.length, out=ws.positions[row:row + n])
            ws.bounds[len(segments)] = row
            ws.starts[len(segments)] = kv.length - kv.offset  # rows before them in its arrays
            segments.append(_Segment(row, row + n, kv, kv.length))
            row += n
        ws.bounds[len(segments)] = row
        return segments

    def _layers(self, segments):
        """The embedding and every transformer block over the workspace's first m rows."""
        ops = kernel_ops()
        c = self.config
        ws = self.ws
        m = segments[-1].end
        n_seq = len(segments)
        bounds = ws.bounds[:n_seq + 1]
        starts = ws.starts[:n_seq]
        k_caches = list(zip(*(segment.kv.k for segment in segments)))  # [layer][sequence]
        v_caches = list(zip(*(segment.kv.v for segment in segments)))
        x = ws.x[:m]
        xn = ws.xn[:m]
        q = ws.q[:m]
        attn = ws.attn[:m]
        kn = ws.kn[:m]
        vn = ws.vn[:m]
        gate = ws.gate[:m]
        up = ws.up[:m]
        pos = ws.positions[:m]
        cos = self.rope_cos
        sin = self.rope_sin
        eps = c.rms_norm_eps
        interleaved = c.rope_interleaved
        scale = 1.0 / np.sqrt(c.head_dim)
        window = c.sliding_window or 0
        ops.embedding(self.tok_embeddings, ws.tokens[:m], x)
        for index, layer in enumerate(self.layers):
            # attention: x += wo · attention(rope(wq·n(x)), rope(wk·n(x)), wv·n(x))
            ops.rmsnorm(x, layer.attention_norm, eps, xn)
            self._project_qkv(ops, layer, xn, q, kn, vn)
            ops.rope(q, pos, cos, sin, c.num_heads, interleaved)
            ops.rope(kn, pos, cos, sin, c.num_kv_heads, interleaved)
            # each sequence stores its new keys and values and attends to its own cache (the
            # last `window` keys of it with a sliding window)
            ops.attention_batch(q, kn, vn, k_caches[index], v_caches[index], bounds, starts, attn,
                                c.num_heads, c.num_kv_heads, scale, window)
            ops.matmul(attn, layer.wo, x, accumulate=True)
            # feed-forward: x += w2 · (silu(w1·n(x)) * w3·n(x))
            ops.rmsnorm(x, layer.ffn_norm, eps, xn)
            ops.matmul(xn, (layer.w1, layer.w3), (gate, up))
            ops.silu_mul(gate, up, gate)
            ops.matmul(gate, layer.w2, x, accumulate=True)

    def _project_qkv(self, ops, layer, xn, q, kn, vn):
        """q, kn, vn = the layer's query, key and value projections of xn, with the steps the
        config's switches add (each row by row: batch invariance holds)."""
        c = self.config
        ops.matmul(xn, (layer.wq, layer.wk, layer.wv), (q, kn, vn))  # one quantization of xn
        if c.attention_bias:  # Qwen2: + bq, bk, bv
            np.add(q, layer.bq, out=q)
            np.add(kn, layer.bk, out=kn)
            np.add(vn, layer.bv, out=vn)
        if c.qk_norm:  # Qwen3: each head's query and key normalized (before RoPE)
            q_heads = q.reshape(-1, c.head_dim)  # a row per head: a view, nothing copied
            k_heads = kn.reshape(-1, c.head_dim)
            ops.rmsnorm(q_heads, layer.q_norm, c.rms_norm_eps, q_heads)
            ops.rmsnorm(k_heads, layer.k_norm, c.rms_norm_eps, k_heads)

    def _head_all_rows(self, m, out):
        """out [m, V] = the logits of every row of the last chunk."""
        ops = kernel_ops()
        ws = self.ws
        ops.rmsnorm(ws.x[:m], self.norm, self.config.rms_norm_eps, ws.xn[:m])
        ops.matmul(ws.xn[:m], self.output, out)

    def _head_last_rows(self, segments, out):
        """out [S, V] = the logits of each segment's last row (gathered into ws.xn: no
        temporary array)."""
        ops = kernel_ops()
        ws = self.ws
        n = len(segments)
        for i, segment in enumerate(segments):
            ws.xn[i] = ws.x[segment.end - 1]
        ops.rmsnorm(ws.xn[:n], self.norm, self.config.rms_norm_eps, ws.xn[:n])
        ops.matmul(ws.xn[:n], self.output, out[:n])
