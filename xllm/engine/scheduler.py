"""Engine: continuous batching. One loop owns the running batch; requests join at the next step
and leave the moment they finish, stop or are cancelled.

Each step runs one forward pass over a ragged batch: one row for every sequence that is
decoding, plus chunks of the prompts still being prefilled, as many rows as a per-step budget
allows (so that a long prompt arriving does not freeze the streams already running: the budget
keeps a step at about ``step_factor`` times a decode-only step). Admission respects the number
of running sequences, the queue length and the KV budget: a request that could never fit is
refused when it is submitted, one that cannot fit yet waits, and when the running sequences'
caches outgrow the budget the newest is preempted (its cache dropped, its tokens kept; it is
prefilled again later and, the forward pass being batch-invariant, continues exactly as it
would have). Finished sequences' caches go to a :class:`PrefixCache` for later prompts that
begin the same way.

Determinism: a sequence's tokens depend only on its prompt, its sampling parameters and its
seed, never on what else runs (the forward pass is bitwise batch-invariant, chunked prefill is
bitwise the same as one pass, and each sequence has its own random generator)."""
import collections
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import ContextLengthError, XLLMError
from ..model.kv_cache import block_rows
from .constraints import MaskJob
from .generation import Sequence
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams, apply_token_mask, log_softmax_top
from .text import TextOutput

DEFAULT_STEP_FACTOR = 2.2  # a step with prefill rows takes about this many decode steps
MIN_PREFILL_ROWS = 8  # prefill rows per step however busy (a long prompt still progresses)
TIME_AVERAGE = 0.3  # weight of the newest measurement in the prefill row cost's average
DECODE_WINDOW = 15  # decode-only steps whose median is the reference step time
LARGE_PREFILL = 64  # a prefill-only step of at least this many rows measures the row cost
FIRST_ROWS = 256  # cache rows a sequence starts with (KVCache's initial capacity)


class QueueFullError(XLLMError):
    """The engine's queue is full: try again later (HTTP 429)."""


class EngineClosedError(XLLMError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class TokenEvent:
    """A generated token: its id, the text that is now certain (may be empty), and its
    log-probability and the most likely alternatives when the request asked for them."""
    token: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None


@dataclass
class FinishEvent:
    """The end of a request: why ("stop", "length", "constraint": its grammar allowed no
    token, "cancelled" or "error"), the text held back until now, and the token counts."""
    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: Optional[BaseException] = None


@dataclass
class Request:
    """One sequence to generate. ``emit`` receives its events, from the engine's thread: a
    TokenEvent per token, then one FinishEvent. ``logprobs``: None for none, else how many
    alternatives to report with each token (0: only the token's own). ``constraint``: an
    :class:`xllm.engine.constraints.Constraint` its tokens must follow, or None."""
    prompt: list
    max_new_tokens: int
    params: SamplingParams
    emit: Callable
    stop: tuple = ()
    logprobs: Optional[int] = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    constraint: Optional[object] = None
    cancelled: bool = False
    matcher: Optional[object] = None  # the constraint's Matcher: Engine.submit makes it if
    # the caller did not (a caller that made it gives each request its own)

    def cancel(self):
        """Stop generating (the client went away); the engine drops the sequence at its next
        step and frees its cache."""
        self.cancelled = True


class _Running:
    """A request the engine has admitted: its sequence, text and counters."""

    def __init__(self, request, sequence, text, order):
        self.request = request
        self.sequence = sequence
        self.text = text
        self.order = order  # admission order: the newest is preempted first
        self.cached_tokens = 0

    @property
    def kv(self):
        return self.sequence.kv

    @property
    def rows_left(self):
        """Rows still to run before the next token can be sampled."""
        return self.sequence.length - self.sequence.kv.length


class Engine:
    """Runs :class:`Request` objects for one model on a background thread.

    max_running: sequences in the running batch; max_queue: requests waiting beyond those
    (``submit`` raises QueueFullError past it); kv_budget: bytes of KV cache for running
    sequences and the prefix cache together; prefix_cache: whether finished sequences' caches
    are kept for reuse."""

    def __init__(self, model, *, max_running=32, max_queue=256, kv_budget=1 << 30,
                 prefix_cache=True, step_factor=DEFAULT_STEP_FACTOR):
        self.model = model
        self.transformer = model.transformer
        self.max_running = max_running
        self.max_queue = max_queue
        self.kv_budget = kv_budget
        self.step_factor = step_factor
        if prefix_cache:  # the model's own: library calls in this process share it
            self.prefix_cache = model.prefix_cache
            self.prefix_cache.max_bytes = kv_budget
        else:
            self.prefix_cache = PrefixCache(0)
        config = model.config
        ids = (config.eos_token_id, *config.extra_eos_token_ids)
        self.stop_ids = frozenset(i for i in ids if i is not None)
        self._waiting = collections.deque()  # requests not yet running, oldest first
        self._running = []  # _Running objects of the batch
        self._preempted = {}  # id(request) -> its _Running, for requests queued again
        self._admitted = 0
        self._closing = False
        self._cond = threading.Condition()
        self._logits = np.zeros((0, config.vocab_size), np.float32)
        self._masks = MaskJob()
        # the times of the latest decode-only steps, and the average cost of one prefill row
        self._decode_times = collections.deque(maxlen=DECODE_WINDOW)
        self._row_seconds = None
        self.steps = 0
        self.preemptions = 0
        self._thread = threading.Thread(target=self._loop, name="xllm-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side ----

    def submit(self, request: Request):
        """Queue `request`. ContextLengthError if its prompt and max_new_tokens pass the
        model's context; ValueError if its KV cache could never fit the budget;
        ConstraintError if its constraint cannot be followed; QueueFullError if the queue is
        full; EngineClosedError while shutting down."""
        max_len = self.model.config.max_seq_len
        if len(request.prompt) == 0:
            raise ValueError("the prompt is empty")
        end = len(request.prompt) + request.max_new_tokens
        if end > max_len + 1:  # the last token needs no row
            raise ContextLengthError(
                f"the prompt ({len(request.prompt)} tokens) and max_tokens "
                f"({request.max_new_tokens}) pass the model's context of {max_len} tokens")
        need = self._cache_bytes(self._rows_limit(request))
        if need > self.kv_budget:
            raise ValueError(f"this request needs {need / 2**20:.1f} MiB of KV cache, more than "
                             f"the engine's budget of {self.kv_budget / 2**20:.1f} MiB")
        # compiled here, on the caller's thread, not in the engine's loop (unless the caller
        # compiled it already)
        if request.matcher is None:
            request.matcher = self.model.matcher(request.constraint, request.max_new_tokens)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self._cond.notify_all()

    def wake(self):
        """Make the loop look at its requests now (after a cancel)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache held: the running sequences' and the prefix cache's."""
        running = list(self._running)
        return sum(r.kv.nbytes for r in running) + self.prefix_cache.nbytes

    def close(self, timeout=30.0):
        """Take no new requests, let the running and waiting ones finish for up to `timeout`
        seconds, cancel the rest, and stop the loop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._running or self._waiting) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            for request in list(self._waiting):
                request.cancel()
            for running in list(self._running):
                running.request.cancel()
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    # ---- the loop ----

    def _loop(self):
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._closing):
                    self._cond.wait()
                if self._closing and not (self._waiting or self._running):
                    return
                if self._closing and self._all_cancelled():
                    self._drop_cancelled_waiting()
            try:
                self._step()
            except BaseException as error:  # a bug: fail what runs, keep serving
                self._fail_all(error)
            with self._cond:
                self._cond.notify_all()  # close() waits for the batch to drain

    def _all_cancelled(self):
        return all(r.cancelled for r in self._waiting) and \
            all(r.request.cancelled for r in self._running)

    def _drop_cancelled_waiting(self):
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._emit(request, FinishEvent("cancelled", "", len(request.prompt), 0, 0))

    def _step(self):
        self._retire_cancelled()
        self._admit()
        plan = self._plan()
        if not plan:
            with self._cond:
                if not self._running and self._waiting:
                    self._cond.wait(0.01)  # nothing fits yet
            return
        started = time.perf_counter()
        logits = self._logits_rows(len(plan))
        seqs = []
        for running, rows in plan:
            first = running.kv.length
            seqs.append(running.sequence.tokens[first:first + rows])
        # the masks of the rows that sample this step, computed while the forward pass runs
        self._masks.start([(running.request.matcher, row)
                           for row, (running, rows) in enumerate(plan)
                           if running.request.matcher is not None and rows == running.rows_left])
        self.transformer.forward_batch(seqs, [running.kv for running, _ in plan], logits)
        masks = self._masks.wait()
        self._measure(plan, time.perf_counter() - started)
        self.steps += 1
        for row, (running, _) in enumerate(plan):
            if running.rows_left == 0:
                mask = masks[row] if running.request.matcher is not None else None
                self._next_token(running, logits[row], mask)
        self._retire_finished()

    def _logits_rows(self, n):
        if len(self._logits) < n:  # grows to the most sequences ever run in one step
            self._logits = np.zeros((max(n, 2 * len(self._logits)), self._logits.shape[1]),
                                    np.float32)
        return self._logits[:n]

    # ---- admission and memory ----

    def _rows_limit(self, request):
        """The most rows the request's cache can ever hold."""
        rows = len(request.prompt) + request.max_new_tokens - 1
        return min(max(rows, len(request.prompt)), self.model.config.max_seq_len)

    def _cache_bytes(self, rows):
        c = self.model.config
        itemsize = self.transformer.kv_dtype.itemsize
        return 2 * c.num_layers * block_rows(rows) * c.kv_dim * itemsize

    def _new_cache(self, request):
        return self.transformer.new_cache(self._rows_limit(request))

    def _running_bytes(self):
        return sum(r.kv.nbytes for r in self._running)

    def _admit(self):
        """Move waiting requests into the batch while there is room for their first rows
        (the prefix cache gives up what it must). With nothing running, the first waiting
        request always starts: ``submit`` checked that it fits the budget alone."""
        while True:
            with self._cond:
                if not self._waiting or len(self._running) >= self.max_running:
                    return
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    self._preempted.pop(id(request), None)
                    self._emit(request, FinishEvent("cancelled", "", len(request.prompt), 0, 0))
                    continue
                resumed = self._preempted.get(id(request))
                rows = len(request.prompt) if resumed is None else resumed.sequence.length
                need = self._running_bytes() + self._cache_bytes(min(rows, FIRST_ROWS))
                if self._running and need > self.kv_budget:
                    return  # wait for running sequences to finish
                self.prefix_cache.evict(max(0, self.kv_budget - need))
                self._waiting.popleft()
                self._preempted.pop(id(request), None)
            self._running.append(self._start(request, resumed))

    def _start(self, request, resumed):
        """The running state of a newly admitted request, or of one resumed after preemption
        (which continues from its tokens so far)."""
        self._admitted += 1
        if resumed is not None:
            resumed.order = self._admitted
            self._lend_prefix(resumed, resumed.sequence.tokens[:resumed.sequence.length],
                              request)
            return resumed
        prompt = request.prompt
        limit = min(request.max_new_tokens, self.model.config.max_seq_len + 1 - len(prompt))
        tokens = np.zeros(len(prompt) + limit, np.int64)
        tokens[:len(prompt)] = prompt
        sequence = Sequence(len(prompt), tokens, len(prompt), limit, None,
                            Sampler(request.params))
        text = TextOutput(self.model.tokenizer, prompt, request.stop)
        running = _Running(request, sequence, text, self._admitted)
        self._lend_prefix(running, tokens[:len(prompt)], request)
        running.cached_tokens = running.kv.length
        return running

    def _lend_prefix(self, running, tokens, request):
        kv = self.prefix_cache.lookup(tokens, lambda: self._new_cache(request))
        running.sequence.kv = kv if kv is not None else self._new_cache(request)

    def _plan(self):
        """[(running, rows)] for this step: one row for each sequence ready to decode, then
        prefill chunks in admission order within the step's budget; preempts the newest
        sequences if the caches would outgrow the KV budget."""
        while True:
            plan = []
            prefilling = sum(1 for r in self._running if r.rows_left > 1)
            decoding = any(r.rows_left == 1 for r in self._running)
            if decoding:
                prefill_budget = self._prefill_budget(prefilling)
            else:
                prefill_budget = self.transformer.ws.rows
            for running in sorted(self._running, key=lambda r: r.order):
                rows = running.rows_left
                if rows == 1:
                    plan.append((running, 1))
                elif prefill_budget > 0:
                    take = min(rows, prefill_budget)
                    prefill_budget -= take
                    plan.append((running, take))
            if self._fits(plan) or len(self._running) <= 1:
                return plan
            self._preempt_newest()

    def _fits(self, plan):
        """Whether the running caches, grown for `plan`, and the prefix cache (which gives up
        what it must first) fit the KV budget."""
        planned = {id(running): rows for running, rows in plan}
        running_bytes = 0
        for running in self._running:
            capacity = running.kv.capacity_for(planned.get(id(running), 0))
            running_bytes += running.kv.bytes_for(capacity)
        self.prefix_cache.evict(max(0, self.kv_budget - running_bytes))
        return running_bytes + self.prefix_cache.nbytes <= self.kv_budget

    def _preempt_newest(self):
        """Drop the newest sequence's cache and queue it again at the front: it is prefilled
        again when there is room, and continues exactly where it was."""
        newest = max(self._running, key=lambda r: r.order)
        self._running.remove(newest)
        newest.kv.reset()
        with self._cond:
            self._preempted[id(newest.request)] = newest
            self._waiting.appendleft(newest.request)
        self.preemptions += 1

    def _prefill_budget(self, prefilling):
        """Prefill rows for a step that also decodes. The step should take about step_factor
        times the decode step the batch will have once its `prefilling` sequences decode too:
        the decode rows' step (measured) and one row per prefilling sequence (at the measured
        row cost). That leaves (step_factor - 1) decode steps' time for prefill rows, plus
        step_factor rows per prefilling sequence, so that many prompts arriving together beside
        a few streams are not prefilled a few rows at a time."""
        if self._row_seconds is None or not self._decode_times:
            return MIN_PREFILL_ROWS
        spare = (self.step_factor - 1.0) * self._decode_reference()
        rows = int(spare / self._row_seconds + self.step_factor * prefilling)
        return min(self.transformer.ws.rows, max(MIN_PREFILL_ROWS, rows))

    def _decode_reference(self):
        """The median time of the latest decode-only steps: a step slowed once (another thread
        or process took a core for a moment, as the server's event loop does while it reads a
        large request) does not move it."""
        return statistics.median(self._decode_times)

    def _measure(self, plan, seconds):
        """Learn from a step's time: decode-only steps give the reference step time; steps
        with prefill rows give the cost of a prefill row, by what they took beyond a decode
        step (a row late in a long prompt costs more: its row attends to more keys)."""
        decode_rows = sum(1 for _, n in plan if n == 1)
        prefill_rows = sum(n for _, n in plan if n > 1)
        if not prefill_rows:
            self._decode_times.append(seconds)
            return
        if decode_rows and self._decode_times:
            row_seconds = (seconds - self._decode_reference()) / prefill_rows
        elif not decode_rows and prefill_rows >= LARGE_PREFILL:
            row_seconds = seconds / prefill_rows
        else:
            return
        if row_seconds > 0:
            self._row_seconds = _average(self._row_seconds, row_seconds)

    # ---- tokens and endings ----

    def _next_token(self, running, logits, mask):
        """Sample the sequence's next token from its logits row (only the tokens `mask`
        allows, if the request has a constraint) and emit it (or its end)."""
        sequence = running.sequence
        request = running.request
        matcher = request.matcher
        if request.cancelled or sequence.finish is not None:
            return
        if sequence.generated >= sequence.max_new_tokens:
            sequence.finish = "length"
            return
        row = logits[:self.model.vocab_limit]
        logprob = None
        top = None
        if request.logprobs is not None:
            raw = row.copy()  # the sampler applies penalties in place
        if matcher is not None and apply_token_mask(row, mask) == 0:
            sequence.finish = "constraint"  # a dead end: nothing the grammar allows
            return
        generated = sequence.tokens[sequence.prompt_length:sequence.length]
        token = sequence.sampler(row, sequence.tokens[:sequence.length], generated)
        if request.logprobs is not None:
            logprob, top = log_softmax_top(raw, token, request.logprobs)
        if matcher is not None and not matcher.accept(token):
            sequence.finish = "constraint"
            return
        if token in self.stop_ids and (matcher is not None or not request.ignore_eos):
            sequence.finish = "stop"
            return
        sequence.tokens[sequence.length] = token
        sequence.length += 1
        text = running.text.push(token)
        self._emit(request, TokenEvent(token, text, logprob, top))
        if running.text.stopped:
            sequence.finish = "stop"
        elif sequence.generated >= sequence.max_new_tokens or \
                sequence.length > self.model.config.max_seq_len:
            sequence.finish = "length"

    def _retire_finished(self):
        for running in [r for r in self._running if r.sequence.finish is not None]:
            self._running.remove(running)
            self._finish(running, running.sequence.finish)
            # the cache holds every token but the last: a later prompt may begin the same way
            self.prefix_cache.insert(running.kv)

    def _retire_cancelled(self):
        for running in [r for r in self._running if r.request.cancelled]:
            self._running.remove(running)
            running.kv.reset()
            self._finish(running, "cancelled")

    def _finish(self, running, reason, error=None):
        text = "" if reason in ("cancelled", "error") else running.text.flush()
        self._emit(running.request, FinishEvent(
            reason, text, running.sequence.prompt_length, running.sequence.generated,
            running.cached_tokens, error))

    def _fail_all(self, error):
        for running in list(self._running):
            self._running.remove(running)
            running.kv.reset()
            self._finish(running, "error", error)

    def _emit(self, request, event):
        try:
            request.emit(event)
        except Exception:  # the receiver is gone: nobody wants the rest
            request.cancel()


def _average(old, new):
    if old is None:
        return new
    return (1.0 - TIME_AVERAGE) * old + TIME_AVERAGE * new
