"""Byte-level BPE tokenizer (GPT-2 style: GPT-2, SmolLM, Llama 3...).

Text is split into words by regexes (the pre-tokenizer), each word's UTF-8 bytes are spelled
with GPT-2's byte-to-unicode alphabet (``"Ġ"`` for a space) and BPE merges are applied by
rank; results match Hugging Face ``tokenizers`` and llama.cpp."""

import codecs
import json
import os
import unicodedata
from heapq import heapify, heappush
from itertools import accumulate, repeat
from pathlib import Path

import numpy as np
import regex

from ..errors import ModelFormatError
from ..files.common import check_regular_file, read_json
from .base import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer
from .merge_order import merge_positions

__all__ = ["BYTE_CHARS", "ByteLevelBPE", "IGNORE_MERGES", "PRE_TOKENIZERS"]

# Pre-tokenizer regexes, applied one after the other: each pass splits the pieces of the
# previous one into matches and the text between them. Keyed by GGUF ``tokenizer.ggml.pre``
# (llama.cpp's names, several per pre-tokenizer). The regexes are those the models publish in
# their tokenizer.json. (?i:'s|'t|...) stays as published: the regex package folds case as
# tokenizers does ("'\u017f" is "'s" to both); llama.cpp spells it '[sS]|'[tT]|..., which
# differs from both only there ("'\u017fa": "'\u017f", "a" here and in tokenizers).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's, with one digit at a time
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"  # letters that may start a word part ...
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"  # ... and that may continue it (CamelCase splits)
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Mistral's
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?"
              r"[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
_BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_PASSES = {  # pre-tokenizer: (its passes, llama.cpp's names for it)
    "gpt-2": ([_GPT2], ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es",
                        "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
                        "roberta-bpe", "gigachat", "a.x-4.0", "mellum", "trillion",
                        "granite-docling")),
    "llama3": ([_LLAMA3], ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                           "midm-2.0", "lfm2", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe")),
    "qwen2": ([_QWEN2], ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2",
                         "hunyuan")),
    "tekken": ([_TEKKEN], ("tekken",)),
    "gpt-4o": ([_GPT4O], ("gpt-4o", "llama4", "minimax-m2")),
    # every digit on its own, then GPT-2
    "smollm": ([r"\p{N}", _GPT2], ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                  "exaone", "minerva-7b")),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"], ("falcon",)),
    "deepseek-v3": (_DEEPSEEK3, ("deepseek-v3", "hunyuan-dense")),
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"],
                       ("deepseek-coder",)),
    "bloom": ([_BLOOM], ("bloom", "poro-chat", "gpt3-finnish")),
    "viking": ([_BLOOM, r"\p{N}"], ("viking",)),
    # llama.cpp's own (also for names it does not know)
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], ("default",)),
}
PRE_TOKENIZERS: dict[str, list[str]] = {name: passes for passes, names in _PASSES.values()
                                        for name in names}
# Pre-tokenizers whose words that are already tokens skip the merges (llama.cpp's
# ignore_merges; tokenizer.json's "ignore_merges").
IGNORE_MERGES = frozenset(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                           "midm-2.0", "lfm2", "tekken"))


def _gpt2_byte_chars():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the
    other 68 bytes move to U+0100 and up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars = []
    moved = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


#: The character that spells each byte (index) in byte-level tokens.
BYTE_CHARS = _gpt2_byte_chars()
_TO_ALPHABET = dict(enumerate(BYTE_CHARS))  # str.translate tables for Latin-1 text
_FROM_ALPHABET = {ord(c): b for b, c in enumerate(BYTE_CHARS)}
_ALPHABET_CODEC = codecs.charmap_build("".join(BYTE_CHARS))  # charmap_encode: text -> bytes
# The word cache is dropped when it holds more than _CACHE_LIMIT words or _CACHE_CHARS
# characters of them; words longer than _CACHE_WORD_LIMIT characters are not cached.
_CACHE_LIMIT = 100_000
_CACHE_CHARS = 4_000_000
_CACHE_WORD_LIMIT = 4096
_FEW = 16  # words of at most this many symbols are merged by rescanning (faster when short)
_NO_MERGE = 1 << 62


class ByteLevelBPE(Tokenizer):
    """A byte-level BPE tokenizer with the interface of ``SentencePieceBPE``. ``special_tokens``
    are the control, unknown and user-defined (added) tokens: user-defined ones always match as
    whole units, control ones only with ``parse_special``; all decode to their text."""

    def __init__(self, tokens, merges, types=None, *, pre_patterns=PRE_TOKENIZERS["gpt-2"],
                 bos_id=-1, eos_id=-1, unk_id=-1, add_bos_default=False, ignore_merges=False,
                 normalization=None):
        pieces = list(map(str, tokens))
        if types is None:
            types = [NORMAL] * len(pieces)
        else:
            types = list(map(int, types))
        self._init_vocab(pieces, types, (bos_id, eos_id, unk_id))
        self.add_bos_default = bool(add_bos_default)
        self.ignore_merges = bool(ignore_merges)
        # the Unicode form ("NFC", ...) text takes before the pre-tokenizer (tokenizer.json's
        # normalizer: Qwen2's is NFC), special tokens apart; None: the text as given
        if normalization not in _NORMALIZATIONS:
            raise ModelFormatError(f"unsupported normalization {normalization!r}")
        self.normalization = normalization
        self.pre_patterns = tuple(pre_patterns)  # the pre-tokenizer's regexes, in order
        self._passes = _compile_passes(pre_patterns)
        self._ids = dict(zip(pieces, range(len(pieces))))  # a repeated piece: its last id
        self._ranks = _merge_ranks(merges)
        special = {}
        always = []
        for i, kind in enumerate(self.types):
            if kind != NORMAL and _is_special(pieces[i], kind):
                special.setdefault(pieces[i], i)
                if kind == USER_DEFINED:
                    always.append(pieces[i])
        self._set_special(special, always)
        self._bytes = _all_token_bytes(pieces, self.types)
        self._cache: dict[str, list[int]] = {}
        self._cached_chars = 0
        self._build_merge_table()

    def merges(self) -> list:
        """The merges, as ``"left right"`` strings in rank order (as tokenizer.json and GGUF
        store them)."""
        ordered = sorted(self._ranks.items(), key=lambda item: item[1])
        return [" ".join(pair) for pair, _ in ordered]

    def _build_merge_table(self):
        """Number every symbol a merge can make and key the merges by the numbers of the pair.

        Symbols are vocabulary ids; a merge result missing from the vocabulary gets a number
        past its end (``_unlisted`` maps it to the ids of its characters, its output). With
        ``K = _n_symbols``, ``_merges[a * K + b] = rank * K + result``: ordering those values
        orders the merges by rank, and the result is the value modulo K."""
        ids = self._ids
        lefts = [a for a, _ in self._ranks]
        rights = [b for _, b in self._ranks]
        results = list(map(str.__add__, lefts, rights))
        missing = dict.fromkeys(r for r in results if r not in ids)  # in rank order
        unlisted = dict(zip(missing, range(self.vocab_size, self.vocab_size + len(missing))))
        k = self.vocab_size + len(unlisted)
        self._n_symbols = k
        number = {**unlisted, **ids}.get
        left = np.fromiter(map(number, lefts, repeat(-1)), np.int64, len(lefts))
        right = np.fromiter(map(number, rights, repeat(-1)), np.int64, len(rights))
        result = np.fromiter(map(number, results), np.int64, len(results))
        rank = np.fromiter(self._ranks.values(), np.int64, len(self._ranks))
        known = (left >= 0) & (right >= 0)  # pairs of symbols that exist (else never made)
        keys = left[known] * k + right[known]
        values = rank[known] * k + result[known]
        self._merges = dict(zip(keys.tolist(), values.tolist()))
        self._unlisted = {i: [ids[c] for c in s if c in ids] for s, i in unlisted.items()}

    @classmethod
    def from_gguf_fields(cls, tokens, merges, token_types=None, pre="default", *, bos_id=-1,
                         eos_id=-1, unk_id=-1, add_bos=False) -> "ByteLevelBPE":
        """Build from GGUF ``tokenizer.ggml.*`` values; ``pre`` must be in PRE_TOKENIZERS."""
        if pre not in PRE_TOKENIZERS:
            raise ModelFormatError(
                f"unsupported pre-tokenizer {pre!r} (known: {', '.join(sorted(PRE_TOKENIZERS))})")
        return cls(tokens, merges, token_types, pre_patterns=PRE_TOKENIZERS[pre],
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, add_bos_default=add_bos,
                   ignore_merges=pre in IGNORE_MERGES)

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
            normalization = _json_normalization(data.get("normalizer"))
            patterns = _json_pre_tokenizer(data.get("pre_tokenizer"))
            tokens, types = _json_vocabulary(model["vocab"], data.get("added_tokens", []))
            bos, eos, unk = _config_ids(os.path.dirname(path), tokens)
            return cls(tokens, model["merges"], types, pre_patterns=patterns, bos_id=bos,
                       eos_id=eos, unk_id=unk, ignore_merges=model.get("ignore_merges", False),
                       normalization=normalization,
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
        if self.normalization is not None:
            text = unicodedata.normalize(self.normalization, text)
        for word in self.pre_tokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                spelled = word.encode("utf-8").decode("latin-1").translate(_TO_ALPHABET)
                word_ids = self._bpe(spelled)
                if len(word) <= _CACHE_WORD_LIMIT:
                    if len(cache) >= _CACHE_LIMIT or self._cached_chars >= _CACHE_CHARS:
                        cache.clear()  # full
                        self._cached_chars = 0
                    cache[word] = word_ids
                    self._cached_chars += len(word)
            ids += word_ids

    def _bpe(self, word: str) -> list[int]:
        """BPE on one byte-spelled word: merge the adjacent pair of lowest rank, leftmost first
        (as tokenizers and llama.cpp do)."""
        vocab = self._ids
        if len(word) == 1 or (self.ignore_merges and word in vocab):
            whole = vocab.get(word)
            if whole is not None:
                return [whole]
        # bytes the vocabulary lacks are dropped first (as tokenizers does without <unk>), so
        # their neighbours may merge
        symbols = [i for i in map(vocab.get, word) if i is not None]
        if len(symbols) <= _FEW:
            symbols = self._merge_few(symbols)
        else:
            symbols = self._merge_many(symbols)
        vocab_size = self.vocab_size
        out = []
        for symbol in symbols:  # a merge result missing from the vocabulary becomes its characters
            if symbol < vocab_size:
                out.append(symbol)
            else:
                out += self._unlisted[symbol]
        return out

    def _merge_few(self, sym):
        """Merge a short word's symbols: scan all pairs for the lowest, merge it, again (the
        fastest way for words of a few symbols; O(n^2))."""
        k = self._n_symbols
        get = self._merges.get
        while True:
            best = _NO_MERGE
            best_at = 0
            for i in range(len(sym) - 1):
                if (value := get(sym[i] * k + sym[i + 1], _NO_MERGE)) < best:
                    best = value
                    best_at = i
            if best == _NO_MERGE:
                return sym
            sym[best_at:best_at + 2] = (best % k,)

    def _merge_many(self, sym):
        """Merge a long word's symbols in O(n log n), in the order of ``_merge_few`` (see
        merge_order.py; the rank of a pair here is its merge value, see ``_merges``).
        Merging a pair never makes another pair of its rank (every symbol made while a rank
        is taken contains that pair, so it is neither of the pair's symbols), but it can make
        one of a lower rank (the merges of a file need not come in order)."""
        n = len(sym)
        k = self._n_symbols
        get = self._merges.get
        sym.append(k * k)  # the sentinel: no pair key involving it exists
        value_at, buckets = _first_pairs(sym, k, get)
        values = list(buckets)  # a heap of the values that have a bucket
        heapify(values)
        next_of = list(range(1, n + 2))
        prev_of = list(range(-1, n))
        urgent = []  # a heap of (value, position)

        def queue(pos, value, current):
            """Queue the pair at ``pos`` of merge value ``value`` (None: it makes nothing)
            while the bucket of ``current`` is merged."""
            if value is None:
                value_at[pos] = -1
                return
            value_at[pos] = value
            if value < current:
                heappush(urgent, (value, pos))
            elif value in buckets:
                buckets[value].append(pos)
            else:
                buckets[value] = [pos]
                heappush(values, value)

        no_later = []  # no pair of the bucket's own rank is ever made (see above)
        for left, current in merge_positions(n, value_at, buckets, values, urgent, no_later):
            right = next_of[left]
            after = next_of[right]
            merged = value_at[left] % k
            sym[left] = merged
            next_of[left] = after
            prev_of[after] = left
            value_at[right] = -1
            before = prev_of[left]
            queue(left, get(merged * k + sym[after]), current)
            queue(before, get(sym[before] * k + merged), current)
        return _in_list_order(sym, next_of, n)

    def _surface(self, i, strip):
        return self._bytes[i], False


def _first_pairs(sym, k, get):
    """The merge value of each pair of ``sym`` (by its first position; -1: none) and the
    positions of each value, in order."""
    value_at = [-1] * len(sym)
    buckets = {}
    for i in range(len(sym) - 2):  # the last symbol is the sentinel
        value = get(sym[i] * k + sym[i + 1])
        if value is None:
            continue
        value_at[i] = value
        if value in buckets:
            buckets[value].append(i)
        else:
            buckets[value] = [i]
    return value_at, buckets


def _in_list_order(sym, next_of, end):
    """The symbols of the linked list from position 0 up to ``end``."""
    out = []
    i = 0
    while i < end:
        out.append(sym[i])
        i = next_of[i]
    return out


def _compile_passes(patterns):
    """``(regex, number of its groups)`` of each pre-tokenizer pass: each pass splits with the
    pattern in a group (so the matches are kept); the pattern's own groups are dropped."""
    try:
        return [(regex.compile(f"({p})"), regex.compile(p).groups) for p in patterns]
    except regex.error as e:
        raise ModelFormatError(f"bad pre-tokenizer regex: {e}") from None


def _merge_ranks(merges):
    """``{(left, right): rank}`` of ``merges`` ("left right" strings or pairs); the first
    occurrence of a pair wins."""
    merges = list(merges)
    if set(map(type, merges)) == {str}:  # all "left right" strings: one pass in C
        pairs = list(map(tuple, map(str.split, merges, repeat(" "), repeat(1))))
        ranks = dict(zip(pairs, range(len(pairs))))
        if len(ranks) == len(pairs) and set(map(len, pairs)) <= {2}:
            return ranks  # (no pair repeated: the first occurrence is the only one)
    ranks = {}
    for rank, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2:
            raise ModelFormatError(f"merge {rank} ({merge!r}) is not a pair of tokens")
        ranks.setdefault(pair, rank)
    return ranks


def _is_special(token, kind):
    """Whether the token is special: one of the control, unknown and user-defined tokens,
    which are plain text (not byte-spelled)."""
    return kind in (CONTROL, UNKNOWN, USER_DEFINED) and bool(token)


def _all_token_bytes(pieces, types):
    """``[_token_bytes(piece, kind) ...]`` of a vocabulary: the normal pieces spelled back to
    bytes all at once where they are all in the alphabet (as they are in byte-level
    vocabularies), the others one by one."""
    out = [None] * len(pieces)
    normal = [i for i, kind in enumerate(types) if kind == NORMAL]
    texts = [pieces[i] for i in normal]
    try:
        spelled = codecs.charmap_encode("".join(texts), "strict", _ALPHABET_CODEC)[0]
    except UnicodeEncodeError:  # a character outside the alphabet: one by one, below
        normal = []
    ends = list(accumulate(map(len, texts)))  # one byte per character
    starts = [0] + ends[:-1]
    for i, start, end in zip(normal, starts, ends):
        out[i] = spelled[start:end]
    for i, (token, kind) in enumerate(zip(pieces, types)):
        if out[i] is None:
            out[i] = _token_bytes(token, kind)
    return out


def _token_bytes(token, kind):
    """The bytes a token decodes to: a special token's text, else its byte-spelled
    characters; characters outside the alphabet are plain text (as in tokenizers)."""
    if _is_special(token, kind):
        return token.encode("utf-8")
    latin = token.translate(_FROM_ALPHABET)
    if latin.isascii() or max(latin) < "\u0100":
        return latin.encode("latin-1")
    return token.encode("utf-8")


_NORMALIZATIONS = (None, "NFC", "NFD", "NFKC", "NFKD")


def _json_normalization(normalizer):
    """The Unicode form of a tokenizer.json normalizer: None for none, else one of NFC, NFD,
    NFKC, NFKD (alone, or alone in a Sequence); ValueError for any other."""
    if normalizer and normalizer.get("type") == "Sequence":
        items = normalizer.get("normalizers") or []
        if len(items) > 1:
            raise ValueError("a Sequence of several normalizers is not supported")
        normalizer = items[0] if items else None
    if not normalizer:
        return None
    kind = normalizer.get("type")
    if kind not in _NORMALIZATIONS:
        raise ValueError(f"normalizer {kind!r} is not supported")
    return kind


def _json_pre_tokenizer(pre) -> list[str]:
    """Regex passes equivalent to a tokenizer.json pre_tokenizer."""
    if pre and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
    else:
        items = [pre]
    patterns = []
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


def _json_vocabulary(vocab: dict, added: list):
    """Tokens and types by id from tokenizer.json's ``model.vocab`` and ``added_tokens``."""
    ids = [*vocab.values(), *(t["id"] for t in added)]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError("token ids must be non-negative integers")
    size = max(ids) + 1
    if size > len(ids):  # ids are dense, so the largest is below their count
        raise ValueError(f"token id {size - 1} is beyond the {len(ids)} tokens listed")
    tokens = [None] * size
    types = [NORMAL] * size
    for token, i in vocab.items():
        tokens[i] = token
    for token in added:
        tokens[token["id"]] = token["content"]
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    if None in tokens:
        raise ValueError(f"token id {tokens.index(None)} is missing")
    return tokens, types


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
    processors = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            return p["single"][0].get("SpecialToken", {}).get("id") == bos
    return False
