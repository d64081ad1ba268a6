"""Batched greedy generation with llama.cpp (llama-cpp-python's low-level batch API), for
tools/benchmark_batch.py --llama-cpp-model: the same prompt token ids, the same stopping rules.

One llama_batch holds every prompt token of every sequence (sequence s at positions 0..len-1,
logits only for its last token); each decode step then holds one token per running sequence.
A sequence stops at an end-of-generation token or after max_new_tokens. llama-cpp-python must be
built as ../shared/bench/build-llama-cpp-python.sh says (its stock build crashes on this CPU).
"""
import ctypes
import time

import numpy as np


class LlamaCppBatch:
    """A llama.cpp model and context sized for `n_seq` sequences of up to `seq_len` tokens."""
    PRELOAD = ("llama_cpp",)  # see benchmark.EngineProcess

    def __init__(self, path, n_seq, seq_len, threads, n_batch):
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"{path}: llama.cpp could not load this model")
        cp = L.llama_context_default_params()
        cp.n_seq_max = n_seq
        cp.n_ctx = n_seq * (-(-seq_len // 256) * 256)  # each sequence gets n_ctx / n_seq rows
        cp.n_batch = cp.n_ubatch = max(n_batch, n_seq)
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False  # separate KV per sequence: no shared prefixes here
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit(f"{path}: llama.cpp could not create a context for {n_seq} sequences")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(cp.n_batch, 0, 1)
        self.n_batch = cp.n_batch

    def _decode(self, items):
        """Run [(token, pos, seq, want_logits), ...] in one llama_decode (split at n_batch)."""
        b, L = self.batch, self.L
        for lo in range(0, len(items), self.n_batch):
            part = items[lo:lo + self.n_batch]
            for i, (tok, pos, seq, want) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            b.n_tokens = len(part)
            if L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        L.llama_synchronize(self.ctx)

    def _argmax(self, i):
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(
            ctypes.c_float)), (self.n_vocab,))))

    def run(self, prompts, max_new_tokens):
        """Greedy generation of `prompts` (token id lists) together; timings like run_batch."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n = len(prompts)
        tokens = [[] for _ in range(n)]
        first, ends = [None] * n, [None] * n
        t0 = time.perf_counter()
        items = [(int(t), j, s, j == len(p) - 1) for s, p in enumerate(prompts)
                 for j, t in enumerate(p)]
        self._decode(items)
        # logits rows are numbered by position in the batch: each prompt's last token
        rows, r = [], -1
        for s, p in enumerate(prompts):
            r += len(p)
            rows.append(r)
        running = list(range(n))
        boundary = None
        while running:
            nxt = []
            for row, s in zip(rows, running):
                tok = self._argmax(row)
                now = time.perf_counter()
                first[s] = first[s] or now
                ends[s] = now
                tokens[s].append(tok)
                if not L.llama_vocab_is_eog(self.vocab, tok) and len(tokens[s]) < max_new_tokens:
                    nxt.append(s)
            if boundary is None:
                boundary = time.perf_counter()
            running = nxt
            if running:
                self._decode([(tokens[s][-1], len(prompts[s]) + len(tokens[s]) - 1, s, True)
                              for s in running])
                rows = list(range(len(running)))
        t_end = time.perf_counter()
        generated = [len(t) for t in tokens]
        eos = sum(bool(L.llama_vocab_is_eog(self.vocab, t[-1])) for t in tokens)
        return {"prompt_tokens": sum(len(p) for p in prompts), "generated": sum(generated),
                "prefill_seconds": boundary - t0, "decode_seconds": t_end - boundary,
                "decode_tokens": sum(generated) - n, "wall_seconds": t_end - t0,
                "ttft": [f - t0 for f in first], "total": [e - t0 for e in ends],
                "eos": eos, "tokens": tokens}

    def close(self):
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
