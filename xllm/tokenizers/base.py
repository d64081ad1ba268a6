"""What every xllm tokenizer shares: token types, ids and lookups, special-token splitting,
escaping, BOS/EOS and (streaming) decoding. SentencePieceBPE and ByteLevelBPE build on it."""
import codecs
import re

from ..errors import ModelFormatError

# Piece types, numbered as in sentencepiece_model.proto.
NORMAL = 1
UNKNOWN = 2
CONTROL = 3
USER_DEFINED = 4
UNUSED = 5
BYTE = 6
#: The mark of escaped text (see ``escape_special``): a noncharacter, one of the code points
#: Unicode keeps for a program's internal use.
ESCAPE_MARK = "\ufdd0"


class Tokenizer:
    """What SentencePieceBPE and ByteLevelBPE share: ids, lookups, special-token splitting,
    BOS/EOS and (streaming) decoding. Subclasses provide ``_encode_part`` and ``_surface``."""

    _errors = "replace"  # how invalid UTF-8 is decoded
    _strips_space = False  # whether decode drops the first piece's leading space

    def _init_vocab(self, pieces, types, ids):
        """Set the pieces, their types and the (BOS, EOS, UNK) ``ids`` (None or -1: none)."""
        self.pieces = pieces
        self.types = types
        self.vocab_size = len(pieces)
        if not pieces or len(types) != len(pieces):
            raise ModelFormatError(f"tokenizer vocabulary is inconsistent or empty: "
                                   f"{len(pieces)} pieces, {len(types)} types")
        for name, value in zip(("bos_id", "eos_id", "unk_id"), ids):
            value = -1 if value is None else int(value)
            if not -1 <= value < self.vocab_size:
                raise ModelFormatError(f"{name}={value} is outside the vocabulary "
                                       f"(size {self.vocab_size})")
            setattr(self, name, value)

    def _set_special(self, special, always=()):
        """Set the special tokens (``{text: id}``): ``encode`` with ``parse_special`` turns
        their texts into them, and always those of ``always`` (user-defined tokens)."""
        self.special_tokens = special
        self._special_rx = alternation(special)
        self._always_rx = alternation(always)
        # escape_special marks every place where a special text starts (in any letter case, so
        # a template's upper/lower still meets a mark) and doubles marks; encode reads back
        # mark + mark, mark + special text (group 1), a lone mark, or a special text (group 2)
        mark = re.escape(ESCAPE_MARK)
        if self._special_rx:
            special_text = self._special_rx.pattern[1:-1]  # without the group
            self._escape_rx = re.compile(f"(?=(?i:{special_text}))|{mark}")
            self._unescape_rx = re.compile(f"{mark}({mark}|{special_text})?|({special_text})")
        else:
            self._escape_rx = re.compile(mark)
            self._unescape_rx = re.compile(f"{mark}({mark})?")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False, escaped: bool = False) -> list[int]:
        """Token ids of ``text``. With ``parse_special`` the texts of special tokens (longest
        first) become those tokens and the text between them is encoded on its own; with
        ``escaped`` too, the parts of ``text`` made by ``escape_special`` are plain text."""
        ids = [self._special_id("bos")] if add_bos else []
        if parse_special and escaped:
            self._encode_escaped(text, ids)
        elif parse_special and self._special_rx:
            for k, part in enumerate(self._special_rx.split(text)):
                if k % 2:
                    ids.append(self.special_tokens[part])
                else:
                    self._encode_plain(part, ids)
        else:
            self._encode_plain(text, ids)
        if add_eos:
            ids.append(self._special_id("eos"))
        return ids

    def escape_special(self, text: str) -> str:
        """``text`` (untrusted, e.g. a chat message) made to stay plain text inside a text
        encoded with ``parse_special=True, escaped=True``: ESCAPE_MARK goes before every place
        where a special token's text begins (in any letter case) and each ESCAPE_MARK of
        ``text`` is doubled. The encoder reads a doubled mark as one mark, a mark followed by a
        special token's text as that text, and drops any other mark (one that a template
        separated from its text); special token texts without a mark are the tokens."""
        return self._escape_rx.sub(lambda m: ESCAPE_MARK + m[0], text)

    def _encode_escaped(self, text, ids):
        plain = []
        pos = 0
        for m in self._unescape_rx.finditer(text):
            plain.append(text[pos:m.start()])
            pos = m.end()
            if m.lastindex == 2:  # a special token's text without a mark: the token
                self._encode_plain("".join(plain), ids)
                plain = []
                ids.append(self.special_tokens[m[2]])
            elif m[1]:  # an escaped mark or special text: plain text (a lone mark is dropped)
                plain.append(m[1])
        plain.append(text[pos:])
        self._encode_plain("".join(plain), ids)

    def _encode_plain(self, text, ids):
        """Encode text without control tokens (user-defined ones still match)."""
        if not self._always_rx:
            if text:
                self._encode_part(text, ids)
            return
        for k, part in enumerate(self._always_rx.split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                self._encode_part(part, ids)

    def _special_id(self, name):
        if (i := getattr(self, name + "_id")) < 0:
            raise ValueError(f"this tokenizer has no {name.upper()} token")
        return i

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return i

    def id_to_piece(self, i: int) -> str:
        """The vocabulary string of id ``i``."""
        return self.pieces[self._check_id(i)]

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``, or ``unk_id`` if it is not in the vocabulary."""
        return self._ids.get(piece, self.unk_id)

    def token_bytes(self, i: int) -> bytes:
        """The bytes that token ``i`` adds to the text when it follows other text, as
        :meth:`decode` writes them (before UTF-8 decoding, so a token may hold part of a
        character): a byte token's byte, a byte-level BPE token's bytes, a SentencePiece piece
        with each "▁" a space (a leading one is kept: only the first token of a text loses it),
        the text of a special token for byte-level BPE, nothing for a SentencePiece control
        token and the unknown surface (" ⁇ ") for its unknown token. IndexError if ``i`` is
        not a token id."""
        surface = self._surface(self._check_id(i), False)[0]
        if isinstance(surface, str):
            return surface.encode("utf-8")
        return surface

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids) -> str:
        """The text of ``ids``."""
        d = StreamDecoder(self)
        return "".join([d.push(i) for i in ids]) + d.flush()

    def decoder(self, strip_leading_space: bool = True) -> "StreamDecoder":
        """A :class:`StreamDecoder`; with ``strip_leading_space=False`` no leading space is
        dropped (for text that continues earlier text)."""
        return StreamDecoder(self, strip_leading_space)


class StreamDecoder:
    """Incremental decoder: ``push(id)`` returns the text that is now certain (never half a
    character), ``flush()`` the rest; joined, they equal ``decode`` of all the ids."""

    def __init__(self, tok, strip_leading_space: bool = True):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(tok._errors)
        self._strip = bool(strip_leading_space) and tok._strips_space
        self._stripped = False  # whether the last piece had its leading space dropped
        self._nonempty = False  # whether any text has come out yet

    def push(self, token_id: int) -> str:
        # only the first piece loses its leading space (with whitespace folding, the pieces
        # up to the first text: _surface then says it stripped nothing)
        if self._stripped or self._nonempty:
            self._strip = False
        out, self._stripped = self._tok._surface(self._tok._check_id(token_id), self._strip)
        if isinstance(out, bytes):
            self._nonempty = True
            return self._utf8.decode(out)
        text = self.flush()
        self._nonempty = self._nonempty or bool(out)
        return text + out

    def flush(self) -> str:
        return self._utf8.decode(b"", True)


_TRIE_DEPTH_LIMIT = 200  # nested groups; deeper tries fall back to a flat alternation


def alternation(texts):
    """A regex with one group (so re.split keeps the matches) matching any of `texts`, the
    longest one where several start at the same place; None if there are none. The texts form
    a trie, so one match attempt costs at most the longest text's length, not the number of
    texts (a flat alternation of 256 texts made 1 MB of "<|" take 2 s)."""
    texts = sorted({t for t in texts if t}, key=len, reverse=True)  # longest first
    if not texts:
        return None
    trie = {}
    for t in texts:
        node = trie
        for c in t:
            node = node.setdefault(c, {})
        node[""] = {}  # the end of a text
    body = _trie_pattern(trie, 0)
    return re.compile("(%s)" % (body or "|".join(map(re.escape, texts))))


def _trie_pattern(node, depth):
    """The regex of a trie node: each branch tried before stopping here (so the longest text
    wins), chains of single children written as one literal; None if it nests too deep."""
    if depth > _TRIE_DEPTH_LIMIT:
        return None
    branches = []
    for text, child in node.items():
        if not text:  # the end of a text
            continue
        while len(child) == 1 and "" not in child:
            more, child = next(iter(child.items()))  # the only child
            text += more
        rest = _trie_pattern(child, depth + 1)
        if rest is None:
            return None
        branches.append(re.escape(text) + rest)
    if not branches:
        return ""
    group = branches[0] if len(branches) == 1 else "(?:%s)" % "|".join(branches)
    return "(?:%s)?" % group if "" in node else group


