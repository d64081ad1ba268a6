"""The tables ByteLevelBPE builds at load (a vocabulary's worth of each: token bytes, merge
ranks, the numbered merge table), built in bulk for speed, against their definitions written
out one item at a time here: equal, in content and order, on an awkward small vocabulary
(repeated tokens and merges, characters outside the byte alphabet, special and user-defined
tokens, merges whose result or sides are not tokens) and on a real one (llama.cpp's GPT-2)."""
import pytest

from xllm.tokenizers.base import CONTROL, NORMAL, USER_DEFINED
from xllm.tokenizers.byte_level import ByteLevelBPE, _token_bytes


def token_bytes(tok):
    return [_token_bytes(piece, kind) for piece, kind in zip(tok.pieces, tok.types)]


def merge_ranks(merges):
    """{(left, right): rank}, the first occurrence of a pair winning."""
    ranks = {}
    for rank, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        ranks.setdefault(pair, rank)
    return ranks


def merge_table(tok, ranks):
    """(_merges, _unlisted, _n_symbols) as ByteLevelBPE._build_merge_table defines them."""
    ids = dict(zip(tok.pieces, range(len(tok.pieces))))
    unlisted = {}
    for a, b in ranks:
        if a + b not in ids and a + b not in unlisted:
            unlisted[a + b] = len(tok.pieces) + len(unlisted)
    k = len(tok.pieces) + len(unlisted)
    number = {**unlisted, **ids}
    merges = {}
    for (a, b), rank in ranks.items():
        if a in number and b in number:
            merges[number[a] * k + number[b]] = rank * k + number[a + b]
    return merges, {i: [ids[c] for c in s if c in ids] for s, i in unlisted.items()}, k


def assert_tables_as_defined(tok, merges):
    assert tok._bytes == token_bytes(tok)
    ranks = merge_ranks(merges)
    assert list(tok._ranks.items()) == list(ranks.items())
    table, unlisted, k = merge_table(tok, ranks)
    assert list(tok._merges.items()) == list(table.items())
    assert tok._unlisted == unlisted and tok._n_symbols == k


AWKWARD = ["a", "b", "ab", "\u4e2d", "<s>", "\u0120a", "ab", "x y", "", "\u0100", "<tool>"]
TYPES = [NORMAL, NORMAL, NORMAL, NORMAL, CONTROL, NORMAL, NORMAL, USER_DEFINED, NORMAL, NORMAL,
         USER_DEFINED]


@pytest.mark.parametrize("merges", [
    ["a b", "a b", "\u0120 a", "ab ab", "q r", "a \u0100", "\u4e2d a"],  # strings, a repeat
    [["a", "b"], ["\u0120", "a"], ["b", "a"]],  # tokenizer.json's newer pairs
    ["a b", ("\u0120", "a"), ["a", "b"]],  # both kinds in one list
    [],
])
def test_awkward_vocabulary(merges):
    assert_tables_as_defined(ByteLevelBPE(AWKWARD, merges, TYPES), merges)


def test_all_in_the_alphabet_and_not():
    """The bulk spelling has a path for vocabularies wholly in the byte alphabet and one for
    the others (a character outside it in any normal token): both as defined."""
    inside = ["a", "\u0120b", "\u00ff"]
    for pieces in (inside, inside + ["\u4e2d"]):
        tok = ByteLevelBPE(pieces, [], [NORMAL] * len(pieces))
        assert tok._bytes == token_bytes(tok)
    assert ByteLevelBPE(inside, [], None)._bytes == [b"a", b" b", b"\xff"]


def test_a_real_vocabulary(data_dir):
    from xllm.files.gguf import read_gguf_metadata
    meta = read_gguf_metadata(data_dir / "llamacpp_vocab" / "ggml-vocab-gpt-2.gguf")
    merges = meta["tokenizer.ggml.merges"]
    tok = ByteLevelBPE(meta["tokenizer.ggml.tokens"], merges, meta["tokenizer.ggml.token_type"])
    assert len(tok._merges) == len(merges) == 50000
    assert_tables_as_defined(tok, merges)


def test_merges_from_an_iterator():
    merges = ["a b", "\u0120 a"]
    tok = ByteLevelBPE(AWKWARD, iter(merges), TYPES)
    assert_tables_as_defined(tok, merges)
