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
from heapq import heappush

from ..errors import ModelFormatError
from .base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer, alternation
from .merge_order import merge_positions
from .sentencepiece_model import (BPE, MODEL_TYPES, UNIGRAM, NormalizerField, TrainerField,
                                  read_model_proto)

SPACE_SYMBOL = "\u2581"  # "▁", how SentencePiece writes a space inside pieces
DEFAULT_UNK_SURFACE = " \u2047 "  # sentencepiece's default text for <unk> (" ⁇ ")
_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
# Piece types that merges can make; the others (CONTROL, UNKNOWN, BYTE) are reserved.
_MERGEABLE = (NORMAL, USER_DEFINED, UNUSED)
_RESERVED = (UNKNOWN, CONTROL, BYTE)
# How llama2.c's tokenizer.py wrote the pieces that are not plain text: (piece, type).
_LLAMA2C_NAMED = {"\n<s>\n": ("<s>", CONTROL), "\n</s>\n": ("</s>", CONTROL),
                  "<unk>": ("<unk>", UNKNOWN)}
_LLAMA2C_HEADER = 4  # max_token_length, a buffer-size hint
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
        self.byte_fallback = bool(byte_fallback)
        self.escape_whitespaces = bool(escape_whitespaces)
        self.unk_surface = unk_surface
        self.add_bos_default = bool(add_bos_default)
        self._strips_space = self.add_dummy_prefix or self.remove_extra_whitespaces
        mergeable, reserved, byte_of = self._index_pieces()
        self._byte = byte_of  # the byte each byte piece decodes to
        self._ids = {**mergeable, **reserved}  # reserved pieces win piece-to-id lookups
        self._merge_rank = _merge_ranks(mergeable, self.scores)
        self._unused = {p for p, i in mergeable.items() if self.types[i] == UNUSED}
        self._user_rx = alternation(p for p, i in mergeable.items()
                                    if self.types[i] == USER_DEFINED)
        self._byte_ids = [self.piece_to_id("<0x%02X>" % b) for b in range(256)]
        self._set_special({p: i for p, i in reserved.items() if self.types[i] != BYTE})

    def _index_pieces(self):
        """``{piece: id}`` of the mergeable pieces and of the reserved ones (the first
        occurrence of a piece wins), and ``{id: byte}`` of the byte pieces; checks every piece."""
        mergeable = {}
        reserved = {}
        byte_of = {}
        for i, (piece, kind) in enumerate(zip(self.pieces, self.types)):
            if not piece:
                raise ModelFormatError(f"piece {i} is empty")
            if kind in _MERGEABLE:
                mergeable.setdefault(piece, i)
            elif kind in _RESERVED:
                reserved.setdefault(piece, i)
                if kind == BYTE:
                    byte_of[i] = _byte_of_piece(i, piece)
            else:
                raise ModelFormatError(f"piece {i} ({piece!r}) has unknown type {kind}")
        return mergeable, reserved, byte_of

    @classmethod
    def from_model_file(cls, path) -> "SentencePieceBPE":
        """Load a SentencePiece ``tokenizer.model`` (a serialized ``ModelProto``)."""
        path = os.fspath(path)
        data = _read_file(path)
        try:
            model = read_model_proto(data)
            _check_supported(model)
            trainer = model.trainer
            normalizer = model.normalizer
            bos_piece = trainer.get(TrainerField.BOS_PIECE, b"<s>").decode()
            eos_piece = trainer.get(TrainerField.EOS_PIECE, b"</s>").decode()
            unk_surface = trainer.get(TrainerField.UNK_SURFACE, DEFAULT_UNK_SURFACE.encode())
            return cls(model.pieces, model.scores, model.types,
                       bos_id=_control_id(model, bos_piece),
                       eos_id=_control_id(model, eos_piece),
                       unk_id=model.types.index(UNKNOWN),
                       add_dummy_prefix=normalizer.get(NormalizerField.ADD_DUMMY_PREFIX, True),
                       remove_extra_whitespaces=normalizer.get(
                           NormalizerField.REMOVE_EXTRA_WHITESPACES, True),
                       byte_fallback=trainer.get(TrainerField.BYTE_FALLBACK, False),
                       escape_whitespaces=normalizer.get(NormalizerField.ESCAPE_WHITESPACES, True),
                       unk_surface=unk_surface.decode())
        except (ValueError, IndexError, KeyError, TypeError, AttributeError, struct.error) as e:
            raise ModelFormatError(f"{path}: not a valid SentencePiece BPE model ({e}); the "
                                   "file may be truncated or corrupt") from None

    @classmethod
    def from_llama2c_file(cls, path, vocab_size: int) -> "SentencePieceBPE":
        """Load a llama2.c ``tokenizer.bin``; ``vocab_size`` comes from the model header."""
        path = os.fspath(path)
        data = _read_file(path)
        try:
            pieces, scores, types = _read_llama2c_tokens(data, vocab_size)
            return cls(pieces, scores, types,
                       bos_id=_first_id(pieces, types, "<s>", CONTROL),
                       eos_id=_first_id(pieces, types, "</s>", CONTROL),
                       unk_id=_first_id(pieces, types, "<unk>", UNKNOWN),
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
        normalized = self.normalize(text)
        if not normalized:
            return
        symbols, frozen = self._initial_symbols(normalized)
        formed_from = _merge_by_score(symbols, frozen, self._merge_rank, self._unused)
        final = []
        for symbol in filter(None, symbols):  # merged-away symbols are ''; the rest are in order
            self._resegment(symbol, formed_from, final)
        self._append_ids(final, out)

    def _initial_symbols(self, text):
        """The symbols BPE starts from: the characters of ``text``, except that user-defined
        pieces (the longest one at each place, leftmost first) stay whole, and those are
        frozen: they never merge. Returns the symbols and, for each, whether it is frozen."""
        if not self._user_rx:
            return list(text), [False] * len(text)
        symbols = []
        frozen = []
        for k, part in enumerate(self._user_rx.split(text)):
            if k % 2:  # a user-defined piece
                symbols.append(part)
                frozen.append(True)
            else:
                symbols += part
                frozen += [False] * len(part)
        return symbols, frozen

    def _resegment(self, piece, formed_from, out) -> None:
        """Append ``(piece, id)`` for a final symbol, splitting UNUSED pieces back into the
        two symbols they were merged from (an unmerged one counts as unknown)."""
        pid = self._ids.get(piece, self.unk_id)
        if pid >= 0 and self.types[pid] == UNUSED:
            if piece in formed_from:
                for part in formed_from[piece]:
                    self._resegment(part, formed_from, out)
                return
            pid = self.unk_id
        out.append((piece, pid))

    def _append_ids(self, final, out) -> None:
        """Append the ids of the ``(piece, id)`` of ``final`` to ``out``, unknown pieces as
        bytes (with byte fallback) or as <unk> (one for a run of them, as sentencepiece does)."""
        prev_unk = False
        for piece, pid in final:
            if pid != self.unk_id:
                out.append(pid)
            elif self.byte_fallback:  # unknown text becomes one <0xNN> piece per UTF-8 byte
                ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
                if pid < 0 and -1 in ids:
                    raise ValueError(f"cannot encode {piece!r}: no byte piece and no <unk>")
                out.extend(ids)
            elif pid < 0:
                raise ValueError(f"cannot encode {piece!r}: not in the vocabulary and no <unk>")
            elif not prev_unk:
                out.append(pid)
            prev_unk = pid == self.unk_id

    def _surface(self, i, strip):
        """Bytes of a byte piece, else (text, whether a leading "▁" was stripped)."""
        kind = self.types[i]
        if kind == BYTE:
            return self._byte[i], False
        if kind == UNKNOWN:
            return self.unk_surface, False
        if kind == CONTROL:
            return "", False
        piece = self.pieces[i]
        if strip and piece.startswith(SPACE_SYMBOL):
            # with whitespace folding, stripping goes on until real text appears
            return piece[1:].replace(SPACE_SYMBOL, " "), not self.remove_extra_whitespaces
        return piece.replace(SPACE_SYMBOL, " "), False


def _merge_by_score(symbols, frozen, merge_rank, unused):
    """Merge adjacent ``symbols`` in place as sentencepiece does: always the pair that makes
    the piece of best rank, the leftmost of equals (see merge_order.py); ``frozen`` symbols
    never merge, and a merged-away symbol becomes ''. Returns ``{piece: (left, right)}`` for
    the pieces of ``unused`` made on the way (the last pair that could make one wins), to
    split them back."""
    n = len(symbols)
    symbols.append("")  # the sentinel: empty and frozen
    frozen.append(True)
    rank_at = [-1] * (n + 1)
    next_of = list(range(1, n + 2))
    prev_of = list(range(-1, n))
    buckets = {}
    bucket_ranks = []  # a heap of the ranks that have a bucket
    urgent = []  # a heap of (rank, position)
    later = []  # a heap of positions
    formed_from = {}

    def queue(left, right, current):
        """Queue the pair at ``left`` and ``right`` if it makes a piece; ``current`` is the
        rank being merged."""
        rank_at[left] = -1
        if frozen[left] or frozen[right]:
            return
        merged = symbols[left] + symbols[right]
        rank = merge_rank.get(merged)
        if rank is None:
            return
        rank_at[left] = rank
        if merged in unused:
            formed_from[merged] = (symbols[left], symbols[right])
        if rank < current:
            heappush(urgent, (rank, left))
        elif rank == current:
            heappush(later, left)
        elif rank in buckets:
            buckets[rank].append(left)
        else:
            buckets[rank] = [left]
            heappush(bucket_ranks, rank)

    for i in range(n - 1):
        queue(i, i + 1, -1)
    for left, rank in merge_positions(n, rank_at, buckets, bucket_ranks, urgent, later):
        right = next_of[left]
        after = next_of[right]
        symbols[left] += symbols[right]
        symbols[right] = ""
        rank_at[right] = -1
        next_of[left] = after
        prev_of[after] = left
        queue(prev_of[left], left, rank)
        queue(left, after, rank)
    symbols.pop()
    return formed_from


def _merge_ranks(mergeable, scores):
    """``{piece: rank}`` of the mergeable pieces: ranks number the scores, best first; equal
    scores share a rank, and NaN ranks last."""
    by_score = sorted({s for s in scores if s == s}, reverse=True)  # s == s: not NaN
    rank_of_score = {s: r for r, s in enumerate(by_score)}
    nan_rank = len(by_score)
    return {p: rank_of_score.get(scores[i], nan_rank) for p, i in mergeable.items()}


def _byte_of_piece(i, piece):
    """The byte that the byte piece ``<0xNN>`` (id ``i``) stands for."""
    match = _BYTE_PIECE_RE.match(piece)
    if not match:
        raise ModelFormatError(f"byte piece {i} is {piece!r}, not <0xNN>")
    return bytes([int(match.group(1), 16)])


def _check_supported(model):
    """Raise ValueError at the first thing of ``model`` (a ``ModelProto``) that this
    tokenizer would not do exactly as sentencepiece does."""
    trainer = model.trainer or {}
    normalizer = model.normalizer or {}
    table = normalizer.get(NormalizerField.NAME, b"custom").decode()
    model_type = trainer.get(TrainerField.MODEL_TYPE, UNIGRAM)
    unknown_count = model.types.count(UNKNOWN)
    if not model.pieces:
        raise ValueError("no pieces found")
    if model.trainer is None or model.normalizer is None:
        raise ValueError("no trainer/normalizer spec (the file may be truncated)")
    if model_type != BPE:
        raise ValueError(f"model type is {MODEL_TYPES.get(model_type, model_type)}; only BPE "
                         "models are supported")
    if normalizer.get(NormalizerField.PRECOMPILED_CHARSMAP):
        raise ValueError(f"it uses the {table!r} normalisation table; only the identity "
                         "normaliser is supported")
    if trainer.get(TrainerField.TREAT_WHITESPACE_AS_SUFFIX):
        raise ValueError("treat_whitespace_as_suffix is not supported")
    if not trainer.get(TrainerField.BYTE_FALLBACK) and BYTE in model.types:
        raise ValueError("byte pieces but byte_fallback is off")
    if unknown_count != 1:
        raise ValueError(f"needs exactly one <unk> piece, found {unknown_count}")


def _control_id(model, name):
    """The id of the BOS or EOS piece ``name``: like sentencepiece, found by its text, and
    only a control piece counts (-1 if there is none)."""
    if name not in model.pieces:
        return -1
    i = model.pieces.index(name)
    return i if model.types[i] == CONTROL else -1


def _read_llama2c_tokens(data, vocab_size):
    """Pieces, scores and types of a llama2.c ``tokenizer.bin``: after the header, each token
    is a float32 score, an int32 length and that many bytes of UTF-8 text."""
    pieces = []
    scores = []
    types = []
    pos = _LLAMA2C_HEADER
    for i in range(int(vocab_size)):
        score, size = struct.unpack_from("<fi", data, pos)
        pos += 8
        raw = data[pos:pos + size]
        pos += size
        if size <= 0 or len(raw) != size:
            raise ValueError(f"token {i} has a bad length ({size}) or runs past the end")
        piece, kind = _llama2c_piece(raw.decode("utf-8"))
        pieces.append(piece)
        scores.append(score)
        types.append(kind)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} unexpected bytes after the tokens")
    return pieces, scores, types


def _llama2c_piece(text):
    """``(piece, type)`` of a llama2.c token: its tokenizer.py wrote <s>/</s> inside newlines
    and "▁" as " "; both are undone."""
    if text in _LLAMA2C_NAMED:
        return _LLAMA2C_NAMED[text]
    if _BYTE_PIECE_RE.match(text):
        return text, BYTE
    return text.replace(" ", SPACE_SYMBOL), NORMAL


def _first_id(pieces, types, piece, kind):
    """The first id of ``piece`` with type ``kind``, or -1."""
    for i, (p, t) in enumerate(zip(pieces, types)):
        if p == piece and t == kind:
            return i
    return -1


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read tokenizer file ({e})") from None
