"""Hostile text (issue 13): costs linear or n log n in the input's length for the tokenizers,
the special-token splitter and the stop filter; a budget for chat templates; message contents
encoded as text, never as control tokens."""

import time

import pytest

from xllm.bpe import PRE_TOKENIZERS, ByteLevelBPE
from xllm.tokenizer import CONTROL, NORMAL, SentencePieceBPE, load_tokenizer

_RATIO = 15  # the bar: 10x the input may cost at most 15x the time


def _seconds(f, arg, repeat):
    """The best of `repeat` CPU times (other processes share the cores: wall time would
    count their turns too)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        f(arg)
        best = min(best, time.process_time() - t0)
    return best


def _scaling(f, unit, small=100_000):
    """Seconds for `small` characters made of `unit` and for 10x that, and their ratio."""
    short = (unit * (small // len(unit) + 1))[:small]
    long = (unit * (10 * small // len(unit) + 1))[:10 * small]
    t_short, t_long = _seconds(f, short, 5), _seconds(f, long, 2)
    return t_short, t_long, t_long / max(t_short, 1e-3)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def llama_spm(data_dir):
    return SentencePieceBPE.from_model_file(data_dir / "llama2c" / "tokenizer.model")


# ----------------------------------------------------------------------------- tokenizers


def test_byte_level_bpe_long_word_scales(smollm2):
    # 'a' * 10**6 took 194 s (one word: the merge loop was quadratic)
    short, long, ratio = _scaling(smollm2.encode, "a")
    print(f"\nSmolLM2, one word of 'a': 100 kB {short:.3f} s, 1 MB {long:.3f} s, "
          f"ratio {ratio:.1f}")
    assert ratio <= _RATIO
    assert long < 2.0  # the bar (HF tokenizers: 0.8 s)


def test_sentencepiece_long_word_scales(llama_spm):
    short, long, ratio = _scaling(llama_spm.encode, "a")
    print(f"\nLlama 2 SentencePiece, one word of 'a': 100 kB {short:.3f} s, 1 MB {long:.3f} s, "
          f"ratio {ratio:.1f}")
    assert ratio <= _RATIO


@pytest.mark.parametrize("unit", [" ", "1", "\u4e2d", "\n", " a", "'s", "a1 !\n\u4e2d\t", "ab"])
def test_pre_tokenizers_scale(unit):
    # every pre-tokenizer's regexes on runs that could backtrack (1 MB against 100 kB)
    for name, patterns in PRE_TOKENIZERS.items():
        tok = ByteLevelBPE(["a"], [], pre_patterns=patterns)
        short, long, ratio = _scaling(tok.pre_tokenize, unit)
        assert ratio <= _RATIO or long < 0.05, (name, unit, short, long)


def test_special_token_splitter_scales():
    # 256 special tokens sharing a prefix: a flat alternation tried all of them at every "<"
    # (1 MB of "<|" took 2 s)
    specials = [f"<|reserved_special_token_{i}|>" for i in range(250)] + ["<|im_end|>"]
    pieces = ["a", "<", "|", *specials]
    tok = ByteLevelBPE(pieces, [], [NORMAL] * 3 + [CONTROL] * len(specials))
    text = "<|" * 500_000
    t0 = time.perf_counter()
    assert len(tok.encode(text, parse_special=True)) == 10**6
    assert time.perf_counter() - t0 < 2.0
    assert tok.encode("x<|im_end|><|reserved_special_token_12|>y", parse_special=True) == [
        tok.special_tokens["<|im_end|>"], tok.special_tokens["<|reserved_special_token_12|>"]]


def test_special_token_splitter_longest_match_and_deep_tries():
    # the longest text wins where several start at the same place; a trie too deep for one
    # regex (texts that extend each other 300 times) still splits the same way
    texts = ["a" * i for i in range(1, 301)] + ["<s>", "<s>x"]
    tok = ByteLevelBPE(["b", *texts], [], [NORMAL] + [CONTROL] * len(texts))
    ids = tok.encode("a" * 310 + "b<s>x<s>", parse_special=True)
    assert ids == [tok.special_tokens["a" * 300], tok.special_tokens["a" * 10], 0,
                   tok.special_tokens["<s>x"], tok.special_tokens["<s>"]]
