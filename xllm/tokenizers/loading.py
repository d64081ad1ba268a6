"""Tokenizers from files: ``load_tokenizer(path)`` and ``tokenizer_from_gguf(metadata)``."""
import os

from ..errors import ModelFormatError
from ..files.common import check_regular_file
from ..files.gguf import read_gguf_metadata, typed_list, typed_value
from .base import BYTE, NORMAL
from .byte_level import ByteLevelBPE
from .sentencepiece import SentencePieceBPE


def load_tokenizer(path, vocab_size=None):
    """Load a tokenizer file: ``*.model`` (SentencePiece), ``*.bin`` (llama2.c; needs
    ``vocab_size``), ``*.gguf`` (its metadata), ``*.json`` (Hugging Face byte-level BPE); other
    names are tried as SentencePiece, then llama2.c. Raises ``ModelFormatError`` naming the file."""
    path = os.fspath(path)
    try:
        check_regular_file(path)  # a FIFO would block the read forever
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such tokenizer file") from None
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".model":
        return SentencePieceBPE.from_model_file(path)
    if suffix == ".gguf":
        return tokenizer_from_gguf(read_gguf_metadata(path), path)
    if suffix == ".json":
        return ByteLevelBPE.from_tokenizer_json(path)
    if suffix != ".bin":
        try:
            return SentencePieceBPE.from_model_file(path)
        except ModelFormatError as e:
            if vocab_size is None:
                raise ModelFormatError(f"{e}; if it is a llama2.c tokenizer .bin, pass "
                                       "vocab_size") from None
    if vocab_size is None:
        raise ModelFormatError(
            f"{path}: a llama2.c tokenizer .bin needs vocab_size (from the model header)")
    return SentencePieceBPE.from_llama2c_file(path, vocab_size)


def tokenizer_from_gguf(meta: dict, name: str = "GGUF file"):
    """The tokenizer that GGUF metadata describes (``tokenizer.ggml.model`` ``llama`` or
    ``gpt2``); otherwise ``ModelFormatError`` naming ``name`` (and the field, if one has the
    wrong type)."""
    fields = _GGUFTokenizerFields(meta, name)
    model = fields.get("model", str)
    tokens = fields.get_list("tokens", str)
    types = fields.get_list("token_type", int)
    try:
        if model not in ("llama", "gpt2"):
            raise ModelFormatError(f"tokenizer model {model!r} is not supported "
                                   "(only 'llama' and 'gpt2')")
        if not tokens:
            raise ModelFormatError("no tokenizer.ggml.tokens")
        if model == "gpt2":
            return _byte_level_from_gguf(fields, tokens, types)
        return _sentencepiece_from_gguf(fields, tokens, types)
    except ModelFormatError as e:
        raise ModelFormatError(f"{name}: {e}") from None


class _GGUFTokenizerFields:
    """Typed reads of the ``tokenizer.ggml.*`` fields of GGUF metadata."""

    def __init__(self, meta, name):
        self.meta = meta
        self.name = name

    def get(self, key, kind, default=None):
        return typed_value(self.meta, "tokenizer.ggml." + key, kind, default, self.name)

    def get_list(self, key, kind, default=None):
        return typed_list(self.meta, "tokenizer.ggml." + key, kind, default, self.name)


def _byte_level_from_gguf(fields, tokens, types):
    return ByteLevelBPE.from_gguf_fields(
        tokens, fields.get_list("merges", str, []), types, fields.get("pre", str, "default"),
        bos_id=fields.get("bos_token_id", int, -1),
        eos_id=fields.get("eos_token_id", int, -1),
        unk_id=fields.get("unknown_token_id", int, -1),
        add_bos=fields.get("add_bos_token", bool, False))


def _sentencepiece_from_gguf(fields, tokens, types):
    """With llama.cpp's defaults for the fields that are missing."""
    scores = fields.get_list("scores", float, [0.0] * len(tokens))
    return SentencePieceBPE(
        tokens, scores, types or [NORMAL] * len(tokens),
        bos_id=fields.get("bos_token_id", int, 1),
        eos_id=fields.get("eos_token_id", int, 2),
        unk_id=fields.get("unknown_token_id", int, 0),
        add_dummy_prefix=fields.get("add_space_prefix", bool, True),
        byte_fallback=BYTE in (types or ()),
        add_bos_default=fields.get("add_bos_token", bool, True))
