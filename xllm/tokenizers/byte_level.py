"""Byte-level BPE tokenizer (GPT-2 style: GPT-2, SmolLM, Llama 3...).

Text is split into words by regexes (the pre-tokenizer), each word's UTF-8 bytes are spelled
with GPT-2's byte-to-unicode alphabet (``"Ġ"`` for a space) and BPE merges are applied by
rank; results match Hugging Face ``tokenizers`` and llama.cpp."""

import json
import os
from heapq import heapify, heappop, heappush
from pathlib import Path

import regex

from ..errors import ModelFormatError
from ..files.common import check_regular_file, read_json
from .base import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer

__all__ = ["ByteLevelBPE", "PRE_TOKENIZERS"]

# Pre-tokenizer regexes, applied one after the other: each pass splits the pieces of the
# previous one into matches and the text between them. Keyed by GGUF ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, list[str]] = {
    "gpt-2": [_GPT2], "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3],
    "smollm": [r"\p{N}", _GPT2],  # every digit on its own, then GPT-2
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],  # llama.cpp's
}
# GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68
# bytes move to U+0100 and up, in byte order.
_KEEP = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
_BYTE_CHARS = [chr(b) if b in _KEEP else chr(256 + sum(c not in _KEEP for c in range(b)))
               for b in range(256)]
_TO_ALPHABET = dict(enumerate(_BYTE_CHARS))  # str.translate tables for Latin-1 text
_FROM_ALPHABET = {ord(c): b for b, c in enumerate(_BYTE_CHARS)}
# The word cache is dropped when it holds more than _CACHE_LIMIT words or _CACHE_CHARS
# characters of them; words longer than _CACHE_WORD_LIMIT characters are not cached.
_CACHE_LIMIT, _CACHE_CHARS, _CACHE_WORD_LIMIT = 100_000, 4_000_000, 4096
_FEW = 16  # words of at most this many symbols are merged by rescanning (faster when short)
_NO_MERGE = 1 << 62


class ByteLevelBPE(Tokenizer):
    """A byte-level BPE tokenizer with the interface of ``SentencePieceBPE``. ``special_tokens``
    are the control, unknown and user-defined (added) tokens: user-defined ones always match as
    whole units, control ones only with ``parse_special``; all decode to their text."""

    def __init__(self, tokens, merges, types=None, *, pre_patterns=PRE_TOKENIZERS["gpt-2"],
                 bos_id=-1, eos_id=-1, unk_id=-1, add_bos_default=False, ignore_merges=False):
        pieces = [str(t) for t in tokens]
        self._init_vocab(pieces, [NORMAL] * len(pieces) if types is None else
                         [int(t) for t in types], (bos_id, eos_id, unk_id))
        self.add_bos_default, self.ignore_merges = bool(add_bos_default), bool(ignore_merges)
        self.pre_patterns = tuple(pre_patterns)  # the pre-tokenizer's regexes, in order
        try:
            # each pass splits with the pattern in a group (so the matches are kept); the
            # pattern's own groups are dropped from the result
            self._passes = [(regex.compile(f"({p})"), regex.compile(p).groups)
                            for p in pre_patterns]
        except regex.error as e:
            raise ModelFormatError(f"bad pre-tokenizer regex: {e}") from None
        self._ids = {t: i for i, t in enumerate(pieces)}
        self._ranks: dict[tuple, int] = {}  # the first occurrence of a pair wins
        for rank, m in enumerate(merges):
            pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            if len(pair) != 2:
                raise ModelFormatError(f"merge {rank} ({m!r}) is not a pair of tokens")
            self._ranks.setdefault(pair, rank)
        special, always, self._bytes = {}, [], []
        for i, (t, ty) in enumerate(zip(pieces, self.types)):
            if ty in (CONTROL, UNKNOWN, USER_DEFINED) and t:  # plain text, not byte-spelled
                special.setdefault(t, i)
                always += [t] if ty == USER_DEFINED else []
                self._bytes.append(t.encode("utf-8"))
            else:  # characters outside the alphabet are plain text (as in tokenizers)
                latin = t.translate(_FROM_ALPHABET)
                latin1 = latin.isascii() or max(latin) < "\u0100"
                self._bytes.append(latin.encode("latin-1") if latin1 else t.encode("utf-8"))
        self._set_special(special, always)
        self._cache: dict[str, list[int]] = {}
        self._cached_chars = 0
        self._build_merge_table()

    def _build_merge_table(self):
        """Number every symbol a merge can make and key the merges by the numbers of the pair.

        Symbols are vocabulary ids; a merge result missing from the vocabulary gets a number
        past its end (``_unlisted`` maps it to the ids of its characters, its output). With
        ``K = _n_symbols``, ``_merges[a * K + b] = rank * K + result``: ordering those values
        orders the merges by rank, and the result is the value modulo K."""
        ids = self._ids
        unlisted = {}
        spellings = {}
        for a, b in self._ranks:
            if a + b not in ids and a + b not in unlisted:
                unlisted[a + b] = self.vocab_size + len(unlisted)
        self._n_symbols = k = self.vocab_size + len(unlisted)
        number = {**unlisted, **ids}.get
        self._merges = {}
        for (a, b), rank in self._ranks.items():
            if (left := number(a)) is not None and (right := number(b)) is not None:
                self._merges[left * k + right] = rank * k + number(a + b)
        for s, i in unlisted.items():
            spellings[i] = [ids[c] for c in s if c in ids]
        self._unlisted = spellings

    @classmethod
    def from_gguf_fields(cls, tokens, merges, token_types=None, pre="default", *, bos_id=-1,
                         eos_id=-1, unk_id=-1, add_bos=False) -> "ByteLevelBPE":
        """Build from GGUF ``tokenizer.ggml.*`` values; ``pre`` must be in PRE_TOKENIZERS."""
        if pre not in PRE_TOKENIZERS:
            raise ModelFormatError(
                f"unsupported pre-tokenizer {pre!r} (known: {', '.join(sorted(PRE_TOKENIZERS))})")
        return cls(tokens, merges, token_types, pre_patterns=PRE_TOKENIZERS[pre],
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, add_bos_default=add_bos,
                   ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"))

    @classmethod
    def from_tokenizer_json(cls, path) -> "ByteLevelBPE":
        """Load a Hugging Face ``tokenizer.json`` with a byte-level BPE model; BOS/EOS/UNK
        come from a ``tokenizer_config.json`` next to it, if any."""
        path = os.fspath(path)
        try:
            check_regular_file(path)  # a FIFO would block the read
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            model = data["model"]
            if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise ValueError(f"model type is {model.get('type')!r}, not BPE")
            if data.get("normalizer"):
                raise ValueError(f"normalizer {data['normalizer'].get('type')!r} is not supported")
            patterns = _json_pre_tokenizer(data.get("pre_tokenizer"))
            added = data.get("added_tokens", [])
            ids = [*model["vocab"].values(), *(t["id"] for t in added)]
            if not all(type(i) is int and i >= 0 for i in ids):
                raise ValueError("token ids must be non-negative integers")
            size = max(ids) + 1
            if size > len(ids):  # ids are dense, so the largest is below their count
                raise ValueError(f"token id {size - 1} is beyond the {len(ids)} tokens listed")
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
                       eos_id=eos, unk_id=unk, ignore_merges=model.get("ignore_merges", False),
                       add_bos_default=bos >= 0 and _template_adds(data, tokens[bos]))
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot read tokenizer.json ({e})") from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else e
            raise ModelFormatError(f"{path}: not a supported byte-level BPE tokenizer.json "
                                   f"({detail})") from None

    def pre_tokenize(self, text: str) -> list[str]:
        """Split ``text`` into the words BPE works on (before byte-level spelling)."""
        words = [text] if text else []
        for rx, groups in self._passes:  # the text before each match, the match; the rest
            out = []
            for w in words:
                parts = rx.split(w)
                if groups:  # [before, match, its groups..., before, ...]: keep the first two
                    parts = [s for i, s in enumerate(parts) if i % (groups + 2) < 2]
                out += parts
            words = [w for w in out if w]
        return words

    def _encode_part(self, text: str, ids: list[int]) -> None:
        cache = self._cache
        for w in self.pre_tokenize(text):
            if (r := cache.get(w)) is None:
                r = self._bpe(w.encode("utf-8").decode("latin-1").translate(_TO_ALPHABET))
                if len(w) <= _CACHE_WORD_LIMIT:
                    if len(cache) >= _CACHE_LIMIT or self._cached_chars >= _CACHE_CHARS:
                        cache.clear()
                        self._cached_chars = 0
                    cache[w] = r
                    self._cached_chars += len(w)
            ids += r

    def _bpe(self, word: str) -> list[int]:
        """BPE on one byte-spelled word: merge the adjacent pair of lowest rank, leftmost first
        (as tokenizers and llama.cpp do)."""
        vocab = self._ids
        if len(word) == 1 or (self.ignore_merges and word in vocab):
            if (i := vocab.get(word)) is not None:
                return [i]
        # bytes the vocabulary lacks are dropped first (as tokenizers does without <unk>), so
        # their neighbours may merge
        sym = [i for i in map(vocab.get, word) if i is not None]
        sym = self._merge_few(sym) if len(sym) <= _FEW else self._merge_many(sym)
        out, listed = [], self.vocab_size
        for s in sym:  # a merge result missing from the vocabulary becomes its characters
            if s < listed:
                out.append(s)
            else:
                out += self._unlisted[s]
        return out

    def _merge_few(self, sym):
        """Merge a short word's symbols: scan all pairs for the lowest, merge it, again (the
        fastest way for words of a few symbols; O(n^2))."""
        k, get = self._n_symbols, self._merges.get
        while True:
            best, at = _NO_MERGE, 0
            for i in range(len(sym) - 1):
                if (m := get(sym[i] * k + sym[i + 1], _NO_MERGE)) < best:
                    best, at = m, i
            if best == _NO_MERGE:
                return sym
            sym[at:at + 2] = (best % k,)

    def _merge_many(self, sym):
        """Merge a long word's symbols in O(n log n).

        The symbols form a doubly linked list over their first positions (``nxt``/``prv``,
        with a sentinel that merges with nothing at index n, which is also index -1).
        ``cand[position]`` is the merge value (see ``_merges``) of the pair starting there (-1:
        none); a position queued under another value is stale and skipped. Positions wait in
        one bucket per value, and the buckets are taken lowest rank first, each in position
        order. Merging a pair never makes another pair of its rank (every symbol made while a
        rank is taken contains that pair, so it is neither of the pair's symbols), but it can
        make one of a lower rank (the merges of a file need not come in order): those go to
        the heap ``urgent`` and are merged before the bucket goes on."""
        n = len(sym)
        k = self._n_symbols
        get = self._merges.get
        sym.append(k * k)  # the sentinel: no pair key involving it exists
        cand, buckets = [-1] * (n + 1), {}
        for i in range(n - 1):
            if (m := get(sym[i] * k + sym[i + 1])) is not None:
                cand[i] = m
                if (bucket := buckets.get(m)) is None:
                    buckets[m] = [i]
                else:
                    bucket.append(i)
        ranks = list(buckets)
        heapify(ranks)
        nxt, prv = [*range(1, n + 2)], [*range(-1, n)]
        shift = n.bit_length()  # urgent merges are queued as value << shift | position
        mask = (1 << shift) - 1
        while ranks:
            rank = heappop(ranks)
            todo = sorted(buckets.pop(rank))
            todo.append(n)  # the end
            at, urgent = 0, []
            while True:
                if urgent:
                    key = heappop(urgent)
                    left, m = key & mask, key >> shift
                elif (left := todo[at]) < n:
                    at += 1
                    m = rank
                else:
                    break
                if cand[left] != m:
                    continue
                right = nxt[left]
                new = sym[left] = m % k
                after = nxt[left] = nxt[right]
                prv[after] = left
                cand[right] = -1
                before = prv[left]
                for pos, m in ((left, get(new * k + sym[after])),
                               (before, get(sym[before] * k + new))):
                    cand[pos] = -1 if m is None else m
                    if m is None:
                        continue
                    if m < rank:
                        heappush(urgent, m << shift | pos)
                    elif (bucket := buckets.get(m)) is not None:
                        bucket.append(pos)
                    else:
                        buckets[m] = [pos]
                        heappush(ranks, m)
        out, i = [], 0
        while i < n:
            out.append(sym[i])
            i = nxt[i]
        return out

    def _surface(self, i, strip):
        return self._bytes[i], False


def _json_pre_tokenizer(pre) -> list[str]:
    """Regex passes equivalent to a tokenizer.json pre_tokenizer."""
    items = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    patterns, byte_level = [], False
    for p in items:
        kind = p and p.get("type")
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ValueError("ByteLevel add_prefix_space=true is not supported")
            byte_level = True
            patterns += [_GPT2] if p.get("use_regex", True) else []
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


def _config_ids(folder: str, tokens: list[str]) -> list[int]:
    """BOS, EOS and UNK ids named in ``tokenizer_config.json`` (-1 if absent)."""
    try:
        config = read_json(os.path.join(folder, "tokenizer_config.json"))
    except (ModelFormatError, OSError):  # absent, not a regular file or not JSON: no ids
        config = {}
    names = [t.get("content") if isinstance(t, dict) else t
             for t in map(config.get, ("bos_token", "eos_token", "unk_token"))]
    return [tokens.index(t) if t in tokens else -1 for t in names]


def _template_adds(data: dict, bos: str) -> bool:
    """Whether the post-processor puts ``bos`` in front of a single sequence."""
    post = data.get("post_processor") or {}
    for p in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            return p["single"][0].get("SpecialToken", {}).get("id") == bos
    return False
