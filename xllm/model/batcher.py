"""StepBatcher: one model's forward_batch calls from many threads, run as shared batches."""
import threading

import numpy as np

from ..errors import XLLMError


class _Step:
    """One forward_batch call waiting in a StepBatcher."""
    __slots__ = ("seqs", "kvs", "out", "done", "error")

    def __init__(self, seqs, kvs, out):
        self.seqs = seqs
        self.kvs = kvs
        self.out = out
        self.done = False
        self.error = None


class StepBatcher:
    """Runs one model's forward_batch calls from any number of threads.

    A call made while no pass is running runs at once, in the calling thread. Calls made while
    a pass runs wait; when it ends, one of them runs all waiting calls as a single batch (one
    read of the weights for all their sequences) and hands each its rows of logits. Batch
    invariance makes every sequence's logits bitwise what it would get alone, so callers see
    no difference but speed: concurrent decode steps cost about what one batched step costs.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self._cond = threading.Condition()
        self._waiting = []     # steps not yet taken by a pass
        self._running = False  # a thread is running a pass
        self._buffer = np.zeros((0, transformer.config.vocab_size), np.float32)

    def run(self, seqs, kvs, out):
        seqs = [np.asarray(t, np.int64).reshape(-1) for t in seqs]
        kvs = list(kvs)
        if len(kvs) != len(seqs) or len(out) < len(seqs):
            raise ValueError(f"{len(seqs)} sequences need as many caches ({len(kvs)}) and rows "
                             f"of out ({len(out)})")
        if len({id(kv) for kv in kvs}) != len(kvs):
            raise ValueError("a KV cache appears twice in one batch")
        for toks, kv in zip(seqs, kvs):
            self.transformer.check_segment(toks, kv)
        step = _Step(seqs, kvs, out)
        with self._cond:
            self._waiting.append(step)
            while not step.done:
                if self._running:
                    self._cond.wait()
                    continue
                steps = self._waiting
                self._waiting = []
                self._running = True
                self._cond.release()
                try:
                    self._pass(steps)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if step.error is not None:
            raise step.error
        return out

    def _pass(self, steps):
        """Run `steps` as one batch; every step ends done, with its logits or its error."""
        steps = self._without_conflicts(steps)
        try:
            if len(steps) == 1:
                step = steps[0]
                with self.transformer.kernel_pass(sum(map(len, step.seqs))):
                    self.transformer.forward_batch_locked(step.seqs, step.kvs, step.out)
            elif steps:
                self._batched_pass(steps)
        except BaseException as e:
            for step in steps:
                step.error = e if len(steps) == 1 else XLLMError(
                    f"a forward pass batched with other threads' steps failed: {e!r}")
            if len(steps) == 1 or not isinstance(e, Exception):
                raise
        finally:
            for step in steps:
                step.done = True

    def _without_conflicts(self, steps):
        """The steps that may run together: a cache that another step of the pass also
        continues would be corrupted, so the later step fails instead."""
        seen = set()
        keep = []
        for step in steps:
            ids = {id(kv) for kv in step.kvs}
            if ids & seen:
                step.error = ValueError("a KV cache is being continued by two threads at once")
                step.done = True
                continue
            seen |= ids
            try:
                for toks, kv in zip(step.seqs, step.kvs):  # room for the rows, before the pass
                    kv.reserve(len(toks))
            except Exception as e:
                step.error = e
                step.done = True
                continue
            keep.append(step)
        return keep

    def _batched_pass(self, steps):
        seqs = [t for step in steps for t in step.seqs]
        kvs = [kv for step in steps for kv in step.kvs]
        if len(self._buffer) < len(seqs):  # grows to the most sequences ever batched
            self._buffer = np.zeros((len(seqs), self._buffer.shape[1]), np.float32)
        out = self._buffer[:len(seqs)]
        with self.transformer.kernel_pass(sum(map(len, seqs))):
            self.transformer.forward_batch_locked(seqs, kvs, out)
        row = 0
        for step in steps:
            n = len(step.seqs)
            step.out[:n] = out[row:row + n]
            row += n
