"""The SentencePiece model file (``tokenizer.model``), read and written: a ``ModelProto`` of
sentencepiece_model.proto in the protobuf encoding, handled here without protobuf.

Only the parts xllm uses have names: the pieces (text, score, type), and the fields of the
TrainerSpec and NormalizerSpec messages, which are kept as ``{field number: value}`` dicts
(the numbers are the constants of ``TrainerField`` and ``NormalizerField``)."""
import struct
from dataclasses import dataclass
from typing import Optional

from .base import NORMAL

# Protobuf wire types.
VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

_MAX_VARINT_BITS = 70  # a varint has at most 10 bytes of 7 bits


class ModelField:
    """Field numbers of ModelProto."""
    PIECE = 1  # repeated SentencePiece
    TRAINER_SPEC = 2
    NORMALIZER_SPEC = 3


class PieceField:
    """Field numbers of ModelProto.SentencePiece."""
    TEXT = 1
    SCORE = 2
    TYPE = 3


class TrainerField:
    """Field numbers of TrainerSpec."""
    MODEL_TYPE = 3
    VOCAB_SIZE = 4
    TREAT_WHITESPACE_AS_SUFFIX = 24
    BYTE_FALLBACK = 35
    UNK_ID = 40
    BOS_ID = 41
    EOS_ID = 42
    PAD_ID = 43
    UNK_SURFACE = 44
    BOS_PIECE = 46
    EOS_PIECE = 47


class NormalizerField:
    """Field numbers of NormalizerSpec."""
    NAME = 1
    PRECOMPILED_CHARSMAP = 2
    ADD_DUMMY_PREFIX = 3
    REMOVE_EXTRA_WHITESPACES = 4
    ESCAPE_WHITESPACES = 5


#: TrainerSpec.model_type values.
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
UNIGRAM = 1
BPE = 2


@dataclass
class ModelProto:
    """What ``read_model_proto`` found: the pieces, and the TrainerSpec and NormalizerSpec
    fields (None when the message is absent, as in a file cut after the pieces)."""
    pieces: list
    scores: list
    types: list
    trainer: Optional[dict]
    normalizer: Optional[dict]


# ----------------------------------------------------------------------------- reading


def read_varint(buf: bytes, pos: int):
    """The varint at ``buf[pos]`` and the position after it."""
    result = 0
    shift = 0
    while shift < _MAX_VARINT_BITS:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:  # no continuation bit: the last byte
            return result, pos
    raise ValueError("varint is longer than 10 bytes")


def iter_fields(buf: bytes):
    """``(field number, value)`` of one message: an int (varint), else the raw bytes (wire
    types 1, 2 and 5; a nested message is parsed by calling this on them)."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number = key >> 3
        wire = key & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire in (FIXED64, LENGTH_DELIMITED, FIXED32) and number:
            size, pos = _payload_size(buf, pos, wire)
            value = buf[pos:pos + size]
            pos += size
            if pos > len(buf):
                raise ValueError("a field runs past the end of the data")
        else:
            raise ValueError(f"field {number} has unsupported wire type {wire}")
        yield number, value


def _payload_size(buf, pos, wire):
    """The size of the payload of a field of wire type ``wire`` at ``pos``, and where it starts."""
    if wire == LENGTH_DELIMITED:
        return read_varint(buf, pos)
    if wire == FIXED64:
        return 8, pos
    return 4, pos


def read_model_proto(data: bytes) -> ModelProto:
    """Parse a serialized ModelProto. Repeated spec messages merge, the last value of a field
    winning (as protobuf does)."""
    model = ModelProto([], [], [], None, None)
    for number, value in iter_fields(data):
        if number == ModelField.PIECE:
            piece = dict(iter_fields(value))
            model.pieces.append(piece[PieceField.TEXT].decode("utf-8"))
            model.scores.append(struct.unpack("<f", piece.get(PieceField.SCORE, bytes(4)))[0])
            model.types.append(piece.get(PieceField.TYPE, NORMAL))
        elif number == ModelField.TRAINER_SPEC:
            model.trainer = _merged(model.trainer, value)
        elif number == ModelField.NORMALIZER_SPEC:
            model.normalizer = _merged(model.normalizer, value)
    return model


def _merged(fields: Optional[dict], message: bytes) -> dict:
    merged = {} if fields is None else fields
    merged.update(iter_fields(message))
    return merged


# ----------------------------------------------------------------------------- writing


def encode_varint(value: int) -> bytes:
    """``value`` as a varint; a negative one as its 64-bit two's complement (as protobuf
    writes a negative int32 such as pad_id=-1)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low_bits = value & 0x7F
        value >>= 7
        if not value:
            out.append(low_bits)
            return bytes(out)
        out.append(low_bits | 0x80)  # more bytes follow


def encode_field(number: int, value) -> bytes:
    """One field: an int or bool as a varint, a float as float32, text or bytes as they are,
    a dict or list of ``(number, value)`` as a nested message."""
    if isinstance(value, (bool, int)):
        return encode_varint(number << 3 | VARINT) + encode_varint(value)
    if isinstance(value, float):
        return encode_varint(number << 3 | FIXED32) + struct.pack("<f", value)
    if isinstance(value, str):
        payload = value.encode("utf-8")
    elif isinstance(value, (dict, list)):
        payload = encode_message(value)
    else:
        payload = bytes(value)
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def encode_message(fields) -> bytes:
    """A message of ``fields``: a ``{number: value}`` dict or a list of ``(number, value)``
    (for repeated fields), written in that order."""
    items = fields.items() if isinstance(fields, dict) else fields
    return b"".join(encode_field(number, value) for number, value in items)


def model_proto_bytes(pieces, trainer: Optional[dict], normalizer: Optional[dict]) -> bytes:
    """A serialized ModelProto of ``pieces`` (``(text, score, type)`` triples) and the
    TrainerSpec and NormalizerSpec fields (``{number: value}``; None leaves the message out)."""
    fields = []
    for text, score, kind in pieces:
        piece = {PieceField.TEXT: text, PieceField.SCORE: float(score), PieceField.TYPE: kind}
        fields.append((ModelField.PIECE, piece))
    if trainer is not None:
        fields.append((ModelField.TRAINER_SPEC, trainer))
    if normalizer is not None:
        fields.append((ModelField.NORMALIZER_SPEC, normalizer))
    return encode_message(fields)


def write_model_proto(path, pieces, trainer: Optional[dict], normalizer: Optional[dict]) -> None:
    """Write ``model_proto_bytes(pieces, trainer, normalizer)`` to the file ``path``."""
    with open(path, "wb") as f:
        f.write(model_proto_bytes(pieces, trainer, normalizer))
