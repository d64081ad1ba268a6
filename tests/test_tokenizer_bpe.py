"""Tests for xllm.tokenizers.byte_level (byte-level BPE) and tokenizers loaded from GGUF / tokenizer.json,
against the SmolLM2 corpus (Hugging Face tokenizers, cross-checked with llama.cpp),
llama.cpp's vocab conformance files and Hugging Face tokenizers itself."""

import json
import random
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xllm.tokenizers.byte_level import BYTE_CHARS, ByteLevelBPE
from xllm.errors import ModelFormatError
from xllm.tokenizers import (CONTROL, NORMAL, USER_DEFINED, SentencePieceBPE, load_tokenizer)
from xllm.files.gguf import read_gguf_metadata

from conftest import llama_cpp_token_pieces

_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def corpus(data_dir):
    rows = _read_jsonl(data_dir / "tokenizer_corpus" / "smollm2.jsonl")
    assert len(rows) == 252
    return rows


@pytest.fixture(scope="module")
def hf_dir(smollm2_gguf, tmp_path_factory):
    """tokenizer.json + tokenizer_config.json for SmolLM2 written by transformers from the
    GGUF, with the pre-tokenizer set to llama.cpp's "smollm" split (MANIFEST 2.1)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers as pt

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent,
                                                     gguf_file=smollm2_gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pt.Sequence([
        pt.Digits(individual_digits=True),
        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    out = tmp_path_factory.mktemp("smollm2_hf")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


# ----------------------------------------------------------------------------- encoding


def test_smollm2_metadata(smollm2):
    assert isinstance(smollm2, ByteLevelBPE)
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.unk_id) == (1, 2, 0)
    assert not smollm2.add_bos_default
    assert len(smollm2.special_tokens) == 17
    assert smollm2.special_tokens["<|im_start|>"] == 1
    assert smollm2.id_to_piece(1) == "<|im_start|>"
    assert smollm2.id_to_piece(smollm2.encode(" hello")[0]) == "\u0120hello"  # "Ġhello"


def test_smollm2_corpus(smollm2, corpus):
    for key, special in (("ids", True), ("ids_split_special", False)):
        bad = [(r["text"], r[key]) for r in corpus
               if smollm2.encode(r["text"], parse_special=special) != r[key]]
        assert not bad, (key, bad[:3])
    for r in corpus[:50]:
        assert [smollm2.id_to_piece(i) for i in r["ids"]] == r["tokens"]


def test_smollm2_round_trip(smollm2, corpus):
    for r in corpus:
        for special in (False, True):
            assert smollm2.decode(smollm2.encode(r["text"], parse_special=special)) == r["text"]


def _llamacpp_cases(data_dir, name):
    base = data_dir / "llamacpp_vocab" / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")[:-1]
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    expected = [[int(x) for x in line.strip().split(" ")] if line.strip() else []
                for line in lines[:len(texts)]]
    assert len(texts) == len(expected) == 46
    return base, texts, expected


@pytest.mark.parametrize("name,cls", [("gpt-2", ByteLevelBPE), ("llama-spm", SentencePieceBPE)])
def test_llamacpp_vocab_from_gguf(data_dir, name, cls):
    base, texts, expected = _llamacpp_cases(data_dir, name)
    tok = load_tokenizer(base)
    assert isinstance(tok, cls)
    failures = [(t, tok.encode(t), e) for t, e in zip(texts, expected) if tok.encode(t) != e]
    assert not failures, failures[:3]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_llama_spm_gguf_matches_model_file(data_dir):
    g = load_tokenizer(data_dir / "llamacpp_vocab" / "ggml-vocab-llama-spm.gguf")
    m = SentencePieceBPE.from_model_file(data_dir / "llama2c" / "tokenizer.model")
    assert (g.pieces, g.scores, g.types) == (m.pieces, m.scores, m.types)
    assert (g.bos_id, g.eos_id, g.unk_id) == (1, 2, 0)
    assert g.add_bos_default and g.add_dummy_prefix and g.byte_fallback
    # parse_special: "<s>" becomes BOS, each text part gets the dummy-prefix space.
    assert g.encode("<s>hi</s>", parse_special=True) == [1] + g.encode("hi") + [2]


# Random text: spaces before digits and letters, apostrophes, special-token text,
# non-ASCII letters and digits, emoji, control characters.
_PIECES = st.sampled_from([" ", "  ", "\t", "\n", "a", "Ab", "'s", "'LL", "12", "\u0661\u0662",
                           "\u00e9", "\u4e2d\u6587", "\U0001F600", "<|im_start|>", "<|im_end|>",
                           "<|endoftext|>", "<", "|", "!!", "\u00a0", "\x00", "\u2581", "\u0120"])
# Unassigned code points are left out: the regex package may know a newer Unicode
# version than tokenizers (e.g. U+12550..U+12686 are \p{N} for it, unassigned for them).
_TEXT = st.one_of(st.lists(_PIECES, max_size=12).map("".join),
                  st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=16))


@settings(max_examples=300, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(text=_TEXT)
@example(text="/\x16/")  # a byte missing from the vocabulary: its neighbours merge ("//")
def test_random_text_matches_hf(smollm2, hf_tok, text):
    hf_tok.encode_special_tokens = False
    assert smollm2.encode(text, parse_special=True) == hf_tok.encode(
        text, add_special_tokens=False).ids
    hf_tok.encode_special_tokens = True  # tokenizers' split_special_tokens
    assert smollm2.encode(text) == hf_tok.encode(text, add_special_tokens=False).ids


_HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3_style(hf_dir, smollm2_gguf, tmp_path_factory):
    """SmolLM2's vocabulary with Llama 3's pre-tokenizer (a Split regex) and
    ignore_merges: tokenizers, ours from that tokenizer.json, ours from GGUF fields."""
    from tokenizers import Tokenizer
    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _HF_LLAMA3}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    data["model"]["ignore_merges"] = True
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    meta = read_gguf_metadata(smollm2_gguf)
    gguf_tok = ByteLevelBPE.from_gguf_fields(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
        meta["tokenizer.ggml.token_type"], "llama-bpe")
    return Tokenizer.from_file(str(path)), load_tokenizer(path), gguf_tok


@settings(max_examples=300, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(text=st.one_of(_TEXT, st.lists(st.sampled_from(list("aS'tLl \r\n1234.\u017f\u212a")),
                                      max_size=14).map("".join)))
def test_llama3_pre_tokenizer_matches_hf(llama3_style, text):
    # The GGUF "llama-bpe" regex is the published one, (?i:'s|...) included: the regex
    # package folds "\u017f" (long s) and the Kelvin sign as tokenizers does.
    hf, from_json, from_gguf = llama3_style
    hf.encode_special_tokens = True
    expected = hf.encode(text, add_special_tokens=False).ids
    assert from_json.encode(text) == expected
    assert from_gguf.encode(text) == expected


def test_default_pre_tokenizer():
    # llama.cpp's passes for pre="default": punctuation runs, GPT-2, digit runs, then
    # groups of three ASCII digits.
    tok = ByteLevelBPE.from_gguf_fields(["a"], [], [NORMAL], "default")
    assert tok.pre_tokenize("Hello, world 12345!") == [
        "Hello", ",", " world", " ", "123", "45", "!"]


# The pre-tokenizers llama.cpp names, against tokenizers built with the same pre-tokenizer on a
# synthetic vocabulary (the models' own are not reachable here): trained by tokenizers without
# any pre-tokenizer on text made of the pieces the regexes treat differently (digit runs, case
# changes, contractions, scripts, newlines, punctuation), so that its merges cross every
# boundary a pre-tokenizer may draw and a wrong split changes the ids. For Qwen2, Mistral
# (tekken), GPT-4o and Llama 3 tokenizers runs the regex the models publish in tokenizer.json
# (written out here, not taken from xllm); for the others, xllm's passes as Split steps, which
# checks the regex package against tokenizers' engine on them. (GGUF name, ignore_merges)
_PUBLISHED = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
              r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": _HF_LLAMA3,
}
_PRE_CASES = [("qwen2", False), ("stablelm2", False), ("tekken", True), ("gpt-4o", False),
              ("llama3", True), ("chatglm-bpe", False), ("starcoder", False), ("phi-2", False),
              ("falcon", False), ("deepseek-v3", False), ("deepseek-coder", False),
              ("bloom", False), ("viking", False)]
_PRE_TEXT = st.one_of(_TEXT, st.lists(st.sampled_from(
    ["Hello", "WORLD", "camelCase", "HTTPServer", "\u00c9t\u00e9", "\u00e9t\u00c9", "'s", "'LL",
     "'\u017f", "'\u017fa", " ", "  ", "\n", "\r\n", "\t", "12345", "7", "\u0663", "\u4e2d\u6587",
     "\u3072\u3089\u304c\u306a", "\ud55c\uad6d", "...", "\u2026", "\u3002", "/", "//", "a/b\n",
     "$", "`", "!!", "\u0301", "e\u0301", "\u02b0", "\U0001F600", "x"]), max_size=10).map("".join))


_SYNTHETIC_WORDS = ["Hello", "WORLD", "camelCase", "HTTPServer", "\u00c9t\u00e9", "'s", "'LL",
                    "'re", "'\u017fa", " ", "  ", "\n", "\r\n", "\t", "12345", "7", "2024",
                    "\u0663\u0664", "\u4e2d\u6587", "\u3072\u3089\u304c\u306a",
                    "\ud55c\uad6d\uc5b4", "...", "\u2026",
                    "\u3002", "/", "//", "$", "`", "!!", "e\u0301", "the", " the", "ing", "don't",
                    "I'm", "x", ",", ".", "?", "(", ")", "foo_bar", "<=", "=>"]


@pytest.fixture(scope="module")
def synthetic_bpe():
    """tokenizer.json (as a dict) of a byte-level BPE of 1,500 tokens that tokenizers trains,
    with no pre-tokenizer, on 20,000 random strings of _SYNTHETIC_WORDS."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers import pre_tokenizers as pt
    rng = random.Random(0)
    corpus = ["".join(rng.choice(_SYNTHETIC_WORDS) for _ in range(rng.randint(1, 12)))
              for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pt.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def pre_tokenizer_pairs(synthetic_bpe):
    """{GGUF pre name: (tokenizers' Tokenizer, ours from GGUF fields)} on the synthetic
    vocabulary."""
    from tokenizers import Tokenizer
    from xllm.tokenizers.byte_level import PRE_TOKENIZERS
    data = synthetic_bpe
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) for m in data["model"]["merges"]]
    pairs = {}
    for name, ignore_merges in _PRE_CASES:
        patterns = [_PUBLISHED[name]] if name in _PUBLISHED else PRE_TOKENIZERS[name]
        splits = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated",
                   "invert": False} for p in patterns]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": False}
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": splits + [byte_level]}
        data["model"]["ignore_merges"] = ignore_merges
        hf = Tokenizer.from_str(json.dumps(data))
        hf.encode_special_tokens = True
        ours = ByteLevelBPE.from_gguf_fields(tokens, merges, [NORMAL] * len(tokens), name)
        assert ours.ignore_merges == ignore_merges
        pairs[name] = (hf, ours)
    return pairs


@pytest.mark.parametrize("name", [name for name, _ in _PRE_CASES])
@settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(text=_PRE_TEXT)
def test_named_pre_tokenizers_match_hf(pre_tokenizer_pairs, name, text):
    hf, ours = pre_tokenizer_pairs[name]
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def qwen2_style_json(synthetic_bpe, tmp_path_factory):
    """Qwen2's tokenizer.json layout on the synthetic vocabulary: the NFC normalizer, its
    published Split regex then ByteLevel without regex, a special token; tokenizers and ours."""
    from tokenizers import Tokenizer
    data = dict(synthetic_bpe)
    data["normalizer"] = {"type": "NFC"}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _PUBLISHED["qwen2"]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}
    size = len(data["model"]["vocab"])
    data["added_tokens"] = [{"id": size, "content": "<|im_end|>", "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False,
                             "special": True}]
    path = tmp_path_factory.mktemp("qwen2_json") / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    hf = Tokenizer.from_file(str(path))
    return hf, load_tokenizer(path)


@settings(max_examples=200, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(text=st.one_of(_PRE_TEXT, st.lists(st.sampled_from(
    ["e", "\u0301", "\u00e9", "A", "\u030a", "\u212b", "\u1e9b\u0323", "\ufb01", " ", "<|im_end|>",
     "\uac00", "\u1100\u1161"]), max_size=10).map("".join)))
def test_nfc_normalizer_matches_hf(qwen2_style_json, text):
    """NFC before the pre-tokenizer (composed and decomposed accents, Hangul jamo), special
    tokens left as they are."""
    hf, ours = qwen2_style_json
    assert ours.normalization == "NFC"
    assert ours.encode(text, parse_special=True) == hf.encode(text, add_special_tokens=False).ids


def test_unsupported_normalizers_are_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    base = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    for normalizer, match in (({"type": "Lowercase"}, "Lowercase"),
                              ({"type": "Sequence", "normalizers": [{"type": "NFC"},
                                                                    {"type": "Lowercase"}]},
                               "several normalizers")):
        path.write_text(json.dumps({**base, "normalizer": normalizer}))
        with pytest.raises(ModelFormatError, match=match):
            load_tokenizer(path)
    path.write_text(json.dumps({**base, "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}]}}))
    assert load_tokenizer(path).normalization == "NFKC"


def test_pre_tokenizers_differ_where_they_should():
    """The passes are not all the same regex: Qwen2 splits digits one by one where Llama 3
    keeps three, tekken splits CamelCase words, BLOOM keeps punctuation apart."""
    def pieces(pre, text):
        return ByteLevelBPE.from_gguf_fields(["a"], [], [NORMAL], pre).pre_tokenize(text)
    assert pieces("qwen2", "x 12345") == ["x", " ", "1", "2", "3", "4", "5"]
    assert pieces("llama3", "x 12345") == ["x", " ", "123", "45"]
    assert pieces("tekken", "HTTPServer camelCase") == ["HTTPServer", " camel", "Case"]
    assert pieces("gpt-4o", "He's") == ["He's"]
    assert pieces("bloom", "Hi, you!") == ["Hi", ",", " you", "!"]


def test_speed_vs_hf(smollm2, hf_tok, corpus):
    texts = [r["text"] for r in corpus]

    def best(f):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for t in texts:
                f(t)
            times.append(time.perf_counter() - t0)
        return min(times)  # warm caches on both sides

    hf_tok.encode_special_tokens = True
    hf = best(lambda t: hf_tok.encode(t, add_special_tokens=False))
    ours = best(smollm2.encode)
    print(f"\nSmolLM2 corpus, single strings: xllm {ours * 1e3:.2f} ms, "
          f"tokenizers {hf * 1e3:.2f} ms, ratio {ours / hf:.2f}")
    assert ours <= hf  # the bar: at least as fast as HF tokenizers


def test_long_word_is_not_quadratic(smollm2):
    t0 = time.perf_counter()
    smollm2.encode("ab" * 5000)
    smollm2.encode("\u4e2d\u6587" * 3000)
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- decoding


def _ids(tok):
    # Single-byte tokens (so UTF-8 gets split and broken), special tokens, any token.
    byte_ids = [tok.piece_to_id(c) for c in BYTE_CHARS]
    return st.lists(st.one_of(st.sampled_from(byte_ids), st.integers(0, 20),
                              st.integers(0, tok.vocab_size - 1)), max_size=14)


@settings(max_examples=300, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_decode_and_stream_match_hf(smollm2, hf_tok, data):
    ids = data.draw(_ids(smollm2))
    text = smollm2.decode(ids)
    assert text == hf_tok.decode(ids, skip_special_tokens=False)
    d = smollm2.decoder()
    parts = [d.push(i) for i in ids] + [d.flush()]
    for p in parts:
        p.encode("utf-8")  # never half a character (no lone surrogates)
    assert "".join(parts) == text


def test_stream_holds_back_partial_characters(smollm2):
    emoji = [smollm2.piece_to_id(BYTE_CHARS[b]) for b in "\U0001F600".encode("utf-8")]
    d = smollm2.decoder()
    assert [d.push(i) for i in emoji] == ["", "", "", "\U0001F600"]
    assert d.push(emoji[0]) == ""
    assert d.push(2) == "\ufffd<|im_end|>"  # special tokens decode to their text
    assert d.flush() == ""
    with pytest.raises(IndexError):
        smollm2.decode([smollm2.vocab_size])


@pytest.mark.parametrize("model", ["gpt-2", "smollm2"])
def test_token_bytes_match_llama_cpp(request, data_dir, model):
    """Tokenizer.token_bytes of every token of GPT-2's byte-level vocabulary (50,257 tokens)
    and SmolLM2's (49,152, with its chat markup) equals llama.cpp's llama_token_to_piece with
    special text (a special token writes its text, as xllm decodes it); the vocabularies hold
    tokens that are part of a UTF-8 character and special tokens, so both kinds are compared."""
    if model == "gpt-2":
        path = data_dir / "llamacpp_vocab" / "ggml-vocab-gpt-2.gguf"
    else:
        path = request.getfixturevalue("smollm2_gguf")
    tok = load_tokenizer(path)
    assert isinstance(tok, ByteLevelBPE)
    want = llama_cpp_token_pieces(path, special=True)
    got = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert len(want) == len(got)
    mismatched = [(i, got[i], want[i]) for i in range(len(got)) if got[i] != want[i]]
    assert not mismatched, mismatched[:5]
    assert any(kind == CONTROL for kind in tok.types)
    assert not all(_is_utf8(b) for b in got)
    for bad in (-1, len(got)):
        with pytest.raises(IndexError):
            tok.token_bytes(bad)


def _is_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ----------------------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_round_trip(hf_dir, smollm2, corpus):
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    assert isinstance(tok, ByteLevelBPE)
    assert tok.vocab_size == smollm2.vocab_size and tok.special_tokens == smollm2.special_tokens
    # tokenizer_config.json written by transformers names <|im_start|> as BOS.
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0) and not tok.add_bos_default
    for r in corpus:
        assert tok.encode(r["text"], parse_special=True) == r["ids"]
        assert tok.encode(r["text"]) == r["ids_split_special"]


def test_tokenizer_json_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        load_tokenizer(bad)
    bad.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, '
                   '"pre_tokenizer": {"type": "Metaspace"}}')
    with pytest.raises(ModelFormatError, match="Metaspace"):
        load_tokenizer(bad)
    with pytest.raises(ModelFormatError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- small vocabularies


def _tiny(**kw):
    tokens = ["a", "b", "c", "ab", "bc", "abc", "\u0120", "\u0120a", "<x>", "<x><y>", "<y>"]
    types = [NORMAL] * 8 + [CONTROL, CONTROL, USER_DEFINED]
    merges = ["b c", "a b", "ab c", "\u0120 a"]
    return ByteLevelBPE(tokens, merges, types, **kw)


def test_merges_by_rank():
    tok = _tiny()
    assert tok.encode("abc") == [0, 4]  # "b c" has the lowest rank, then no "a bc"
    assert tok.encode("ab") == [3]
    assert tok.encode(" a") == [7]
    assert tok.encode("cab") == [2, 3]


def test_special_token_matching():
    tok = _tiny()
    # Control tokens are text unless parse_special; user-defined ones always match.
    assert tok.encode("<y>a") == [10, 0]
    assert tok.encode("<x><y>", parse_special=True) == [9]  # longest match wins
    assert tok.encode("a<x>b", parse_special=True) == [0, 8, 1]
    assert tok.encode("<x>") == []  # "<", "x", ">" are not in the vocabulary: dropped
    assert tok.decode([0, 9, 10]) == "a<x><y><y>"
    with pytest.raises(ValueError):
        tok.encode("a", add_bos=True)


def test_unknown_pre_tokenizer():
    with pytest.raises(ModelFormatError, match="qwen9"):
        ByteLevelBPE.from_gguf_fields(["a"], [], [NORMAL], "qwen9")


# ----------------------------------------------------------------------------- GGUF files


def _write_gguf(path, model, tokens=("a", "b", "ab")):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(list(tokens))
    w.add_token_types([NORMAL] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(2)
    w.add_add_bos_token(True)
    w.add_float32("test.f32", 0.5)
    w.add_array("test.ints", [1, -2, 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_metadata_reader_matches_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tok.gguf"
    _write_gguf(path, "gpt2")
    meta = read_gguf_metadata(path)
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if not key.startswith("GGUF."):  # the reader's header pseudo-fields
            assert meta[key] == field.contents(), key
    tok = load_tokenizer(path)
    assert tok.encode("ab") == [2] and tok.bos_id == 2 and tok.add_bos_default


def test_gguf_unknown_tokenizer_model(tmp_path):
    path = tmp_path / "rwkv.gguf"
    _write_gguf(path, "rwkv")
    with pytest.raises(ModelFormatError, match=r"rwkv\.gguf.*'rwkv'"):
        load_tokenizer(path)


def test_gguf_truncated_or_not_gguf(tmp_path, data_dir):
    data = (data_dir / "llamacpp_vocab" / "ggml-vocab-gpt-2.gguf").read_bytes()
    for cut in (10, 5000, len(data) // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=bad.name):
            load_tokenizer(bad)
    for name, content in (("empty.gguf", b""), ("text.gguf", b"hello world" * 10)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFormatError, match=name):
            load_tokenizer(tmp_path / name)


# ----------------------------------------------------------------------------- long words


@pytest.mark.parametrize("seed", range(4))
def test_long_words_match_hf(smollm2, hf_tok, seed):
    # one word of 20,000 characters: runs, repeats, CJK, random letters (the heap merge)
    rng = random.Random(seed)
    unit = ["a", "ab", "\u4e2d\u6587", "aab"][seed]
    texts = [unit * (20_000 // len(unit)),
             "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20_000)),
             "".join(rng.choice("aab\u00e9\u4e2d") for _ in range(5_000))]
    hf_tok.encode_special_tokens = True
    for text in texts:
        assert smollm2.encode(text) == hf_tok.encode(text, add_special_tokens=False).ids


def test_merges_out_of_rank_order():
    # a merge can make a pair that ranks lower than itself; it is merged next (as in
    # tokenizers), before the later occurrences of the first pair
    tok = ByteLevelBPE(["a", "b", "ab", "aba"], ["ab a", "a b"])
    assert tok.encode("abab") == [3, 1]
    assert tok.encode("abab" * 3000) == [3, 1] * 3000
