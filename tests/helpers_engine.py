"""Helpers shared by the tests of the continuous-batching engine (tests/test_engine.py,
tests/test_structured.py)."""
import threading

from xllm.engine.scheduler import FinishEvent, TokenEvent


class Collector:
    """The callback of one engine Request: it keeps the request's events as they come.

    ``text`` is the text so far, ``tokens`` the generated token ids, ``finish`` the
    FinishEvent (None until it comes) and ``done`` is set when it has come. An event that is
    neither a TokenEvent nor a FinishEvent fails the assertion (in the engine's thread)."""

    def __init__(self):
        self.text = ""
        self.tokens = []
        self.finish = None
        self.done = threading.Event()

    def __call__(self, event):
        self.text += event.text
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token)
        else:
            assert isinstance(event, FinishEvent)
            self.finish = event
            self.done.set()
