"""Constrained decoding: a sequence's next token limited to those a grammar allows.

A :class:`Constraint` says what the output must be: text matching a JSON schema, a grammar
(GBNF or Lark), a regular expression, or one of a list of strings. The grammars are those of
llguidance (a Rust library with Python bindings, MIT-licensed, no dependencies; see
docs/structured.rst for why it and not xgrammar): every kind compiles to one llguidance grammar.

Per sequence, a :class:`Matcher` follows the tokens generated and, before each token, writes
the bitmask of the tokens the grammar allows next (bit ``t % 32`` of 32-bit word ``t // 32``
is token ``t``); :func:`xllm.engine.sampling.apply_token_mask` then gives every other token a
logit of -inf, so greedy and sampled decoding both pick an allowed token. Once the grammar is
complete only the model's end-of-sequence tokens are allowed.

Off the critical path: the mask of a sequence's next token depends only on the tokens it has
so far, never on the logits, so a :class:`MaskJob` computes it on a helper thread (llguidance
releases the GIL) while the forward pass that gives those logits runs.

Determinism: a sequence's mask depends on its own grammar and tokens alone, and masking draws
no random number, so a constrained request gives the same tokens whatever runs beside it, as
an unconstrained one does."""
import json
import threading
import weakref
from typing import Optional

import numpy as np

from ..errors import ConstraintError

# llguidance marks the tokens that no grammar may produce as text (control tokens) by this
# first byte, which never begins valid UTF-8
_SPECIAL_MARK = b"\xff"
_CHOICES_LIMIT = 10_000  # strings a `choices` list may hold
_JSON_DEFAULTS = {"whitespace_flexible": False}  # a schema's "x-guidance" may override them


def _llguidance():
    """The llguidance module, imported on first use (loading a model does not need it)."""
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("constrained decoding needs the llguidance package: "
                              "pip install 'xllm-cpu[structured]'") from None
    return llguidance


class Constraint:
    """What a sequence's output must be, as one llguidance grammar (``grammar_text``).

    Build one with :meth:`json_schema`, :meth:`grammar`, :meth:`regex`, :meth:`choices` or
    :meth:`from_arguments`; malformed input raises ConstraintError (TypeError for a wrong
    type). The grammar is checked against a vocabulary when a :class:`Matcher` is made."""

    def __init__(self, kind: str, grammar_text: str):
        self.kind = kind
        self.grammar_text = grammar_text

    def __repr__(self):
        return f"Constraint({self.kind})"

    @classmethod
    def json_schema(cls, schema) -> "Constraint":
        """JSON text valid under `schema` (a dict, or its JSON text). ``{"type": "object"}``
        is any JSON object (OpenAI's ``json_object`` mode). The JSON is compact (no whitespace
        between tokens: fewer tokens, and no run of blanks a small model may loop on) unless
        the schema asks otherwise with llguidance's ``"x-guidance": {"whitespace_flexible":
        true}``."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise TypeError(f"json_schema must be a dict (a JSON schema), got "
                            f"{type(schema).__name__}")
        try:
            text = _llguidance().LLMatcher.grammar_from_json_schema(schema,
                                                                   defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"json_schema: {e}") from None
        return cls("json_schema", text)

    @classmethod
    def grammar(cls, text) -> "Constraint":
        """Text of a context-free grammar: GBNF (llama.cpp's, rules written ``name ::= ...``,
        starting at ``root``) or Lark (llguidance's dialect, starting at ``start``; it may embed
        JSON schemas with ``%json {...}``)."""
        if not isinstance(text, str):
            raise TypeError(f"grammar must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ConstraintError("grammar is empty")
        try:
            compiled = _llguidance().grammar_from("grammar", text)
        except ValueError as e:
            raise ConstraintError(f"grammar: {e}") from None
        return cls("grammar", compiled)

    @classmethod
    def regex(cls, pattern) -> "Constraint":
        """Text matching the whole of `pattern` (Rust regex syntax: no look-around, no
        back-references). ``\\d`` is an ASCII digit, as in JavaScript and JSON Schema (in Rust
        and Python it is any Unicode digit)."""
        if not isinstance(pattern, str):
            raise TypeError(f"regex must be a str, got {type(pattern).__name__}")
        llguidance = _llguidance()
        lark = "start: /" + llguidance.regex_to_lark(pattern, "d") + "/"
        return cls("regex", llguidance.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def choices(cls, options) -> "Constraint":
        """Exactly one of the strings `options`."""
        if isinstance(options, (str, bytes)) or not isinstance(options, (list, tuple)):
            raise TypeError(f"choices must be a list of str, got {type(options).__name__}")
        if not options:
            raise ConstraintError("choices is empty")
        if len(options) > _CHOICES_LIMIT:
            raise ConstraintError(f"choices has {len(options)} strings, more than "
                                  f"{_CHOICES_LIMIT}")
        for option in options:
            if not isinstance(option, str):
                raise TypeError(f"choices must be str, got {type(option).__name__} {option!r}")
            if not option:
                raise ConstraintError("choices holds an empty string")
        # a Lark string literal is written as a JSON string
        lark = "start: " + " | ".join(json.dumps(option) for option in options)
        return cls("choices", _llguidance().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def tool_calls(cls, tools, parallel=True) -> "Constraint":
        """One tool call (or, with `parallel`, one or more) in xllm's JSON convention
        (:data:`xllm.chat.TOOL_CALL_OPEN` ``{"name": ..., "arguments": {...}}``
        :data:`xllm.chat.TOOL_CALL_CLOSE`), naming one of `tools` (OpenAI function tools:
        ``{"type": "function", "function": {"name", "parameters"}}``), its arguments valid
        under that function's ``parameters`` schema."""
        from ..chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN  # (not imported with a model)
        alternatives = []
        for tool in tools:
            function = tool["function"]
            parameters = function.get("parameters") or {"type": "object"}
            call = {"type": "object",
                    "properties": {"name": {"const": function["name"]},
                                   "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False}
            call["x-guidance"] = _JSON_DEFAULTS
            alternatives.append("%json " + json.dumps(call))
        if not alternatives:
            raise ConstraintError("no tools to call")
        repeat = "+" if parallel else ""
        lark = "\n".join([
            f"start: call{repeat}",
            f"call: {json.dumps(TOOL_CALL_OPEN)} body {json.dumps(TOOL_CALL_CLOSE)}",
            "body: " + " | ".join(f"tool{i}" for i in range(len(alternatives))),
            *(f"tool{i}: {alt}" for i, alt in enumerate(alternatives)),
        ])
        return cls("tool_calls", _llguidance().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def from_arguments(cls, *, json_schema=None, grammar=None, regex=None,
                       choices=None) -> Optional["Constraint"]:
        """The constraint that at most one of the arguments gives (None: none given);
        TypeError if more than one is."""
        given = {name: value for name, value in (("json_schema", json_schema),
                                                 ("grammar", grammar), ("regex", regex),
                                                 ("choices", choices)) if value is not None}
        if len(given) > 1:
            raise TypeError(f"give at most one of json_schema, grammar, regex and choices, "
                            f"got {', '.join(given)}")
        if not given:
            return None
        name, value = given.popitem()
        return getattr(cls, name)(value)


class Vocabulary:
    """A tokenizer as llguidance sees it: each token's bytes (control tokens marked as such, so
    that no grammar produces them as text), the end-of-sequence tokens, and encoding. Built once
    per tokenizer and set of stop ids (:func:`vocabulary`)."""

    def __init__(self, tokenizer, stop_ids):
        llguidance = _llguidance()
        self.size = tokenizer.vocab_size
        self.token_bytes = token_bytes(tokenizer)
        self.longest = max(map(len, self.token_bytes))
        special = set(tokenizer.special_tokens.values())
        wrapped = llguidance.TokenizerWrapper(_Encoder(tokenizer, self.token_bytes, special))
        self.stop_ids = sorted(stop_ids)
        self.lltokenizer = llguidance.LLTokenizer(wrapped, n_vocab=self.size,
                                                  eos_token=self.stop_ids)


class _Encoder:
    """The tokenizer interface that llguidance.TokenizerWrapper reads: ids whose bytes spell
    exactly the text given (llguidance uses them for the text a grammar forces)."""

    def __init__(self, tokenizer, tokens, special):
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self._ids = {}  # the ordinary tokens' bytes -> the first id that spells them
        for i, spelled in enumerate(tokens):
            if i not in special and spelled:
                self._ids.setdefault(spelled, i)
        self._longest = max(map(len, self._ids))

    def __call__(self, text):
        if isinstance(text, str):
            text = text.encode("utf-8")
        ids = self._tokenizer.encode(text.decode("utf-8", "replace"))
        if b"".join(self.tokens[i] for i in ids) == text:
            return ids
        # SentencePiece adds a space before the text (its dummy prefix), and invalid UTF-8
        # has no encoding: spell the bytes with the longest tokens instead
        return self._greedy(text)

    def _greedy(self, data):
        ids = []
        start = 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                i = self._ids.get(data[start:end])
                if i is not None:
                    ids.append(i)
                    start = end
                    break
            else:  # no token spells this byte: leave it out
                start += 1
        return ids


def token_bytes(tokenizer) -> list:
    """The bytes each token of `tokenizer` adds to the text after other text (a SentencePiece
    piece's "▁" is its space), as :meth:`xllm.tokenizers.base.Tokenizer.token_bytes` gives them;
    the special tokens (control, unknown, user-defined markup) as their text after a 0xFF
    byte."""
    from ..tokenizers.base import CONTROL, UNKNOWN  # (not imported with xllm)
    special = set(tokenizer.special_tokens.values())
    out = []
    for i in range(tokenizer.vocab_size):
        if tokenizer.types[i] in (CONTROL, UNKNOWN) or i in special:
            out.append(_SPECIAL_MARK + tokenizer.pieces[i].encode("utf-8"))
        else:
            out.append(tokenizer.token_bytes(i))
    return out


_vocabularies = weakref.WeakKeyDictionary()  # tokenizer -> {stop ids: Vocabulary}
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer, stop_ids) -> Vocabulary:
    """The :class:`Vocabulary` of `tokenizer` with end-of-sequence tokens `stop_ids`, built on
    first use (a few tenths of a second for 50,000 tokens) and kept while the tokenizer
    lives."""
    key = frozenset(stop_ids)
    with _vocabularies_lock:
        built = _vocabularies.setdefault(tokenizer, {})
        if key not in built:
            built[key] = Vocabulary(tokenizer, key)
        return built[key]


class Matcher:
    """One sequence's place in its grammar: which tokens may come next (:meth:`fill_mask`),
    and the token that came (:meth:`accept`)."""

    def __init__(self, constraint: Constraint, vocab: Vocabulary, max_new_tokens: int):
        """ConstraintError if the grammar does not compile against `vocab`, or if what it
        forces the output to begin with needs more than `max_new_tokens` tokens."""
        llguidance = _llguidance()
        self.constraint = constraint
        self.vocab = vocab
        self._matcher = llguidance.LLMatcher(vocab.lltokenizer, constraint.grammar_text,
                                             log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(f"{constraint.kind}: {self._matcher.get_error()}")
        forced = self._matcher.compute_ff_bytes()
        # no token writes more than `longest` bytes: a lower bound of the tokens needed
        fewest = -(-len(forced) // vocab.longest)
        if fewest > max_new_tokens:
            raise ConstraintError(
                f"{constraint.kind}: the output must begin with {len(forced)} fixed bytes, at "
                f"least {fewest} tokens, more than max_tokens={max_new_tokens}: it can never "
                "finish")

    @property
    def words(self) -> int:
        """32-bit words of one mask."""
        return (self.vocab.size + 31) // 32

    def fill_mask(self, out: np.ndarray):
        """Write the mask of the tokens allowed next into `out` (int32, C-contiguous, at least
        :attr:`words` long); all zero once the matcher is in error. Releases the GIL."""
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, self.words * 4)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False (and the matcher in error) if the grammar forbids it."""
        return self._matcher.consume_token(int(token))

    @property
    def error(self) -> str:
        """Why the matcher is in error ("" if it is not)."""
        return self._matcher.get_error()

    def is_accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        return self._matcher.is_accepting()


_executor = None
_executor_lock = threading.Lock()


def _mask_thread():
    """The one helper thread that computes masks, shared by every generation (a
    ThreadPoolExecutor, made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            from concurrent.futures import ThreadPoolExecutor
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xllm-masks")
        return _executor


class MaskJob:
    """The masks of a batch's next tokens, one row per batch row, computed on the helper thread
    while the caller runs the forward pass: :meth:`start` before it, :meth:`wait` after. A
    row without a matcher is left as it is (callers do not read it)."""

    def __init__(self):
        self._masks = np.zeros((0, 0), np.int32)
        self._pending = None

    def start(self, matchers):
        """Begin computing the masks of `matchers`: a list of (matcher, row)."""
        self.wait()
        if not matchers:
            return
        rows = max(row for _, row in matchers) + 1
        words = matchers[0][0].words
        if self._masks.shape[0] < rows or self._masks.shape[1] != words:
            self._masks = np.zeros((max(rows, 2 * self._masks.shape[0]), words), np.int32)
        masks = self._masks
        self._pending = _mask_thread().submit(_fill_masks, matchers, masks)

    def wait(self) -> np.ndarray:
        """The masks of the last :meth:`start` (rows of int32 words), once computed."""
        if self._pending is not None:
            pending = self._pending
            self._pending = None
            pending.result()
        return self._masks


def _fill_masks(matchers, masks):
    for matcher, row in matchers:
        matcher.fill_mask(masks[row])
