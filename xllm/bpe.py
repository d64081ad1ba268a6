"""Byte-level BPE tokenizer (GPT-2 style: GPT-2, SmolLM, Llama 3...).

Text is split into words by one or more regular expressions (the "pre-tokenizer"),
each word's UTF-8 bytes are spelled with GPT-2's byte-to-unicode alphabet (so every
byte is one printable character, e.g. ``"Ġ"`` for a space), and BPE merges are
applied by rank.  Results match Hugging Face ``tokenizers`` and llama.cpp for the
same vocabulary, merges and pre-tokenizer.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import regex

from .errors import ModelFormatError
from .tokenizer import CONTROL, NORMAL, UNKNOWN, USER_DEFINED

__all__ = ["ByteLevelBPE", "PRE_TOKENIZERS"]

# Pre-tokenizer regexes, applied one after the other: each pass splits the pieces of
# the previous one into matches *and* the text between matches (as llama.cpp and
# tokenizers' Split(behavior="Isolated") do).  Keyed by GGUF ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: Dict[str, List[str]] = {
    "gpt-2": [_GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3],
    "smollm": [r"\p{N}", _GPT2],  # every digit on its own, then GPT-2
    # llama.cpp's fallback for BPE vocabularies whose pre-tokenizer is "default".
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
}


def _byte_alphabet() -> List[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are moved to U+0100 and up, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _byte_alphabet()
# str.translate tables: Latin-1 text (one char per byte) <-> byte-level spelling.
_TO_ALPHABET = {b: c for b, c in enumerate(_BYTE_CHARS)}
_FROM_ALPHABET = {ord(c): b for b, c in enumerate(_BYTE_CHARS)}
_CACHE_LIMIT = 100_000  # words; the cache is dropped when it grows past this


class ByteLevelBPE:
    """A byte-level BPE tokenizer with the same interface as ``SentencePieceBPE``.

    Build one with :meth:`from_gguf_fields`, :meth:`from_tokenizer_json` or
    ``xllm.tokenizer.load_tokenizer``.

    Attributes:
        vocab_size: number of tokens.
        bos_id, eos_id, unk_id: special ids (-1 if absent).
        add_bos_default: whether prompts for this model normally start with BOS.
        special_tokens: text -> id of the control, unknown and user-defined (added)
            tokens.  User-defined tokens are always matched as whole units in the
            input; control tokens only with ``encode(..., parse_special=True)``.
        tokens, types: the vocabulary in byte-level spelling, and token types
            (``xllm.tokenizer`` NORMAL..BYTE constants).
    """

    def __init__(self, tokens: Sequence[str], merges: Iterable,
                 types: Optional[Sequence[int]] = None, *,
                 pre_patterns: Sequence[str] = PRE_TOKENIZERS["gpt-2"], bos_id: int = -1,
                 eos_id: int = -1, unk_id: int = -1, add_bos_default: bool = False,
                 ignore_merges: bool = False):
        self.tokens = [str(t) for t in tokens]
        self.types = [NORMAL] * len(self.tokens) if types is None else [int(t) for t in types]
        if not self.tokens or len(self.types) != len(self.tokens):
            raise ModelFormatError(f"tokenizer vocabulary is inconsistent: {len(self.tokens)} "
                                   f"tokens, {len(self.types)} types")
        self.vocab_size = len(self.tokens)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            value = -1 if value is None else int(value)
            if not -1 <= value < self.vocab_size:
                raise ModelFormatError(f"{name}={value} is outside the vocabulary "
                                       f"(size {self.vocab_size})")
            setattr(self, name, value)
        self.add_bos_default = bool(add_bos_default)
        self.ignore_merges = bool(ignore_merges)
        try:
            self._passes = [regex.compile(p) for p in pre_patterns]
        except regex.error as e:
            raise ModelFormatError(f"bad pre-tokenizer regex: {e}") from None

        self._vocab = {t: i for i, t in enumerate(self.tokens)}
        # Merge ranks by pair; the first occurrence of a pair wins (as in llama.cpp).
        self._ranks: Dict[tuple, int] = {}
        for rank, m in enumerate(merges):
            pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            if len(pair) != 2:
                raise ModelFormatError(f"merge {rank} ({m!r}) is not a pair of tokens")
            self._ranks.setdefault(pair, rank)

        # Special tokens are plain text, not byte-level spelled: they decode to their
        # text (as tokenizers' decode(skip_special_tokens=False) does, and as chat
        # transcripts need).  Other tokens decode through the byte alphabet.
        self.special_tokens: Dict[str, int] = {}
        always = []
        self._bytes: List[bytes] = []
        for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
            if ty in (CONTROL, UNKNOWN, USER_DEFINED) and t:
                self.special_tokens.setdefault(t, i)
                if ty == USER_DEFINED:
                    always.append(t)
                self._bytes.append(t.encode("utf-8"))
            else:
                self._bytes.append(_spelled_bytes(t))
        self._special_rx = _alternation(self.special_tokens)
        self._always_rx = _alternation(always)
        self._cache: Dict[str, List[int]] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf_fields(cls, tokens: Sequence[str], merges: Sequence[str],
                         token_types: Optional[Sequence[int]] = None, pre: str = "default", *,
                         bos_id: int = -1, eos_id: int = -1, unk_id: int = -1,
                         add_bos: bool = False) -> "ByteLevelBPE":
        """Build from GGUF ``tokenizer.ggml.*`` values (model ``gpt2``).

        ``pre`` is ``tokenizer.ggml.pre``; a name not in :data:`PRE_TOKENIZERS`
        raises ``ModelFormatError`` rather than tokenizing slightly wrongly.
        """
        if pre not in PRE_TOKENIZERS:
            raise ModelFormatError(
                f"unsupported pre-tokenizer {pre!r} (known: {', '.join(sorted(PRE_TOKENIZERS))})")
        return cls(tokens, merges, token_types, pre_patterns=PRE_TOKENIZERS[pre],
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, add_bos_default=add_bos,
                   ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"))

    @classmethod
    def from_tokenizer_json(cls, path) -> "ByteLevelBPE":
        """Load a Hugging Face ``tokenizer.json`` with a byte-level BPE model.

        Supported pre-tokenizers: ``ByteLevel``, or a ``Sequence`` of ``Split``
        (regex, isolated), ``Digits`` and ``ByteLevel``.  Added tokens become
        CONTROL (``special``) or USER_DEFINED tokens.  BOS/EOS/UNK come from a
        ``tokenizer_config.json`` next to the file, if there is one.
        ``lstrip``/``rstrip``/``single_word`` flags of added tokens are ignored.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            model = data["model"]
            if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise ValueError(f"model type is {model.get('type')!r}, not BPE")
            if data.get("normalizer"):
                raise ValueError(f"normalizer {data['normalizer'].get('type')!r} is not supported")
            patterns = _json_pre_tokenizer(data.get("pre_tokenizer"))
            added = data.get("added_tokens", [])
            size = max([*model["vocab"].values(), *(t["id"] for t in added)]) + 1
            tokens, types = [None] * size, [NORMAL] * size
            for t, i in model["vocab"].items():
                tokens[i] = t
            for t in added:
                tokens[t["id"]] = t["content"]
                types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
            if None in tokens:
                raise ValueError(f"token id {tokens.index(None)} is missing")
            bos, eos, unk = _config_ids(os.path.dirname(path), tokens)
            return cls(tokens, model["merges"], types, pre_patterns=patterns, bos_id=bos,
                       eos_id=eos, unk_id=unk,
                       add_bos_default=bos >= 0 and _template_adds(data, tokens[bos]),
                       ignore_merges=model.get("ignore_merges", False))
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot read tokenizer.json ({e})") from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else e
            raise ModelFormatError(f"{path}: not a supported byte-level BPE tokenizer.json "
                                   f"({detail})") from None

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False) -> List[int]:
        """Encode ``text`` into token ids.

        With ``parse_special=True`` the text of special/added tokens (e.g.
        ``<|im_start|>``) becomes that token, longest match first; otherwise only
        user-defined tokens are matched and control-token text is ordinary text
        (llama.cpp's ``parse_special=false``).
        """
        ids: List[int] = []
        if add_bos:
            if self.bos_id < 0:
                raise ValueError("this tokenizer has no BOS token")
            ids.append(self.bos_id)
        rx = self._special_rx if parse_special else self._always_rx
        if rx is None:
            self._encode_text(text, ids)
        else:
            pos = 0
            for m in rx.finditer(text):
                self._encode_text(text[pos:m.start()], ids)
                ids.append(self.special_tokens[m.group()])
                pos = m.end()
            self._encode_text(text[pos:], ids)
        if add_eos:
            if self.eos_id < 0:
                raise ValueError("this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def pre_tokenize(self, text: str) -> List[str]:
        """Split ``text`` into the words BPE works on (before byte-level spelling)."""
        words = [text] if text else []
        for rx in self._passes:
            out = []
            for w in words:
                pos = 0
                for m in rx.finditer(w):
                    start, end = m.span()
                    if start > pos:
                        out.append(w[pos:start])
                    if end > start:
                        out.append(w[start:end])
                    pos = end
                if pos < len(w):
                    out.append(w[pos:])
            words = out
        return words

    def _encode_text(self, text: str, ids: List[int]) -> None:
        if not text:
            return
        cache = self._cache
        for w in self.pre_tokenize(text):
            r = cache.get(w)
            if r is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                spelled = w.encode("utf-8").decode("latin-1").translate(_TO_ALPHABET)
                r = cache[w] = self._bpe(spelled)
            ids += r

    def _bpe(self, word: str) -> List[int]:
        """BPE on one byte-level-spelled word: repeatedly merge the adjacent pair
        with the lowest rank (leftmost first on ties), like tokenizers and llama.cpp."""
        vocab = self._vocab
        if len(word) == 1 or (self.ignore_merges and word in vocab):
            i = vocab.get(word)
            if i is not None:
                return [i]
        ranks = self._ranks
        syms = list(word)
        n = len(syms)
        # Symbols are a linked list (nxt); merged-away symbols become ''.  The heap
        # holds (rank, left position); an entry is stale when the pair now at that
        # position has a different rank (a rank identifies one pair).
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None:
                heap.append((r, i))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            r, i = pop(heap)
            j = nxt[i]
            if j >= n or not syms[i] or ranks.get((syms[i], syms[j])) != r:
                continue
            syms[i] += syms[j]
            syms[j] = ""
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                r = ranks.get((syms[i], syms[k]))
                if r is not None:
                    push(heap, (r, i))
            p = prv[i]
            if p >= 0:
                r = ranks.get((syms[p], syms[i]))
                if r is not None:
                    push(heap, (r, p))
        out = []
        for s in syms:
            if s:
                i = vocab.get(s)
                if i is not None:
                    out.append(i)
                else:
                    # Not in the vocabulary: its single bytes, and bytes the vocabulary
                    # lacks are dropped (llama.cpp and tokenizers without unk do this).
                    out += [vocab[c] for c in s if c in vocab]
        return out

    # ------------------------------------------------------------------ decoding

    def id_to_piece(self, i: int) -> str:
        """The token string of id ``i`` in byte-level spelling (``Ġ`` for a space)."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return self.tokens[i]

    def piece_to_id(self, piece: str) -> int:
        """The id of a token string, or ``unk_id`` if it is not in the vocabulary."""
        return self._vocab.get(piece, self.unk_id)

    def __len__(self) -> int:
        return self.vocab_size

    def _token_bytes(self, i) -> bytes:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return self._bytes[i]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text.  Special tokens are written as their text (nothing is
        skipped); invalid UTF-8 becomes U+FFFD per maximal bad subsequence, as in
        tokenizers' ``decode(ids, skip_special_tokens=False)``."""
        return b"".join(self._token_bytes(i) for i in ids).decode("utf-8", "replace")

    def decoder(self, strip_leading_space: bool = True) -> "ByteStreamDecoder":
        """A streaming decoder (``push(id) -> str``, ``flush() -> str``) whose joined
        output equals :meth:`decode`.  ``strip_leading_space`` has no effect: byte-level
        BPE adds no dummy space."""
        return ByteStreamDecoder(self)


class ByteStreamDecoder:
    """Incremental decoder for :class:`ByteLevelBPE`; never returns half a character."""

    def __init__(self, tokenizer: ByteLevelBPE):
        self._tok = tokenizer
        # Python's incremental UTF-8 decoder holds back incomplete sequences and
        # replaces bad bytes exactly as a one-shot decode("utf-8", "replace") would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now certain."""
        return self._utf8.decode(self._tok._token_bytes(token_id))

    def flush(self) -> str:
        """Return whatever is held back; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", True)


# --------------------------------------------------------------------------- helpers


def _spelled_bytes(token: str) -> bytes:
    """Bytes of a byte-level-spelled token; a token with characters outside the
    alphabet is taken as plain UTF-8 text (as tokenizers' ByteLevel decoder does)."""
    latin = token.translate(_FROM_ALPHABET)
    try:
        return latin.encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def _alternation(texts) -> Optional["regex.Pattern"]:
    # Longest first, so that at each position the longest token text wins.
    texts = sorted(texts, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in texts)) if texts else None


def _json_pre_tokenizer(pre) -> List[str]:
    """Regex passes equivalent to a tokenizer.json pre_tokenizer."""
    items = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    patterns: List[str] = []
    byte_level = False
    for p in items:
        kind = p and p.get("type")
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ValueError("ByteLevel add_prefix_space=true is not supported")
            byte_level = True
            if p.get("use_regex", True):
                patterns.append(_GPT2)
        elif kind == "Digits":
            patterns.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        elif (kind == "Split" and "Regex" in p.get("pattern", {}) and not p.get("invert")
              and p.get("behavior") == "Isolated"):
            patterns.append(p["pattern"]["Regex"])
        else:
            raise ValueError(f"pre-tokenizer {kind!r} ({json.dumps(p)[:80]}) is not supported")
    if not byte_level:
        raise ValueError("no ByteLevel pre-tokenizer: not a byte-level BPE")
    return patterns


def _config_ids(folder: str, tokens: List[str]) -> List[int]:
    """BOS, EOS and UNK ids named in ``tokenizer_config.json`` (-1 if absent)."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    ids = []
    for key in ("bos_token", "eos_token", "unk_token"):
        t = config.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        ids.append(tokens.index(t) if t in tokens else -1)
    return ids


def _template_adds(data: dict, bos: str) -> bool:
    """Whether the post-processor puts ``bos`` in front of a single sequence."""
    post = data.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            return p["single"][0].get("SpecialToken", {}).get("id") == bos
    return False
