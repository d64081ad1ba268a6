"""A sequence's text as its tokens come: incremental decoding, cut at stop strings."""
from .stops import StopFilter


class TextOutput:
    """One sequence's text as its tokens come: decoded incrementally, cut before the first stop
    string (``stopped`` once one is found)."""

    def __init__(self, tokenizer, prompt_ids, stop):
        self.decoder = None
        if tokenizer is not None:
            # Only BOS before the continuation: its first piece loses its leading space, as in
            # sentencepiece's decode of a whole sequence.
            bos = getattr(tokenizer, "bos_id", None)
            only_bos = all(t == bos for t in prompt_ids)
            self.decoder = tokenizer.decoder(strip_leading_space=only_bos)
        self.filter = StopFilter(stop)

    @property
    def stopped(self) -> bool:
        return self.filter.done

    def push(self, token) -> str:
        if self.decoder is None:
            return ""
        return self.filter.push(self.decoder.push(token))

    def flush(self) -> str:
        if self.filter.done or self.decoder is None:
            return self.filter.flush()
        return self.filter.push(self.decoder.flush()) + self.filter.flush()
