"""Tests for xllm.tokenizers against sentencepiece, llama.cpp and llama2.c reference data."""

import json
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.errors import ModelFormatError
from xllm.tokenizers import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                            SentencePieceBPE, load_tokenizer)
from xllm.tokenizers.sentencepiece_model import (BPE, NormalizerField, TrainerField,
                                                  model_proto_bytes,
                                                  read_model_proto)

from conftest import llama_cpp_token_pieces

try:
    import sentencepiece as spm
except ImportError:  # only the comparisons against the reference library need it
    spm = None

needs_spm = pytest.mark.skipif(spm is None, reason="sentencepiece not installed")


# ----------------------------------------------------------------------------- fixtures


def _read_jsonl(path):
    # The corpus files are ASCII JSON lines; split on "\n" only (MANIFEST 2.1).
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def llama_model(data_dir):
    return data_dir / "llama2c" / "tokenizer.model"


@pytest.fixture(scope="module")
def llama_tok(llama_model):
    return SentencePieceBPE.from_model_file(llama_model)


@pytest.fixture(scope="module")
def tok512(data_dir):
    return SentencePieceBPE.from_model_file(data_dir / "llama2c" / "tok512.model")


@pytest.fixture(scope="module")
def llama_spm(llama_model):
    if spm is None:
        pytest.skip("sentencepiece not installed")
    return spm.SentencePieceProcessor(model_file=str(llama_model))


@pytest.fixture(scope="module")
def tok512_spm(data_dir):
    if spm is None:
        pytest.skip("sentencepiece not installed")
    return spm.SentencePieceProcessor(model_file=str(data_dir / "llama2c" / "tok512.model"))


@pytest.fixture(scope="module")
def llama_corpus(data_dir):
    return _read_jsonl(data_dir / "tokenizer_corpus" / "llama2_spm.jsonl")


# ----------------------------------------------------------------------------- encoding


def test_model_metadata(llama_tok, tok512):
    assert llama_tok.vocab_size == 32000
    assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.unk_id) == (1, 2, 0)
    assert llama_tok.add_dummy_prefix and not llama_tok.remove_extra_whitespaces
    assert tok512.vocab_size == 512
    assert tok512.add_dummy_prefix and tok512.remove_extra_whitespaces
    assert llama_tok.id_to_piece(29871) == "\u2581"
    assert llama_tok.id_to_piece(3) == "<0x00>"
    assert llama_tok.types[3] == BYTE and llama_tok.types[1] == CONTROL
    assert llama_tok.types[0] == UNKNOWN and llama_tok.types[500] == NORMAL


@pytest.mark.parametrize("model,corpus", [("tokenizer.model", "llama2_spm.jsonl"),
                                          ("tok512.model", "tok512_spm.jsonl")])
def test_corpus_matches_sentencepiece(data_dir, model, corpus):
    tok = SentencePieceBPE.from_model_file(data_dir / "llama2c" / model)
    rows = _read_jsonl(data_dir / "tokenizer_corpus" / corpus)
    assert len(rows) == 252
    mismatches = [(r["text"], tok.encode(r["text"]), r["ids"])
                  for r in rows if tok.encode(r["text"]) != r["ids"]]
    assert not mismatches, mismatches[:3]
    # The pieces agree too (checks id_to_piece on the ids that matter).
    for r in rows[:50]:
        assert [tok.id_to_piece(i) for i in r["ids"]] == r["pieces"]


def test_llamacpp_vocab_conformance(data_dir, llama_tok):
    base = data_dir / "llamacpp_vocab" / "ggml-vocab-llama-spm.gguf"
    inp = base.with_name(base.name + ".inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""
    texts = texts[:-1]
    out = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    expected = [[int(x) for x in line.strip().split(" ")] if line.strip() else []
                for line in out[:len(texts)]]
    assert len(texts) == len(expected) == 46
    got = [llama_tok.encode(t) for t in texts]
    failures = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not failures, failures[:3]


def test_encode_bos_eos(llama_tok):
    assert llama_tok.encode("") == []
    assert llama_tok.encode("", add_bos=True, add_eos=True) == [1, 2]
    ids = llama_tok.encode("Hello world", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == llama_tok.encode("Hello world")


def test_special_token_text_is_plain_text(llama_tok):
    # "<s>" in the input is ordinary text, never the BOS control token.
    ids = llama_tok.encode("<s>hi</s>")
    assert 1 not in ids and 2 not in ids
    assert llama_tok.decode(ids) == "<s>hi</s>"


def test_parse_special(llama_tok, tok512):
    # Control and <unk> texts become those pieces; every text part gets the dummy-prefix
    # space, as in llama.cpp (parse_special=true).
    hi = llama_tok.encode("hi")
    assert llama_tok.encode("<s>hi</s>", parse_special=True) == [1] + hi + [2]
    assert llama_tok.encode("hi<s>hi", parse_special=True) == hi + [1] + hi
    assert llama_tok.encode("<unk><s>", parse_special=True) == [0, 1]
    assert llama_tok.encode("<s>hi", parse_special=False) == llama_tok.encode("<s>hi")
    assert llama_tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert llama_tok.add_bos_default and tok512.add_bos_default


def test_encode_speed(llama_tok, tok512, llama_corpus):
    texts = [r["text"] for r in llama_corpus]
    t0 = time.perf_counter()
    for t in texts:
        llama_tok.encode(t)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"encoding the 252-string corpus took {elapsed:.3f} s"
    # A long single "word" with no spaces must not be quadratic.
    t0 = time.perf_counter()
    llama_tok.encode("ab" * 5000)
    tok512.encode("x" * 10000)
    assert time.perf_counter() - t0 < 1.0


# Random text drawn from characters that exercise spaces, the literal "▁", tabs, byte
# fallback and multi-byte characters.
_ALPHABET = st.sampled_from([" ", "  ", "\u2581", "a", "b", "the", "\t", "\n", "\u00e9",
                             "\U0001F600", "\u3000", "\u4e2d", "1", "23", "<s>", "\x00"])
_TEXT = st.lists(_ALPHABET, max_size=12).map("".join)


@needs_spm
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_TEXT, st.text(max_size=20)))
def test_encode_random_text_matches_sentencepiece(llama_tok, llama_spm, tok512, tok512_spm, text):
    assert llama_tok.encode(text) == llama_spm.encode(text)
    # tok512 folds whitespace (remove_extra_whitespaces=true): a different code path.
    assert tok512.encode(text) == tok512_spm.encode(text)


# ----------------------------------------------------------------------------- decoding


def test_corpus_round_trip(llama_tok, llama_corpus):
    for r in llama_corpus:
        text = r["text"]
        decoded = llama_tok.decode(r["ids"])
        if "\u2581" in text:
            # SentencePiece writes spaces as "▁", so a literal "▁" in the input encodes
            # exactly like a space and decodes as one: this cannot round-trip.
            assert decoded == text.replace("\u2581", " ")
        else:
            assert decoded == text


@needs_spm
def test_corpus_decode_matches_sentencepiece(llama_tok, llama_spm, tok512, tok512_spm,
                                             llama_corpus, data_dir):
    for r in llama_corpus:
        assert llama_tok.decode(r["ids"]) == llama_spm.decode(r["ids"])
    for r in _read_jsonl(data_dir / "tokenizer_corpus" / "tok512_spm.jsonl"):
        assert tok512.decode(r["ids"]) == tok512_spm.decode(r["ids"])


def _id_lists(vocab_size, space_ids):
    # Mostly byte pieces (3..258) so that invalid and split UTF-8 is common, plus the
    # control/unknown ids, pieces starting with "▁", and arbitrary ids.
    interesting = st.one_of(st.integers(3, 258), st.sampled_from([0, 1, 2] + space_ids),
                            st.integers(0, vocab_size - 1))
    return st.lists(interesting, max_size=12)


_LLAMA_SPACE_IDS = [259, 29871, 1678, 268, 15043, 3186]  # "▁▁", "▁", "▁▁▁", ..., "▁Hello", "▁world"
_TOK512_SPACE_IDS = [261, 266, 267, 270]


@needs_spm
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_id_lists(32000, _LLAMA_SPACE_IDS))
def test_decode_random_ids_matches_sentencepiece(llama_tok, llama_spm, ids):
    assert llama_tok.decode(ids) == llama_spm.decode(ids)


@needs_spm
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_id_lists(512, _TOK512_SPACE_IDS))
def test_decode_random_ids_matches_sentencepiece_tok512(tok512, tok512_spm, ids):
    # remove_extra_whitespaces=true changes which leading "▁" sentencepiece strips.
    assert tok512.decode(ids) == tok512_spm.decode(ids)


@needs_spm
def test_decode_invalid_utf8_like_sentencepiece(llama_tok, llama_spm):
    def b(*xs):
        return [x + 3 for x in xs]  # byte value -> <0xNN> id in the Llama vocab

    cases = [
        b(0xE2, 0x82),                # truncated 3-byte character
        b(0xE2, 0x82) + [319],        # ... followed by a normal piece
        b(0xED, 0xA0, 0x80),          # UTF-8-encoded surrogate
        b(0xC0, 0xAF),                # overlong
        b(0xF4, 0x90, 0x80, 0x80),    # above U+10FFFF
        b(0xEF, 0xBF, 0xBD),          # a real U+FFFD
        b(0xF0, 0x9F, 0x98) + [319] + b(0x80),  # a character cut by a normal piece
        b(0x80, 0x41, 0xFF),
    ]
    for ids in cases:
        assert llama_tok.decode(ids) == llama_spm.decode(ids), ids
    assert llama_tok.decode(b(0xE2, 0x82)) == "\ufffd\ufffd"  # one U+FFFD per bad byte


def test_decode_rules(llama_tok):
    hello = llama_tok.encode("Hello")  # ["▁Hello"]
    assert llama_tok.decode(hello) == "Hello"  # leading space of the first piece dropped
    assert llama_tok.decode([1] + hello) == "Hello"  # BOS is invisible
    assert llama_tok.decode(hello + hello) == "Hello Hello"
    assert llama_tok.decode([0]) == " \u2047 "  # <unk>
    with pytest.raises(IndexError):
        llama_tok.decode([32000])


def test_token_bytes_match_llama_cpp_and_sentencepiece(data_dir, llama_spm):
    """Tokenizer.token_bytes of every token of Llama's SentencePiece vocabulary (32,000 pieces,
    256 of them byte pieces) equals llama.cpp's llama_token_to_piece (leading space kept, no
    special text: a control token adds nothing), but for the unknown token, which llama.cpp
    writes as nothing and sentencepiece (whose decoding xllm follows) as " ⁇ " after other
    text."""
    path = data_dir / "llamacpp_vocab" / "ggml-vocab-llama-spm.gguf"
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceBPE)
    assert sum(kind == BYTE for kind in tok.types) == 256
    want = llama_cpp_token_pieces(path, special=False)
    got = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert len(want) == len(got) == 32000
    assert [i for i in range(len(got)) if got[i] != want[i]] == [tok.unk_id]
    assert llama_spm.id_to_piece(tok.unk_id) == tok.id_to_piece(tok.unk_id)
    the = llama_spm.piece_to_id("\u2581The")
    after_the = llama_spm.decode_ids([the, tok.unk_id])[len(llama_spm.decode_ids([the])):]
    assert got[tok.unk_id] == after_the.encode("utf-8") == " \u2047 ".encode("utf-8")
    for bad in (-1, len(got)):
        with pytest.raises(IndexError):
            tok.token_bytes(bad)


# ----------------------------------------------------------------------------- streaming


def _stream(tok, ids, strip=True):
    d = tok.decoder(strip_leading_space=strip)
    parts = [d.push(i) for i in ids]
    return parts, d.flush()


def _assert_whole_chars(s):
    # Python str cannot hold half a UTF-8 sequence, but a broken decoder could emit a
    # lone surrogate; every emitted chunk must be encodable on its own.
    s.encode("utf-8")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_id_lists(32000, _LLAMA_SPACE_IDS))
def test_stream_equals_decode(llama_tok, ids):
    parts, tail = _stream(llama_tok, ids)
    for p in parts + [tail]:
        _assert_whole_chars(p)
    assert "".join(parts) + tail == llama_tok.decode(ids)
    # Without stripping, the output is what these ids add after earlier text: decode
    # them behind a piece that produces text ("a" = id 29874) and drop that prefix.
    parts, tail = _stream(llama_tok, ids, strip=False)
    assert "".join(parts) + tail == llama_tok.decode([29874] + ids)[1:]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_id_lists(512, _TOK512_SPACE_IDS))
def test_stream_equals_decode_tok512(tok512, ids):
    parts, tail = _stream(tok512, ids)
    assert "".join(parts) + tail == tok512.decode(ids)


def test_stream_holds_back_partial_characters(llama_tok):
    emoji = "\U0001F600".encode("utf-8")
    d = llama_tok.decoder(strip_leading_space=False)
    assert [d.push(b + 3) for b in emoji[:3]] == ["", "", ""]
    assert d.push(emoji[3] + 3) == "\U0001F600"
    # A truncated character is released as U+FFFD once the next non-byte piece arrives.
    assert d.push(0xE2 + 3) == ""
    assert d.push(llama_tok.encode("Hi")[0]) == "\ufffd Hi"
    assert d.flush() == ""


def test_stream_on_corpus(llama_tok, llama_corpus):
    for r in llama_corpus:
        parts, tail = _stream(llama_tok, r["ids"])
        assert "".join(parts) + tail == llama_tok.decode(r["ids"])


# ----------------------------------------------------------------------------- llama2.c


def test_llama2c_tok512_matches_model(data_dir, tok512):
    b = SentencePieceBPE.from_llama2c_file(data_dir / "llama2c" / "tok512.bin", 512)
    assert b.pieces == tok512.pieces
    assert b.scores == tok512.scores
    assert b.types == tok512.types
    assert (b.bos_id, b.eos_id, b.unk_id) == (1, 2, 0)
    # Like run.c, the .bin tokenizer does not fold whitespace.
    assert not b.remove_extra_whitespaces and b.add_dummy_prefix


def test_llama2c_full_vocab_matches_model(data_dir, llama_tok):
    b = load_tokenizer(data_dir / "llama2c" / "tokenizer.bin", vocab_size=32000)
    assert b.pieces == llama_tok.pieces and b.scores == llama_tok.scores
    assert b.types == llama_tok.types


@pytest.mark.parametrize("tokfile,greedy", [("tok512.bin", "stories260K_greedy.jsonl"),
                                            ("aidreams260K_tok512.bin", "aidreams260K_greedy.jsonl")])
def test_llama2c_prompts(data_dir, tokfile, greedy):
    tok = load_tokenizer(data_dir / "llama2c" / tokfile, vocab_size=512)
    assert tok.vocab_size == 512
    rows = _read_jsonl(data_dir / "llama2c" / greedy)
    assert rows
    for r in rows:
        assert tok.encode(r["prompt"], add_bos=True) == r["prompt_tokens"]


# ----------------------------------------------------------------------------- synthetic vocabularies


def _tiny(**kw):
    pieces = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "\u2581a", "ab", "abc", "<U>", "bc"]
    scores = [0, 0, 0, -1, -2, -2, -2, -1, -0.5, -0.2, 0, -0.5]
    types = [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL,
             NORMAL, USER_DEFINED, NORMAL]
    return SentencePieceBPE(pieces, scores, types, byte_fallback=False, **kw)


def test_from_pieces_merges_and_unk():
    tok = _tiny()
    # "ab" and "bc" tie at -0.5: the leftmost pair merges first, then "ab"+"c" -> "abc".
    assert tok.encode("abc") == [3, 9]
    # No byte pieces and byte_fallback off: a run of unknown characters is one <unk>
    # (as in sentencepiece), but <unk>s separated by known pieces stay separate.
    assert tok.encode("xy") == [3, 0]
    assert tok.encode("xyaz") == [3, 0, 4, 0]
    assert tok.decode([3, 0, 0]) == " \u2047  \u2047 "


def test_user_defined_pieces_are_whole_units():
    tok = _tiny()
    # "<U>" stays one frozen symbol; nothing merges across it.
    assert tok.encode("a<U>a") == [7, 10, 4]
    assert tok.decode([7, 10, 4]) == "a<U>a"


def test_unused_pieces():
    pieces = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "ab", "\u2581ab", "c"]
    scores = [0, 0, 0, -1, -2, -2, -0.5, -0.1, -2]
    types = [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, UNUSED, NORMAL, UNUSED]
    tok = SentencePieceBPE(pieces, scores, types, byte_fallback=False)
    # "ab" is UNUSED: it can still be an intermediate merge ("▁"+"ab" -> "▁ab") ...
    assert tok.encode("ab") == [7]
    # ... but if it survives to the end it is split back into "a", "b".
    tok2 = SentencePieceBPE(pieces, scores, types, byte_fallback=False,
                                        add_dummy_prefix=False)
    assert tok2.encode("ab") == [4, 5]
    # A single UNUSED character is never output: it counts as unknown.
    assert tok2.encode("c") == [0]


def _serialize_model(pieces, scores, types, *, byte_fallback, add_dummy_prefix, remove_extra,
                     specs=True):
    """A minimal SentencePiece ModelProto (BPE, identity normaliser) for testing.

    With ``specs=False`` only the pieces are written, like a file cut after them.
    """
    trainer = {TrainerField.MODEL_TYPE: BPE, TrainerField.BYTE_FALLBACK: byte_fallback}
    normalizer = {NormalizerField.NAME: "identity", NormalizerField.ADD_DUMMY_PREFIX: add_dummy_prefix,
                  NormalizerField.REMOVE_EXTRA_WHITESPACES: remove_extra}
    if not specs:
        return model_proto_bytes(zip(pieces, scores, types), None, None)
    return model_proto_bytes(zip(pieces, scores, types), trainer, normalizer)


@needs_spm
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_vocabularies_match_sentencepiece(tmp_path_factory, data):
    """Small random vocabularies with UNUSED and USER_DEFINED pieces, score ties, with
    and without byte fallback / whitespace folding, checked against sentencepiece."""
    chars = "ab\u2581c"
    words = data.draw(st.lists(st.text(chars, min_size=1, max_size=4), min_size=2,
                               max_size=20, unique=True))
    pieces, types, scores = ["<unk>", "<s>", "</s>"], [UNKNOWN, CONTROL, CONTROL], [0.0] * 3
    byte_fallback = data.draw(st.booleans())
    if byte_fallback:
        pieces += ["<0x%02X>" % b for b in range(256)]
        types += [BYTE] * 256
        scores += [0.0] * 256
    for w in words:
        pieces.append(w)
        types.append(data.draw(st.sampled_from([NORMAL, NORMAL, NORMAL, UNUSED, USER_DEFINED])))
        scores.append(data.draw(st.sampled_from([-0.5, -1.0, -1.5, -2.0, -3.0])))
    flags = dict(byte_fallback=byte_fallback, add_dummy_prefix=data.draw(st.booleans()),
                 remove_extra=data.draw(st.booleans()))
    path = tmp_path_factory.mktemp("spm") / "rand.model"
    path.write_bytes(_serialize_model(pieces, scores, types, **flags))
    ref = spm.SentencePieceProcessor(model_file=str(path))
    tok = SentencePieceBPE.from_model_file(path)
    for _ in range(10):
        text = data.draw(st.text("abc \u2581x\u00e9", max_size=25))
        assert tok.encode(text) == ref.encode(text), text
    ids = data.draw(st.lists(st.integers(0, len(pieces) - 1), max_size=10))
    assert tok.decode(ids) == ref.decode(ids)
    d = tok.decoder()
    assert "".join(d.push(i) for i in ids) + d.flush() == ref.decode(ids)


def test_from_pieces_validates():
    with pytest.raises(ModelFormatError):
        SentencePieceBPE(["a"], [0.0, 1.0], [NORMAL])
    with pytest.raises(ModelFormatError):
        SentencePieceBPE(["<0xZZ>"], [0.0], [BYTE], bos_id=-1, eos_id=-1, unk_id=-1)


# ----------------------------------------------------------------------------- bad files


def test_truncated_model_file(tmp_path, llama_model):
    data = llama_model.read_bytes()
    for cut in (len(data) // 2 + 3, len(data) - 5, 3):
        bad = tmp_path / f"cut{cut}.model"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=str(bad.name)):
            load_tokenizer(bad)


def test_model_cut_between_pieces(tmp_path):
    # Cut exactly after the pieces: still valid protobuf, but the specs are gone.
    args = (["<unk>", "a"], [0.0, 0.0], [UNKNOWN, NORMAL])
    flags = dict(byte_fallback=False, add_dummy_prefix=True, remove_extra=False)
    data = _serialize_model(*args, **flags)
    bad = tmp_path / "pieces_only.model"
    bad.write_bytes(_serialize_model(*args, **flags, specs=False))
    with pytest.raises(ModelFormatError, match="pieces_only.model.*truncated"):
        load_tokenizer(bad)
    ok = tmp_path / "ok.model"
    ok.write_bytes(data)
    assert load_tokenizer(ok).encode("a") == [0, 1]  # "▁" is unknown, no byte fallback


def test_model_proto_written_is_read_back(llama_model):
    """The writer and the reader of tokenizer.model agree, on every field type they use."""
    pieces = [("<unk>", 0.0, UNKNOWN), ("\u2581a", -1.5, NORMAL), ("<0x41>", 0.0, BYTE)]
    trainer = {TrainerField.MODEL_TYPE: BPE, TrainerField.BYTE_FALLBACK: True, TrainerField.PAD_ID: -1,
               TrainerField.UNK_SURFACE: " \u2047 "}
    normalizer = {NormalizerField.NAME: "identity", NormalizerField.ADD_DUMMY_PREFIX: False}
    model = read_model_proto(model_proto_bytes(pieces, trainer, normalizer))
    assert [*zip(model.pieces, model.scores, model.types)] == pieces
    assert model.trainer == {TrainerField.MODEL_TYPE: BPE, TrainerField.BYTE_FALLBACK: 1,
                             TrainerField.PAD_ID: 2**64 - 1, TrainerField.UNK_SURFACE: " \u2047 ".encode()}
    assert model.normalizer == {NormalizerField.NAME: b"identity", NormalizerField.ADD_DUMMY_PREFIX: 0}
    assert read_model_proto(model_proto_bytes(pieces, None, None)).trainer is None
    # the Llama 2 file: its pieces, written again, read back the same
    real = read_model_proto(llama_model.read_bytes())
    again = read_model_proto(model_proto_bytes(zip(real.pieces, real.scores, real.types),
                                               real.trainer, None))
    assert (again.pieces, again.scores, again.types) == (real.pieces, real.scores, real.types)
    assert again.trainer == real.trainer


def test_random_bytes(tmp_path):
    rng = random.Random(1234)
    for k in range(20):
        bad = tmp_path / f"random{k}.model"
        bad.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))))
        with pytest.raises(ModelFormatError, match=bad.name):
            load_tokenizer(bad)
    bad = tmp_path / "random.tok"
    bad.write_bytes(bytes(rng.randrange(256) for _ in range(1000)))
    with pytest.raises(ModelFormatError, match=bad.name):
        load_tokenizer(bad, vocab_size=512)


def test_llama2c_bin_ends_early(tmp_path, data_dir):
    data = (data_dir / "llama2c" / "tok512.bin").read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 2):
        bad = tmp_path / f"tok{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=bad.name):
            load_tokenizer(bad, vocab_size=512)
    # A wrong vocab size is caught as well (too many or too few entries).
    good = data_dir / "llama2c" / "tok512.bin"
    for v in (513, 511):
        with pytest.raises(ModelFormatError, match="tok512.bin"):
            load_tokenizer(good, vocab_size=v)


def test_missing_file_and_missing_vocab_size(tmp_path, data_dir):
    with pytest.raises(ModelFormatError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(ModelFormatError, match="tok512.bin"):
        load_tokenizer(data_dir / "llama2c" / "tok512.bin")  # no vocab_size


def test_load_tokenizer_sniffs_unknown_names(tmp_path, data_dir, tok512):
    copy = tmp_path / "tokenizer"
    copy.write_bytes((data_dir / "llama2c" / "tok512.model").read_bytes())
    assert load_tokenizer(copy).pieces == tok512.pieces
    copy2 = tmp_path / "vocab.dat"
    copy2.write_bytes((data_dir / "llama2c" / "tok512.bin").read_bytes())
    assert load_tokenizer(copy2, vocab_size=512).pieces == tok512.pieces


@needs_spm
@pytest.mark.parametrize("unit", ["a", "ab", "\u4e2d\u6587", "aab", " a", "1", "\u00e9"])
def test_long_words_match_sentencepiece(llama_tok, llama_spm, tok512, tok512_spm, unit):
    # 20,000 characters without a space, and random letters (the heap merge on long input)
    texts = [unit * (20_000 // len(unit)),
             "".join(random.Random(unit).choice("abcdefgh\u00e9") for _ in range(20_000))]
    for text in texts:
        assert llama_tok.encode(text) == llama_spm.encode(text)
        assert tok512.encode(text) == tok512_spm.encode(text)
