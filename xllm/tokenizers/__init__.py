"""Tokenizers: one base (base.py), SentencePiece BPE and byte-level BPE beside it, and loading
them from files (loading.py)."""
from .base import (BYTE, CONTROL, ESCAPE_MARK, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                   StreamDecoder, Tokenizer)
from .byte_level import PRE_TOKENIZERS, ByteLevelBPE
from .loading import load_tokenizer, tokenizer_from_gguf
from .sentencepiece import SentencePieceBPE

__all__ = ["BYTE", "CONTROL", "ESCAPE_MARK", "NORMAL", "UNKNOWN", "UNUSED", "USER_DEFINED",
           "StreamDecoder", "Tokenizer", "PRE_TOKENIZERS", "ByteLevelBPE", "load_tokenizer",
           "tokenizer_from_gguf", "SentencePieceBPE"]
