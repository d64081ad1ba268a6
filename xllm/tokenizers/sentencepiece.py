"""SentencePiece-style BPE tokenizer for Llama-family models.

A plain-Python re-implementation of what ``sentencepiece`` 0.2.x does for BPE models (read from
``tokenizer.model``, llama2.c ``tokenizer.bin`` or GGUF), so xllm does not need sentencepiece at
run time. Models needing anything else (unigram, a normalisation table, whitespace-as-suffix)
are rejected with ``ModelFormatError`` rather than tokenized slightly wrongly."""
import codecs
import os
import re
import struct
from array import array
from heapq import heappop, heappush

from ..errors import ModelFormatError
from .base import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer,
                   _alternation)

SPACE_SYMBOL = "\u2581"  # "▁", how SentencePiece writes a space inside pieces
DEFAULT_UNK_SURFACE = " \u2047 "  # sentencepiece's default text for <unk> (" ⁇ ")
_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
# sentencepiece decodes each byte at which no valid UTF-8 character starts to one U+FFFD.
codecs.register_error("xllm-spm", lambda e: ("\ufffd", e.start + 1))


class SentencePieceBPE(Tokenizer):
    """A SentencePiece BPE tokenizer (Llama 1/2, Mistral, TinyLlama...); encodes and decodes
    like ``sentencepiece.SentencePieceProcessor`` 0.2.x. Besides the shared attributes
    (vocab_size, bos_id, eos_id, unk_id, add_bos_default, special_tokens: the control and
    <unk> pieces) it has pieces, scores, types (NORMAL..BYTE), add_dummy_prefix,
    remove_extra_whitespaces and byte_fallback."""

    _errors = "xllm-spm"

    def __init__(self, pieces, scores, types, *, bos_id=1, eos_id=2, unk_id=0,
                 add_dummy_prefix=True, remove_extra_whitespaces=False, byte_fallback=True,
                 escape_whitespaces=True, unk_surface=DEFAULT_UNK_SURFACE, add_bos_default=True):
        self._init_vocab([str(p) for p in pieces], [int(t) for t in types],
                         (bos_id, eos_id, unk_id))
        if len(scores) != len(pieces):
            raise ModelFormatError(f"tokenizer vocabulary is inconsistent: {len(pieces)} "
                                   f"pieces, {len(scores)} scores")
        # float32 in every format; rounding keeps ties as in sentencepiece
        self.scores = array("f", map(float, scores)).tolist()
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        self._strips_space = self.add_dummy_prefix or self.remove_extra_whitespaces
        self.byte_fallback, self.escape_whitespaces = bool(byte_fallback), bool(escape_whitespaces)
        self.unk_surface, self.add_bos_default = unk_surface, bool(add_bos_default)
        # Only "normal" pieces (NORMAL, USER_DEFINED, UNUSED) can come out of merges; reserved
        # ones (CONTROL, UNKNOWN, BYTE) win piece-to-id lookups.
        self._byte, normal, reserved = {}, {}, {}
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if not p:
                raise ModelFormatError(f"piece {i} is empty")
            if t in (NORMAL, USER_DEFINED, UNUSED):
                normal.setdefault(p, i)  # the first occurrence wins
            elif t in (UNKNOWN, CONTROL, BYTE):
                reserved.setdefault(p, i)
                if t == BYTE:
                    if not (m := _BYTE_PIECE_RE.match(p)):
                        raise ModelFormatError(f"byte piece {i} is {p!r}, not <0xNN>")
                    self._byte[i] = bytes([int(m.group(1), 16)])
            else:
                raise ModelFormatError(f"piece {i} ({p!r}) has unknown type {t}")
        self._ids = {**normal, **reserved}
        # merge ranks: by score, best first (equal scores share a rank; NaN ranks last)
        by_score = sorted({s for s in self.scores if s == s}, reverse=True)
        rank = {s: r for r, s in enumerate(by_score)}
        self._merge_rank = {p: rank.get(self.scores[i], len(by_score)) for p, i in normal.items()}
        self._unused = {p for p, i in normal.items() if self.types[i] == UNUSED}
        self._user_rx = _alternation(p for p, i in normal.items() if self.types[i] == USER_DEFINED)
        self._byte_ids = [self.piece_to_id("<0x%02X>" % b) for b in range(256)]
        self._set_special({p: i for p, i in reserved.items() if self.types[i] != BYTE})

    @classmethod
    def from_model_file(cls, path) -> "SentencePieceBPE":
        """Load a SentencePiece ``tokenizer.model`` (a serialized ``ModelProto``)."""
        path = os.fspath(path)
        data = _read_file(path)
        try:
            pieces, scores, types, tr, nm = _parse_model_proto(data)
            unk = [i for i, t in enumerate(types) if t == UNKNOWN]
            mtype = tr.get(3, 1)
            for bad, msg in (
                    (not pieces, "no pieces found"),
                    (not tr or not nm, "no trainer/normalizer spec (the file may be truncated)"),
                    (mtype != 2, f"model type is {_MODEL_TYPES.get(mtype, mtype)}; only BPE "
                                 "models are supported"),
                    (nm.get(2), f"it uses the {nm.get(1, b'custom').decode()!r} normalisation "
                                "table; only the identity normaliser is supported"),
                    (tr.get(24), "treat_whitespace_as_suffix is not supported"),
                    (not tr.get(35) and BYTE in types, "byte pieces but byte_fallback is off"),
                    (len(unk) != 1, f"needs exactly one <unk> piece, found {len(unk)}")):
                if bad:
                    raise ValueError(msg)

            def control(name):  # like sentencepiece: by name, and only a control piece
                i = pieces.index(name) if name in pieces else -1
                return i if i >= 0 and types[i] == CONTROL else -1

            return cls(pieces, scores, types, bos_id=control(tr.get(46, b"<s>").decode()),
                       eos_id=control(tr.get(47, b"</s>").decode()), unk_id=unk[0],
                       add_dummy_prefix=nm.get(3, True), remove_extra_whitespaces=nm.get(4, True),
                       byte_fallback=tr.get(35, False), escape_whitespaces=nm.get(5, True),
                       unk_surface=tr.get(44, DEFAULT_UNK_SURFACE.encode()).decode())
        except (ValueError, IndexError, KeyError, TypeError, AttributeError, struct.error) as e:
            raise ModelFormatError(f"{path}: not a valid SentencePiece BPE model ({e}); the "
                                   "file may be truncated or corrupt") from None

    @classmethod
    def from_llama2c_file(cls, path, vocab_size: int) -> "SentencePieceBPE":
        """Load a llama2.c ``tokenizer.bin``; ``vocab_size`` comes from the model header."""
        path = os.fspath(path)
        data, pos = _read_file(path), 4  # skip max_token_length, a buffer-size hint
        pieces, scores, types = [], [], []
        named = {"\n<s>\n": ("<s>", CONTROL), "\n</s>\n": ("</s>", CONTROL),
                 "<unk>": ("<unk>", UNKNOWN)}
        try:
            for i in range(int(vocab_size)):
                score, n = struct.unpack_from("<fi", data, pos)
                raw, pos = data[pos + 8:pos + 8 + n], pos + 8 + n
                if n <= 0 or len(raw) != n:
                    raise ValueError(f"token {i} has a bad length ({n}) or runs past the end")
                text = raw.decode("utf-8")
                # tokenizer.py wrote <s>/</s> inside newlines and "▁" as " "; undo both
                piece, ptype = named.get(text) or ((text, BYTE) if _BYTE_PIECE_RE.match(text) else
                                                   (text.replace(" ", SPACE_SYMBOL), NORMAL))
                pieces.append(piece), scores.append(score), types.append(ptype)
            if pos != len(data):
                raise ValueError(f"{len(data) - pos} unexpected bytes after the tokens")
            found = [*zip(pieces, types)]
            ids = [found.index(pt) if pt in found else -1 for pt in named.values()]
            return cls(pieces, scores, types, bos_id=ids[0], eos_id=ids[1], unk_id=ids[2],
                       add_dummy_prefix=True, byte_fallback=True)
        except (ValueError, struct.error) as e:
            raise ModelFormatError(f"{path}: not a llama2.c tokenizer with {vocab_size} tokens "
                                   f"({e}; truncated, or vocab_size is wrong?)") from None

    def normalize(self, text: str) -> str:
        """The model's normalisation of ``text``: the string the BPE actually splits."""
        if self.remove_extra_whitespaces:  # only U+0020 counts, as in sentencepiece
            text = re.sub(" {2,}", " ", text.lstrip(" "))
        if not text:
            return ""
        if self.add_dummy_prefix:
            text = " " + text
        if self.escape_whitespaces:
            text = text.replace(" ", SPACE_SYMBOL)
        if self.remove_extra_whitespaces:  # trimmed after escaping: a final literal "▁" goes too
            text = text.rstrip(SPACE_SYMBOL if self.escape_whitespaces else " ")
        return text

    def _encode_part(self, text: str, out: list[int]) -> None:
        if not (s := self.normalize(text)):
            return
        # Initial symbols: characters, except that user-defined pieces (the longest one at each
        # place, leftmost first) stay whole (frozen).
        symbols, frozen = [], []
        for k, part in enumerate(self._user_rx.split(s) if self._user_rx else (s,)):
            symbols += [part] if k % 2 else part
            frozen += [True] if k % 2 else [False] * len(part)
        # Symbols form a linked list over their first positions (nxt/prv; merged-away ones
        # become ''), ended at both sides (index n, or -1) by a frozen empty sentinel. Merges
        # go best score first, then leftmost, as in sentencepiece: ranks number the scores,
        # best first, and cand[left] is the rank of the pair starting at left (-1: none; a
        # position queued under another rank is stale). Positions wait in one bucket per rank,
        # taken in rank order, each in position order; merges made meanwhile of a better rank
        # go to the heap `urgent` (merged first), of the same rank (pieces of equal score) to
        # the heap `later` (merged in position order with the bucket). rev_merge remembers
        # how UNUSED pieces were formed, to split them back (the last candidate written wins).
        rank_of = self._merge_rank
        unused = self._unused
        rev_merge = {}
        buckets = {}
        n = len(symbols)
        symbols.append("")
        frozen.append(True)
        shift = n.bit_length()  # urgent merges are queued as rank << shift | position
        mask = (1 << shift) - 1
        cand = [-1] * (n + 1)
        nxt = [*range(1, n + 2)]
        prv = [*range(-1, n)]
        ranks = []

        def candidate(left, right, current):
            """Queue the merge of the symbols at `left` and `right`, if they make a piece,
            with `current` the rank being merged."""
            cand[left] = -1
            if frozen[left] or frozen[right]:
                return
            a, b = symbols[left], symbols[right]
            if (rank := rank_of.get(a + b)) is None:
                return
            cand[left] = rank
            if a + b in unused:
                rev_merge[a + b] = (a, b)
            if rank < current:
                heappush(urgent, rank << shift | left)
            elif rank == current:
                heappush(later, left)
            elif (bucket := buckets.get(rank)) is not None:
                bucket.append(left)
            else:
                buckets[rank] = [left]
                heappush(ranks, rank)

        for i in range(n - 1):
            candidate(i, i + 1, -1)
        while ranks:
            rank = heappop(ranks)
            todo = sorted(buckets.pop(rank))
            todo.append(n)  # the end
            at = 0
            urgent = []
            later = []
            while True:
                if urgent:
                    key = heappop(urgent)
                    left, r = key & mask, key >> shift
                elif later and later[0] < todo[at]:
                    left, r = heappop(later), rank
                elif (left := todo[at]) < n:
                    at, r = at + 1, rank
                else:
                    break
                if cand[left] != r:
                    continue
                right = nxt[left]
                symbols[left] += symbols[right]
                symbols[right], cand[right] = "", -1
                after = nxt[left] = nxt[right]
                prv[after] = left
                before = prv[left]
                candidate(before, left, rank)
                candidate(left, after, rank)
        symbols.pop()
        resolved = []
        for sym in filter(None, symbols):  # merged-away symbols are ''; the rest are in order
            self._resegment(sym, rev_merge, resolved)
        prev_unk = False
        for piece, pid in resolved:
            if pid != self.unk_id:
                out.append(pid)
            elif self.byte_fallback:  # unknown text becomes one <0xNN> piece per UTF-8 byte
                ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
                if pid < 0 and -1 in ids:
                    raise ValueError(f"cannot encode {piece!r}: no byte piece and no <unk>")
                out.extend(ids)
            elif pid < 0:
                raise ValueError(f"cannot encode {piece!r}: not in the vocabulary and no <unk>")
            elif not prev_unk:  # without byte fallback a run of unknowns is one <unk>
                out.append(pid)
            prev_unk = pid == self.unk_id

    def _resegment(self, piece, rev_merge, out) -> None:
        """Append ``(piece, id)`` for a final symbol, splitting UNUSED pieces back into the
        two symbols they were merged from (an unmerged one counts as unknown)."""
        pid = self._ids.get(piece, self.unk_id)
        if pid >= 0 and self.types[pid] == UNUSED:
            if piece in rev_merge:
                for part in rev_merge[piece]:
                    self._resegment(part, rev_merge, out)
                return
            pid = self.unk_id
        out.append((piece, pid))

    def _surface(self, i, strip):
        """Bytes of a byte piece, else (text, whether a leading "▁" was stripped)."""
        t = self.types[i]
        if t != NORMAL and t != USER_DEFINED and t != UNUSED:
            return self._byte[i] if t == BYTE else self.unk_surface if t == UNKNOWN else "", False
        p = self.pieces[i]
        if strip and p.startswith(SPACE_SYMBOL):
            # with whitespace folding, stripping goes on until real text appears
            return p[1:].replace(SPACE_SYMBOL, " "), not self.remove_extra_whitespaces
        return p.replace(SPACE_SYMBOL, " "), False


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read tokenizer file ({e})") from None


def _varint(buf: bytes, pos: int):
    result = shift = 0
    while shift < 70:
        b = buf[pos]
        result, pos, shift = result | (b & 0x7F) << shift, pos + 1, shift + 7
        if b < 0x80:
            return result, pos
    raise ValueError("varint is longer than 10 bytes")


def _fields(buf: bytes):
    """``(field number, value)`` of one protobuf message: ints, or bytes (wire types 1, 2, 5)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5) and key >> 3:
            size, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise ValueError("a field runs past the end of the data")
        else:
            raise ValueError(f"field {key >> 3} has unsupported wire type {wire}")
        yield key >> 3, value


def _parse_model_proto(data: bytes):
    """Pieces, scores, types, TrainerSpec and NormalizerSpec fields of a ModelProto."""
    pieces, scores, types, specs = [], [], [], {2: {}, 3: {}}
    for field, value in _fields(data):
        if field == 1:
            p = dict(_fields(value))
            pieces.append(p[1].decode("utf-8"))
            scores.append(struct.unpack("<f", p.get(2, bytes(4)))[0])
            types.append(p.get(3, NORMAL))
        elif field in (2, 3):  # repeated occurrences merge, the last value wins
            specs[field].update(_fields(value), _present=True)
    return pieces, scores, types, specs[2], specs[3]


