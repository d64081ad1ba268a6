"""How many kernel threads each forward pass uses, from the pass times it measures.

OpenMP threads meet at the end of every parallel region, a few hundred times per decode step.
On a quiet machine each meeting costs microseconds. When another process takes a core, the
thread it displaced holds the others up for whole scheduler time slices, and decode collapses
by 30-100x instead of losing that core's share. Fewer threads lose only the share.

The governor keeps, per pass shape (rows in the pass, in powers of two), a moving average of
the pass time at each thread count it has used, and runs the fastest. It tries another count
for one pass when the machine seems to have changed (a pass much slower than the average) and
once early (for passes of up to a second), and otherwise rarely, within a small share of the time (``TRIAL_SHARE``): fewer
threads on a quiet machine cost a trial about one pass, so the quiet speed stays. Results do not depend on the
thread count (every kernel reduces in a fixed order), so switching never changes a token.
"""
import time

TRIAL_SHARE = 0.01  # at most about this share of a shape's time goes to trial passes
MIN_TRIAL_GAP = 0.5  # seconds between two trials of one shape, at least
SLOWER = 1.5         # passes this much slower than their average suggest a busier machine
SLOW_PASSES = 2      # ... when this many come in a row (one can be a page fault or an interrupt)
EARLY_TRIAL = 2      # a shape's pass after which the other count is tried once (catches a
                     # machine that was busy from the start) ...
EARLY_TRIAL_MAX = 1.0  # ... if its passes take at most this many seconds: a trial costs up to
                       # a pass, and a 7B model's 512-token prefill (20 s) would pay double once;
                       # longer passes learn from slow passes and the share below
AVERAGE = 0.3        # weight of the newest pass time in the moving average
RETRY = 4            # passes after dropping threads before more are tried again (and at
                     # least 20 times their last pass time); doubles after each trial that
                     # finds them still slower: a burst of noise on a quiet machine is undone
                     # quickly, a lasting load costs few trials


class _Shape:
    """What the governor knows of the passes of one shape."""
    __slots__ = ("current", "trial", "seconds", "passes", "slow", "last_trial", "retry",
                 "since")

    def __init__(self, threads):
        self.current = threads  # the count in use
        self.trial = None       # a count to run the next pass with, once
        self.seconds = {}       # thread count -> moving average of pass seconds
        self.passes = 0
        self.slow = 0           # passes in a row much slower than the average
        self.retry = RETRY      # passes to wait before trying more threads again
        self.since = 0          # passes since the last trial
        self.last_trial = time.monotonic()


class ThreadGovernor:
    """Chooses the thread count of each pass (``choose``) and learns from its time
    (``record``). Not thread-safe: the caller holds the kernel lock around both."""

    def __init__(self):
        self._shapes = {}
        self._limit = None  # the most threads allowed when the shapes were learned
        self._latest = None  # the count the last pass of any shape settled on

    def choose(self, rows: int, limit: int) -> int:
        """The thread count for a pass of `rows` rows, at most `limit`."""
        if limit <= 1:
            return 1
        if limit != self._limit:  # a new limit: what was learned no longer applies
            self._shapes.clear()
            self._limit = limit
            self._latest = None
        shape = self._shapes.get(_key(rows))
        if shape is None:  # a new shape starts where the machine seems to be now
            shape = _Shape(self._latest or limit)
            self._shapes[_key(rows)] = shape
        return shape.trial or shape.current

    def record(self, rows: int, threads: int, seconds: float) -> None:
        """Learn that a pass of `rows` rows took `seconds` with `threads` threads."""
        shape = self._shapes.get(_key(rows))
        if shape is None:
            return
        before = shape.seconds.get(threads)
        shape.passes += 1
        self._latest = shape.current
        if threads != shape.current:  # the end of a trial: keep the faster count
            shape.seconds[threads] = seconds  # what was known of this count is old
            shape.trial = None
            shape.last_trial = time.monotonic()
            shape.since = 0
            faster = shape.seconds[threads] < 0.95 * shape.seconds[shape.current]
            if faster and threads < shape.current:
                shape.retry = RETRY
            elif not faster and threads > shape.current:
                shape.retry *= 2
            if faster:
                shape.current = threads
                self._latest = threads
            return
        if before is None:
            shape.seconds[threads] = seconds
        else:
            shape.seconds[threads] = before + AVERAGE * (seconds - before)
        shape.trial = self._next_trial(shape, before, seconds)

    def _next_trial(self, shape, before, seconds):
        """A count to try for the next pass, or None."""
        now = time.monotonic()
        fewer = shape.current // 2 if shape.current > 1 else None
        more = min(self._limit, 2 * shape.current) if shape.current < self._limit else None
        if before is not None and seconds > SLOWER * before:
            shape.slow += 1
        else:
            shape.slow = 0
        if fewer and shape.slow >= SLOW_PASSES:
            shape.slow = 0
            return fewer  # much slower than usual: maybe a core was taken
        if shape.passes == EARLY_TRIAL and seconds <= EARLY_TRIAL_MAX:
            return fewer or more
        shape.since += 1
        if more and shape.since >= shape.retry and \
                now - shape.last_trial >= 20 * shape.seconds.get(more, 0.0):
            return more  # fewer threads were faster a while ago: the machine may be free
        gap = max(MIN_TRIAL_GAP, min(shape.seconds.values()) / TRIAL_SHARE)
        if now - shape.last_trial < gap:
            return None
        return more or fewer


def _key(rows: int) -> int:
    """Passes of 1, 2-3, 4-7, ... rows share what is learned."""
    return int(rows).bit_length()
