"""Stop strings: cutting a stream of text before the first of them."""


class StopFilter:
    """Cuts a stream of text pieces before the first stop string, never emitting part of one:
    text that could be the beginning of a stop string is held back until it is known not to be.

    The stop strings form an Aho-Corasick automaton, built once; each character of a piece
    advances it (amortized O(1)), so a push costs O(len(piece) + the text held back), however
    long or many the stop strings are. The automaton's node after the text seen so far is the
    longest end of that text that begins some stop string: the text to hold back."""

    def __init__(self, stop):
        self.stop = [s for s in stop if s]
        self.pending = ""  # text held back: it may begin a stop string
        self.done = False  # a stop string was found
        self._node = 0  # the automaton's node after the text seen so far
        self._build(self.stop)

    def _build(self, stops):
        """The automaton. Node 0 is the empty string. _goto maps node << 21 | code point to the
        child node; _depth is a node's length; _fail is the node of its longest proper end
        that is also a node; _found is the length of the longest stop string it ends with (0:
        none)."""
        self._goto = {}
        self._depth = [0]
        parent = [0]
        code = [0]
        is_stop = [False]
        for text in stops:
            node = 0
            for c in map(ord, text):
                child = self._goto.get(node << 21 | c)
                if child is None:
                    child = len(self._depth)
                    self._goto[node << 21 | c] = child
                    self._depth.append(self._depth[node] + 1)
                    parent.append(node)
                    code.append(c)
                    is_stop.append(False)
                node = child
            is_stop[node] = True
        self._fail = [0] * len(self._depth)
        self._found = [0] * len(self._depth)
        shorter_first = sorted(range(1, len(self._depth)), key=self._depth.__getitem__)
        for node in shorter_first:
            if parent[node]:  # a longer node's fail link follows its parent's
                self._fail[node] = self._advance(self._fail[parent[node]], code[node])
            if is_stop[node]:
                self._found[node] = self._depth[node]
            else:
                self._found[node] = self._found[self._fail[node]]

    def _advance(self, node, code):
        """The node after `node` followed by the character `code`."""
        while (child := self._goto.get(node << 21 | code)) is None and node:
            node = self._fail[node]
        return child or 0

    def push(self, piece):
        """The text that can be emitted now ("" once a stop string was seen)."""
        if self.done:
            return ""
        if not self.stop:
            return piece
        text = self.pending + piece
        node = self._node
        found = self._found
        cut = None
        end = len(self.pending)
        for c in piece:
            node = self._advance(node, ord(c))
            end += 1
            if found[node] and (cut is None or end - found[node] < cut):
                cut = end - found[node]  # the earliest start of a stop string seen
        if cut is not None:
            self.done = True
            self.pending = ""
            return text[:cut]
        self._node = node
        hold = self._depth[node]
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self):
        """The text held back (at the end of the stream: it began no stop string)."""
        out = self.pending
        self.pending = ""
        return out
