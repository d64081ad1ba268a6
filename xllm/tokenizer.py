"""SentencePiece-style BPE tokenizer for Llama-family models.

This module re-implements, in plain Python, what ``sentencepiece`` 0.2.x does for
BPE models, so that xllm does not need the ``sentencepiece`` package at run time:

* reading ``tokenizer.model`` (a protobuf ``ModelProto``) with a tiny wire-format
  reader, and llama2.c ``tokenizer.bin`` files;
* encoding: normalisation (identity normaliser, optional whitespace folding,
  dummy-prefix ``▁``), whole-unit user-defined pieces, BPE merges by piece score and
  byte fallback;
* decoding, including sentencepiece's handling of byte pieces that do not form valid
  UTF-8 and of the leading space of the first piece;
* incremental (streaming) decoding that never emits half a character.

Only the parts of the SentencePiece format that Llama-family tokenizers use are
supported.  Models that would need something else (a unigram model, a non-identity
normalisation table, whitespace-as-suffix) are rejected with ``ModelFormatError``
rather than being tokenized slightly wrongly.
"""

from __future__ import annotations

import heapq
import os
import re
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import ModelFormatError

__all__ = [
    "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE",
    "SentencePieceBPE", "StreamDecoder", "load_tokenizer",
]

# Piece types, numbered as in sentencepiece_model.proto (ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_SYMBOL = "\u2581"  # "▁", how SentencePiece writes a space inside pieces
DEFAULT_UNK_SURFACE = " \u2047 "  # sentencepiece's default text for <unk> (" ⁇ ")

_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_SPACE_RUN_RE = re.compile(" {2,}")

# TrainerSpec.model_type value for BPE.
_MODEL_TYPE_BPE = 2
_MODEL_TYPE_NAMES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


# --------------------------------------------------------------------------- protobuf


class _ProtoError(Exception):
    """Malformed protobuf data (converted to ModelFormatError with the file name)."""


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise _ProtoError("data ends inside a varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _ProtoError("varint is longer than 10 bytes")


def _iter_fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)`` for one protobuf message.

    ``value`` is an int for varint fields, ``bytes`` for length-delimited and fixed-size
    fields.  Groups (wire types 3/4) are not used by SentencePiece and are rejected.
    """
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            end = pos + length
            if end > n:
                raise _ProtoError("length-delimited field runs past the end of the data")
            value = buf[pos:end]
            pos = end
        elif wire == 5:
            if pos + 4 > n:
                raise _ProtoError("data ends inside a 32-bit field")
            value = buf[pos:pos + 4]
            pos += 4
        elif wire == 1:
            if pos + 8 > n:
                raise _ProtoError("data ends inside a 64-bit field")
            value = buf[pos:pos + 8]
            pos += 8
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield field, wire, value


def _as_int32(v: int) -> int:
    # Negative int32 values are sign-extended to 64 bits on the wire.
    v &= 0xFFFFFFFFFFFFFFFF
    if v >= 1 << 63:
        v -= 1 << 64
    return v


def _as_str(v, what: str) -> str:
    if not isinstance(v, bytes):
        raise _ProtoError(f"{what} has the wrong wire type")
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtoError(f"{what} is not valid UTF-8") from None


def _parse_model_proto(data: bytes) -> dict:
    """Pull out of a serialized ModelProto the fields the BPE tokenizer needs."""
    pieces: List[str] = []
    scores: List[float] = []
    types: List[int] = []
    trainer: dict = {}
    normalizer: dict = {}
    have_trainer = have_normalizer = False
    for field, wire, value in _iter_fields(data):
        if field == 1:  # repeated SentencePiece pieces
            if wire != 2:
                raise _ProtoError("ModelProto.pieces has the wrong wire type")
            piece, score, ptype = None, 0.0, NORMAL
            for f, w, v in _iter_fields(value):
                if f == 1:
                    piece = _as_str(v, "piece")
                elif f == 2:
                    if w != 5:
                        raise _ProtoError("piece score has the wrong wire type")
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    if w != 0:
                        raise _ProtoError("piece type has the wrong wire type")
                    ptype = v
            if not piece:
                raise _ProtoError(f"piece {len(pieces)} is empty")
            pieces.append(piece)
            scores.append(score)
            types.append(ptype)
        elif field == 2:  # TrainerSpec (repeated occurrences merge, last value wins)
            if wire != 2:
                raise _ProtoError("ModelProto.trainer_spec has the wrong wire type")
            have_trainer = True
            for f, w, v in _iter_fields(value):
                if w == 0 and f in (3, 24, 35, 40, 41, 42, 43):
                    trainer[f] = _as_int32(v)
                elif w == 2 and f in (44, 45, 46, 47, 48):
                    trainer[f] = _as_str(v, "trainer_spec string")
        elif field == 3:  # NormalizerSpec
            if wire != 2:
                raise _ProtoError("ModelProto.normalizer_spec has the wrong wire type")
            have_normalizer = True
            for f, w, v in _iter_fields(value):
                if w == 0 and f in (3, 4, 5):
                    normalizer[f] = bool(v)
                elif w == 2 and f == 1:
                    normalizer[f] = _as_str(v, "normalizer name")
                elif w == 2 and f == 2:
                    normalizer[f] = bytes(v)
    return {
        "pieces": pieces, "scores": scores, "types": types,
        "have_trainer": have_trainer, "have_normalizer": have_normalizer,
        "model_type": trainer.get(3, 1),
        "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
        "byte_fallback": bool(trainer.get(35, 0)),
        "unk_surface": trainer.get(44, DEFAULT_UNK_SURFACE),
        "unk_piece": trainer.get(45, "<unk>"),
        "bos_piece": trainer.get(46, "<s>"),
        "eos_piece": trainer.get(47, "</s>"),
        "normalizer_name": normalizer.get(1, ""),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": normalizer.get(3, True),
        "remove_extra_whitespaces": normalizer.get(4, True),
        "escape_whitespaces": normalizer.get(5, True),
    }


# --------------------------------------------------------------------------- UTF-8


def _decode_bytes(b: bytes) -> str:
    """Decode bytes the way sentencepiece's decoder does.

    Valid UTF-8 characters are kept; every byte at which no valid character starts
    becomes one U+FFFD and decoding resumes at the next byte.  (Python's
    ``errors="replace"`` differs: it folds a truncated sequence into a single U+FFFD.)
    """
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out = []
    i, n = 0, len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        k = _utf8_len(c)
        if k and i + k <= n:
            try:
                out.append(b[i:i + k].decode("utf-8"))
                i += k
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces, 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0


# --------------------------------------------------------------------------- tokenizer


class SentencePieceBPE:
    """A SentencePiece BPE tokenizer (the kind used by Llama 1/2, Mistral, TinyLlama...).

    Build one with :meth:`from_model_file`, :meth:`from_llama2c_file`,
    :meth:`from_pieces` or :func:`load_tokenizer`.  Encoding and decoding give the same
    results as ``sentencepiece.SentencePieceProcessor`` 0.2.x for the same model.

    Attributes:
        vocab_size: number of pieces.
        bos_id, eos_id, unk_id: ids of ``<s>``, ``</s>`` and ``<unk>`` (-1 if absent).
        add_dummy_prefix: a ``▁`` is put in front of non-empty text before encoding.
        remove_extra_whitespaces: leading/trailing spaces are dropped and runs of
            spaces folded into one before encoding.
        byte_fallback: characters outside the vocabulary become ``<0xNN>`` byte
            pieces (otherwise ``<unk>``).
        add_bos_default: whether prompts for this model normally start with BOS.
        special_tokens: text -> id of the control and ``<unk>`` pieces, which
            ``encode(..., parse_special=True)`` matches in the input.
        pieces, scores, types: the vocabulary (types use the NORMAL..BYTE constants).
    """

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos_id: int = 1, eos_id: int = 2, unk_id: int = 0,
                 add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                 byte_fallback: bool = True, escape_whitespaces: bool = True,
                 unk_surface: str = DEFAULT_UNK_SURFACE, add_bos_default: bool = True):
        if not (len(pieces) == len(scores) == len(types)):
            raise ModelFormatError(
                f"tokenizer vocabulary is inconsistent: {len(pieces)} pieces, "
                f"{len(scores)} scores, {len(types)} types")
        if not pieces:
            raise ModelFormatError("tokenizer vocabulary is empty")
        self.pieces: List[str] = [str(p) for p in pieces]
        # Scores are float32 in every format; keep the float32-rounded values so that ties
        # compare the same way as in sentencepiece.
        self.scores: List[float] = [struct.unpack("<f", struct.pack("<f", float(s)))[0]
                                    for s in scores]
        self.types: List[int] = [int(t) for t in types]
        self.vocab_size = len(self.pieces)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            if value is None:
                value = -1
            if not -1 <= value < self.vocab_size:
                raise ModelFormatError(f"{name}={value} is outside the vocabulary "
                                       f"(size {self.vocab_size})")
            setattr(self, name, int(value))
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        self.byte_fallback = bool(byte_fallback)
        self.escape_whitespaces = bool(escape_whitespaces)
        self.unk_surface = unk_surface
        self.add_bos_default = bool(add_bos_default)

        # sentencepiece keeps two maps: "normal" pieces (NORMAL, USER_DEFINED, UNUSED),
        # which are the only ones BPE may merge into, and reserved pieces (CONTROL,
        # UNKNOWN, BYTE), which text can never turn into.  Piece-to-id lookups consult
        # the reserved map first.
        self._merge_score: Dict[str, float] = {}
        self._normal_id: Dict[str, int] = {}
        self._reserved_id: Dict[str, int] = {}
        self._unused: set = set()
        user_defined: List[str] = []
        self._byte_value: Dict[int, int] = {}  # id of a BYTE piece -> its byte
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if not p:
                raise ModelFormatError(f"piece {i} is empty")
            if t in (NORMAL, USER_DEFINED, UNUSED):
                if p in self._normal_id:
                    continue  # first occurrence wins
                self._normal_id[p] = i
                self._merge_score[p] = self.scores[i]
                if t == USER_DEFINED:
                    user_defined.append(p)
                elif t == UNUSED:
                    self._unused.add(p)
            elif t in (UNKNOWN, CONTROL, BYTE):
                self._reserved_id.setdefault(p, i)
                if t == BYTE:
                    m = _BYTE_PIECE_RE.match(p)
                    if not m:
                        raise ModelFormatError(f"byte piece {i} is {p!r}, not <0xNN>")
                    self._byte_value[i] = int(m.group(1), 16)
            else:
                raise ModelFormatError(f"piece {i} ({p!r}) has unknown type {t}")
        # Byte-fallback ids, looked up the same way sentencepiece does (by piece name).
        self._byte_ids = [self.piece_to_id("<0x%02X>" % b) for b in range(256)]
        self.special_tokens = {p: i for p, i in self._reserved_id.items()
                               if self.types[i] != BYTE}
        # Longest first, so that at each position the longest token text wins; the
        # group makes re.split keep the matches (at the odd positions).
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_rx = re.compile("(%s)" % "|".join(map(re.escape, specials)))
        # User-defined pieces are matched greedily (longest first) as single symbols.
        self._user_defined: Dict[str, List[str]] = {}
        for p in sorted(user_defined, key=len, reverse=True):
            self._user_defined.setdefault(p[0], []).append(p)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pieces(cls, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                    bos_id: int = 1, eos_id: int = 2, unk_id: int = 0,
                    add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                    byte_fallback: bool = True) -> "SentencePieceBPE":
        """Build a tokenizer from a vocabulary given as parallel lists (e.g. from GGUF).

        ``pieces`` use ``▁`` for spaces; ``types`` use the NORMAL..BYTE constants.
        Raises ``ModelFormatError`` if the lists are inconsistent.
        """
        return cls(pieces, scores, types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id,
                   add_dummy_prefix=add_dummy_prefix,
                   remove_extra_whitespaces=remove_extra_whitespaces,
                   byte_fallback=byte_fallback)

    @classmethod
    def from_model_file(cls, path) -> "SentencePieceBPE":
        """Load a SentencePiece ``tokenizer.model`` file (a serialized ``ModelProto``).

        Raises ``ModelFormatError`` (naming the file) if the file is missing, is not a
        valid model, is truncated, or is not a BPE model this module can run exactly.
        """
        path = os.fspath(path)
        data = _read_file(path)
        try:
            m = _parse_model_proto(data)
        except _ProtoError as e:
            raise ModelFormatError(
                f"{path}: not a valid SentencePiece model file ({e}); "
                "the file may be truncated or corrupt") from None
        if not m["pieces"]:
            raise ModelFormatError(f"{path}: not a SentencePiece model file (no pieces found)")
        if not m["have_trainer"] or not m["have_normalizer"]:
            raise ModelFormatError(
                f"{path}: SentencePiece model has no trainer/normalizer spec "
                "(the file may be truncated)")
        if m["model_type"] != _MODEL_TYPE_BPE:
            name = _MODEL_TYPE_NAMES.get(m["model_type"], str(m["model_type"]))
            raise ModelFormatError(f"{path}: SentencePiece model type is {name}; "
                                   "only BPE models are supported")
        if m["precompiled_charsmap"]:
            raise ModelFormatError(
                f"{path}: the model uses the {m['normalizer_name'] or 'custom'!r} "
                "normalisation table; only the identity normaliser is supported")
        if m["treat_whitespace_as_suffix"]:
            raise ModelFormatError(f"{path}: treat_whitespace_as_suffix is not supported")
        pieces, types = m["pieces"], m["types"]
        if m["byte_fallback"] is False and BYTE in types:
            raise ModelFormatError(f"{path}: model has byte pieces but byte_fallback is off")
        unk_ids = [i for i, t in enumerate(types) if t == UNKNOWN]
        if len(unk_ids) != 1:
            raise ModelFormatError(
                f"{path}: a SentencePiece model needs exactly one <unk> piece, found {len(unk_ids)}")

        # Like sentencepiece, find <s> and </s> by piece name and accept only control pieces.
        def control_id(name: str) -> int:
            for i, (p, t) in enumerate(zip(pieces, types)):
                if p == name:
                    return i if t == CONTROL else -1
            return -1

        try:
            return cls(pieces, m["scores"], types,
                       bos_id=control_id(m["bos_piece"]), eos_id=control_id(m["eos_piece"]),
                       unk_id=unk_ids[0],
                       add_dummy_prefix=m["add_dummy_prefix"],
                       remove_extra_whitespaces=m["remove_extra_whitespaces"],
                       byte_fallback=m["byte_fallback"],
                       escape_whitespaces=m["escape_whitespaces"],
                       unk_surface=m["unk_surface"])
        except ModelFormatError as e:
            raise ModelFormatError(f"{path}: {e}") from None

    @classmethod
    def from_llama2c_file(cls, path, vocab_size: int) -> "SentencePieceBPE":
        """Load a llama2.c ``tokenizer.bin`` file.

        The file does not store the vocabulary size, so the caller passes it (the
        model header's ``vocab_size``).  Piece types are inferred (``<0xNN>`` byte
        pieces, ``\\n<s>\\n``/``\\n</s>\\n`` controls, ``<unk>``) and spaces are turned
        back into ``▁``.  The normaliser matches llama2.c ``run.c``: dummy prefix on,
        no whitespace folding.
        """
        path = os.fspath(path)
        vocab_size = int(vocab_size)
        if vocab_size <= 0:
            raise ModelFormatError(f"{path}: vocab_size must be positive, got {vocab_size}")
        data = _read_file(path)
        n = len(data)
        if n < 4:
            raise ModelFormatError(f"{path}: too short for a llama2.c tokenizer file ({n} bytes)")
        pos = 4  # skip max_token_length; it is only a buffer-size hint for run.c
        pieces: List[str] = []
        scores: List[float] = []
        types: List[int] = []
        entry = struct.Struct("<fi")
        for i in range(vocab_size):
            if pos + 8 > n:
                raise ModelFormatError(
                    f"{path}: llama2.c tokenizer file ends after {i} of {vocab_size} tokens "
                    "(truncated, or vocab_size is wrong)")
            score, length = entry.unpack_from(data, pos)
            pos += 8
            if length <= 0 or pos + length > n:
                raise ModelFormatError(
                    f"{path}: token {i} has a bad length ({length}) or runs past the end "
                    "of the file (truncated, or not a llama2.c tokenizer)")
            raw = data[pos:pos + length]
            pos += length
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ModelFormatError(f"{path}: token {i} is not valid UTF-8") from None
            # llama2.c's tokenizer.py wrote <s>/</s> with surrounding newlines and
            # replaced "▁" by " "; undo both.
            if text == "\n<s>\n":
                piece, ptype = "<s>", CONTROL
            elif text == "\n</s>\n":
                piece, ptype = "</s>", CONTROL
            elif text == "<unk>":
                piece, ptype = text, UNKNOWN
            elif _BYTE_PIECE_RE.match(text):
                piece, ptype = text, BYTE
            else:
                piece, ptype = text.replace(" ", SPACE_SYMBOL), NORMAL
            pieces.append(piece)
            scores.append(score)
            types.append(ptype)
        if pos != n:
            raise ModelFormatError(
                f"{path}: {n - pos} unexpected bytes after {vocab_size} tokens "
                "(is vocab_size right?)")

        def find(piece: str, ptype: int) -> int:
            for i, (p, t) in enumerate(zip(pieces, types)):
                if p == piece and t == ptype:
                    return i
            return -1

        try:
            return cls(pieces, scores, types,
                       bos_id=find("<s>", CONTROL), eos_id=find("</s>", CONTROL),
                       unk_id=find("<unk>", UNKNOWN),
                       add_dummy_prefix=True, remove_extra_whitespaces=False,
                       byte_fallback=True)
        except ModelFormatError as e:
            raise ModelFormatError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ lookups

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i`` (``▁`` for spaces, ``<0xNN>`` for bytes)."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return self.pieces[i]

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``, or ``unk_id`` if it is not in the vocabulary."""
        i = self._reserved_id.get(piece)
        if i is None:
            i = self._normal_id.get(piece, self.unk_id)
        return i

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding

    def normalize(self, text: str) -> str:
        """Apply the model's normalisation: the string the BPE actually splits."""
        if self.remove_extra_whitespaces:
            # Only U+0020 counts as whitespace here, as in sentencepiece.
            text = _SPACE_RUN_RE.sub(" ", text.lstrip(" "))
        if not text:
            return ""
        if self.add_dummy_prefix:
            text = " " + text
        if self.escape_whitespaces:
            text = text.replace(" ", SPACE_SYMBOL)
        if self.remove_extra_whitespaces:
            # sentencepiece trims trailing spaces *after* escaping them, so a literal
            # "▁" at the end of the input goes too (and "▁" alone encodes to nothing).
            text = text.rstrip(SPACE_SYMBOL if self.escape_whitespaces else " ")
        return text

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False) -> List[int]:
        """Encode ``text`` into token ids, like ``SentencePieceProcessor.encode``.

        Text that looks like a special token (``"<s>"``) is encoded as plain text,
        unless ``parse_special=True``: then control and ``<unk>`` piece texts become
        those pieces and the text between them is encoded on its own, as llama.cpp
        does (each part gets the dummy-prefix space).  ``add_bos``/``add_eos`` add
        ``bos_id``/``eos_id`` (a ``ValueError`` if the model has none).
        """
        ids: List[int] = []
        if add_bos:
            if self.bos_id < 0:
                raise ValueError("this tokenizer has no BOS token")
            ids.append(self.bos_id)
        parts = self._special_rx.split(text) if parse_special and self.special_tokens else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
                continue
            normalized = self.normalize(part)
            if normalized:
                self._encode_normalized(normalized, ids)
        if add_eos:
            if self.eos_id < 0:
                raise ValueError("this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _split_symbols(self, s: str) -> Tuple[List[str], Optional[List[bool]]]:
        """Initial symbols: one per character, except user-defined pieces stay whole."""
        if not self._user_defined:
            return list(s), None
        symbols: List[str] = []
        frozen: List[bool] = []
        i, n = 0, len(s)
        ud = self._user_defined
        while i < n:
            for p in ud.get(s[i], ()):
                if s.startswith(p, i):
                    symbols.append(p)
                    frozen.append(True)
                    i += len(p)
                    break
            else:
                symbols.append(s[i])
                frozen.append(False)
                i += 1
        return symbols, frozen

    def _encode_normalized(self, s: str, out: List[int]) -> None:
        symbols, frozen = self._split_symbols(s)
        merge_score = self._merge_score
        n = len(symbols)
        # rev_merge records how an UNUSED piece was formed, so that it can be split back
        # into its parts afterwards (sentencepiece records every candidate pair, the
        # last one written wins).
        unused = self._unused
        rev_merge: Dict[str, Tuple[str, str]] = {}

        # Symbols form a doubly linked list (prev/nxt); a merged-away symbol becomes ''.
        # The heap holds candidate merges (-score, left, right, merged length): the best
        # score pops first, ties go to the leftmost pair.  Entries are not removed when a
        # neighbour changes; instead they are dropped when popped if either side is gone
        # or the lengths no longer add up (symbols only ever grow, so this is exact).
        heap = []
        if n > 1:
            for i in range(n - 1):
                if frozen is not None and (frozen[i] or frozen[i + 1]):
                    continue
                a, b = symbols[i], symbols[i + 1]
                m = a + b
                score = merge_score.get(m)
                if score is not None:
                    heap.append((-score, i, i + 1, len(m)))
                    if m in unused:
                        rev_merge[m] = (a, b)
            heapq.heapify(heap)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heappop, heappush = heapq.heappop, heapq.heappush

        while heap:
            _, left, right, size = heappop(heap)
            a = symbols[left]
            b = symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # stale candidate
            merged = a + b
            symbols[left] = merged
            symbols[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0 and (frozen is None or not frozen[before]):
                c = symbols[before]
                m = c + merged
                score = merge_score.get(m)
                if score is not None:
                    heappush(heap, (-score, before, left, len(m)))
                    if m in unused:
                        rev_merge[m] = (c, merged)
            if after >= 0 and (frozen is None or not frozen[after]):
                c = symbols[after]
                m = merged + c
                score = merge_score.get(m)
                if score is not None:
                    heappush(heap, (-score, left, after, len(m)))
                    if m in unused:
                        rev_merge[m] = (merged, c)

        # Map the final symbols to ids (UNUSED pieces are first split back into parts).
        resolved: List[Tuple[str, int]] = []
        i = 0
        while i != -1:
            self._resegment(symbols[i], rev_merge, resolved)
            i = nxt[i]
        unk_id = self.unk_id
        prev_unk = False
        for piece, pid in resolved:
            if pid != unk_id:
                out.append(pid)
                prev_unk = False
                continue
            if self.byte_fallback:
                # Out-of-vocabulary text becomes one <0xNN> piece per UTF-8 byte.
                byte_ids = self._byte_ids
                ids = [byte_ids[b] for b in piece.encode("utf-8")]
                if unk_id < 0 and -1 in ids:
                    raise ValueError(f"cannot encode {piece!r}: no byte piece and no <unk>")
                out.extend(ids)
            else:
                if unk_id < 0:
                    raise ValueError(f"cannot encode {piece!r}: not in the vocabulary "
                                     "and the tokenizer has no <unk>")
                # Without byte fallback, sentencepiece folds a run of unknown symbols
                # into a single <unk>.
                if not prev_unk:
                    out.append(unk_id)
            prev_unk = True

    def _resegment(self, piece: str, rev_merge: Dict[str, Tuple[str, str]],
                   out: List[Tuple[str, int]]) -> None:
        """Append ``(piece, id)`` for one final symbol, splitting UNUSED pieces back
        into the two symbols they were merged from (recursively)."""
        pid = self._reserved_id.get(piece)
        if pid is None:
            pid = self._normal_id.get(piece)
            if pid is None:
                pid = self.unk_id
            elif piece in self._unused:
                if piece in rev_merge:
                    a, b = rev_merge[piece]
                    self._resegment(a, rev_merge, out)
                    self._resegment(b, rev_merge, out)
                    return
                # An UNUSED piece that was never merged (a single character) may not
                # be output; sentencepiece 0.2.x treats it as unknown (-> bytes/<unk>).
                pid = self.unk_id
        out.append((piece, pid))

    # ------------------------------------------------------------------ decoding

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return i

    def _strips_bos_space(self) -> bool:
        # sentencepiece removes the leading "▁" of the first piece only when the
        # normaliser could have put it there.
        return self.add_dummy_prefix or self.remove_extra_whitespaces

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text exactly like ``SentencePieceProcessor.decode``.

        Control pieces vanish, ``<unk>`` becomes ``" ⁇ "``, runs of byte pieces are
        joined and UTF-8-decoded (each byte that does not start a valid character
        becomes U+FFFD), ``▁`` becomes a space, and the leading space of the first
        piece is dropped (when the model adds a dummy prefix).
        """
        types, pieces, byte_value = self.types, self.pieces, self._byte_value
        out: List[str] = []
        pending = bytearray()
        text_nonempty = False
        is_bos_ws = self._strips_bos_space()
        bos_ws_seen = False
        for i in ids:
            i = self._check_id(i)
            t = types[i]
            if t == BYTE:
                pending.append(byte_value[i])
                continue
            if pending:
                out.append(_decode_bytes(bytes(pending)))
                pending.clear()
                text_nonempty = True
            if bos_ws_seen or text_nonempty:
                is_bos_ws = False
            surface, bos_ws_seen = self._piece_surface(i, t, is_bos_ws)
            if surface:
                out.append(surface)
                text_nonempty = True
        if pending:
            out.append(_decode_bytes(bytes(pending)))
        return "".join(out)

    def _piece_surface(self, i: int, t: int, is_bos_ws: bool) -> Tuple[str, bool]:
        """Text of one non-byte piece, and whether a leading "▁" was stripped from it."""
        if t == CONTROL:
            return "", False
        if t == UNKNOWN:
            return self.unk_surface, False
        piece = self.pieces[i]
        stripped = False
        if is_bos_ws and piece.startswith(SPACE_SYMBOL):
            piece = piece[1:]
            # With whitespace folding every leading space was removed at encode time,
            # so sentencepiece keeps stripping until real text appears.
            stripped = not self.remove_extra_whitespaces
        return piece.replace(SPACE_SYMBOL, " "), stripped

    def decoder(self, strip_leading_space: bool = True) -> "StreamDecoder":
        """A :class:`StreamDecoder` for decoding ids one at a time.

        With ``strip_leading_space=True`` the joined output equals :meth:`decode` of all
        ids; with ``False`` it is the text these ids produce after earlier text (no
        leading space is removed), e.g. when continuing a prompt.
        """
        return StreamDecoder(self, strip_leading_space)


class StreamDecoder:
    """Incremental decoder: feed ids with :meth:`push`, finish with :meth:`flush`.

    ``"".join(d.push(i) for i in ids) + d.flush()`` equals ``tok.decode(ids)`` (for
    ``strip_leading_space=True``).  Byte pieces that may still be part of an incomplete
    UTF-8 character are held back, so :meth:`push` never returns half a character.
    """

    def __init__(self, tokenizer: SentencePieceBPE, strip_leading_space: bool = True):
        self._tok = tokenizer
        self._pending = bytearray()
        self._text_nonempty = False
        self._is_bos_ws = bool(strip_leading_space) and tokenizer._strips_bos_space()
        self._bos_ws_seen = False

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now certain ('' if waiting for bytes)."""
        tok = self._tok
        i = tok._check_id(token_id)
        t = tok.types[i]
        if t == BYTE:
            self._pending.append(tok._byte_value[i])
            return self._settled_bytes()
        text = self._flush_bytes()
        if self._bos_ws_seen or self._text_nonempty:
            self._is_bos_ws = False
        surface, self._bos_ws_seen = tok._piece_surface(i, t, self._is_bos_ws)
        if surface:
            self._text_nonempty = True
        return text + surface

    def flush(self) -> str:
        """Return whatever is held back; incomplete characters become U+FFFD."""
        return self._flush_bytes()

    def _flush_bytes(self) -> str:
        if not self._pending:
            return ""
        text = _decode_bytes(bytes(self._pending))
        self._pending.clear()
        self._text_nonempty = True
        return text

    def _settled_bytes(self) -> str:
        """Decode the pending bytes up to the first character that might still change.

        A character at position p is final once its bytes are all here, or once one of
        the bytes after the lead is not a continuation byte (then the lead is invalid
        whatever comes next).  Only a possibly-valid incomplete tail is kept.
        """
        b = self._pending
        n = len(b)
        p = 0
        while p < n:
            k = _utf8_len(b[p])
            if k == 0 or p + k <= n:
                # Decided now: valid char, or invalid lead byte, or enough bytes to judge.
                p += k if k and _valid_at(b, p, k) else 1
                continue
            if all(0x80 <= c < 0xC0 for c in b[p + 1:]):
                break  # may still become a valid character
            p += 1  # a non-continuation byte follows: the lead is invalid
        if p == 0:
            return ""
        # Everything before p decodes the same way now as it will at the end.
        text = _decode_bytes(bytes(b[:p]))
        del b[:p]
        self._text_nonempty = True
        return text


def _valid_at(b: bytearray, p: int, k: int) -> bool:
    try:
        bytes(b[p:p + k]).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------- loading


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: tokenizer file not found") from None
    except IsADirectoryError:
        raise ModelFormatError(f"{path}: is a directory, not a tokenizer file") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read tokenizer file ({e})") from None


def load_tokenizer(path, vocab_size: Optional[int] = None):
    """Load a tokenizer file, choosing the format from its name and contents.

    * ``*.model``: SentencePiece protobuf (``tokenizer.model``).
    * ``*.bin``: llama2.c tokenizer; needs ``vocab_size`` (from the model header).
    * ``*.gguf``: the vocabulary in a GGUF file's metadata (``tokenizer.ggml.model``
      ``llama`` -> :class:`SentencePieceBPE`, ``gpt2`` -> ``xllm.bpe.ByteLevelBPE``).
    * ``*.json``: a Hugging Face ``tokenizer.json`` (byte-level BPE).
    * any other name: tried as a SentencePiece model, then (if ``vocab_size`` is
      given) as a llama2.c file.

    Raises ``ModelFormatError`` naming the file if it is missing, corrupt, truncated
    or of an unknown format.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".model":
        return SentencePieceBPE.from_model_file(path)
    if suffix == ".gguf":
        return tokenizer_from_gguf(read_gguf_metadata(path), path)
    if suffix == ".json":
        from .bpe import ByteLevelBPE
        return ByteLevelBPE.from_tokenizer_json(path)
    if suffix == ".bin":
        if vocab_size is None:
            raise ModelFormatError(
                f"{path}: a llama2.c tokenizer .bin needs vocab_size (from the model header)")
        return SentencePieceBPE.from_llama2c_file(path, vocab_size)
    # Unknown name: sniff.  (The first byte cannot tell them apart: a llama2.c file
    # whose max_token_length is 10 starts with 0x0A, like a protobuf.)
    try:
        return SentencePieceBPE.from_model_file(path)
    except ModelFormatError as e:
        if vocab_size is None:
            raise ModelFormatError(
                f"{path}: not a SentencePiece tokenizer.model ({e}); if it is a llama2.c "
                "tokenizer .bin, pass vocab_size") from None
        sp_error = e
    try:
        return SentencePieceBPE.from_llama2c_file(path, vocab_size)
    except ModelFormatError as e:
        raise ModelFormatError(
            f"{path}: unknown tokenizer format: not a SentencePiece model ({sp_error}) "
            f"and not a llama2.c tokenizer ({e})") from None


# --------------------------------------------------------------------------- GGUF

def read_gguf_metadata(source) -> dict:
    """The key/value metadata of a GGUF file (a path, or an open ``gguf.GGUFReader``) as Python
    values (arrays as lists). Raises ``ModelFormatError`` naming the file."""
    reader = source
    if isinstance(source, (str, os.PathLike)):
        from gguf import GGUFReader
        try:
            reader = GGUFReader(os.fspath(source))
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{os.fspath(source)}: not a valid GGUF file ({e}); "
                                   "the file may be truncated or corrupt") from None
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tokenizer_from_gguf(meta: dict, name: str = "GGUF file"):
    """Build the tokenizer described by GGUF metadata (see :func:`read_gguf_metadata`).

    ``tokenizer.ggml.model`` ``llama`` gives a :class:`SentencePieceBPE`, ``gpt2`` an
    ``xllm.bpe.ByteLevelBPE``; anything else raises ``ModelFormatError`` naming ``name``.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    get = meta.get
    try:
        if model not in ("llama", "gpt2"):
            raise ModelFormatError(f"tokenizer model {model!r} is not supported "
                                   "(only 'llama' and 'gpt2')")
        if not isinstance(tokens, list) or not tokens:
            raise ModelFormatError("no tokenizer.ggml.tokens")
        if model == "gpt2":
            from .bpe import ByteLevelBPE
            return ByteLevelBPE.from_gguf_fields(
                tokens, get("tokenizer.ggml.merges", []), types,
                get("tokenizer.ggml.pre", "default"),
                bos_id=get("tokenizer.ggml.bos_token_id", -1),
                eos_id=get("tokenizer.ggml.eos_token_id", -1),
                unk_id=get("tokenizer.ggml.unknown_token_id", -1),
                add_bos=get("tokenizer.ggml.add_bos_token", False))
        # llama.cpp's defaults for SentencePiece vocabularies.
        return SentencePieceBPE(
            tokens, get("tokenizer.ggml.scores", [0.0] * len(tokens)),
            types or [NORMAL] * len(tokens),
            bos_id=get("tokenizer.ggml.bos_token_id", 1),
            eos_id=get("tokenizer.ggml.eos_token_id", 2),
            unk_id=get("tokenizer.ggml.unknown_token_id", 0),
            add_dummy_prefix=get("tokenizer.ggml.add_space_prefix", True),
            byte_fallback=BYTE in (types or ()),
            add_bos_default=get("tokenizer.ggml.add_bos_token", True))
    except ModelFormatError as e:
        raise ModelFormatError(f"{name}: {e}") from None
