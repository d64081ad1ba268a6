"""Structured output (xllm/engine/constraints.py, docs/structured.rst): constrained decoding with
llguidance in the generation loop and the engine, for both tokenizers; JSON-schema outputs that
always validate (checked with the jsonschema package, which nobody here wrote), determinism
beside other requests, bad constraints refused, dead ends ended."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xllm
from xllm.chat import parse_tool_calls, render_chat, tool_messages, CHATML
from xllm.engine.constraints import (Constraint, ConstraintError, Matcher, token_bytes,
                                     vocabulary)
from xllm.engine.sampling import SamplingParams, apply_token_mask
from xllm.engine.scheduler import Engine, Request

from helpers_engine import Collector

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

# ---- the ten schemas of the acceptance run: nested objects, arrays, enums, bounded numbers,
# required and optional fields ----
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                      "age": {"type": "integer", "minimum": 0,
                                              "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "intensity": {"type": "number", "minimum": 0,
                                                    "maximum": 1}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                                                                         "maxLength": 12},
                                               "minItems": 1, "maxItems": 4}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object",
     "properties": {"person": {"type": "object",
                               "properties": {"first": {"type": "string", "maxLength": 16},
                                              "last": {"type": "string", "maxLength": 16}},
                               "required": ["first", "last"], "additionalProperties": False},
                    "city": {"type": "string", "maxLength": 20}},
     "required": ["person"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
     "minItems": 2, "maxItems": 6},
    {"type": "object", "properties": {"answer": {"type": "boolean"},
                                      "confidence": {"type": "integer", "minimum": 1,
                                                     "maximum": 5}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object",
     "properties": {"items": {"type": "array", "maxItems": 3,
                              "items": {"type": "object",
                                        "properties": {"sku": {"type": "string",
                                                               "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                       "qty": {"type": "integer", "minimum": 1,
                                                               "maximum": 99}},
                                        "required": ["sku", "qty"],
                                        "additionalProperties": False}},
                    "total": {"type": "number", "minimum": 0, "maximum": 10000}},
     "required": ["items", "total"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error", "pending"]},
                                      "code": {"type": "integer", "minimum": 100,
                                               "maximum": 599},
                                      "message": {"type": "string", "maxLength": 30}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object",
     "properties": {"point": {"type": "object",
                              "properties": {"x": {"type": "number", "minimum": -10,
                                                   "maximum": 10},
                                             "y": {"type": "number", "minimum": -10,
                                                   "maximum": 10}},
                              "required": ["x", "y"], "additionalProperties": False},
                    "label": {"type": "string", "maxLength": 10}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                      "year": {"type": "integer", "minimum": 1900,
                                               "maximum": 2030},
                                      "genres": {"type": "array", "maxItems": 3,
                                                 "items": {"enum": ["drama", "comedy",
                                                                    "action", "horror"]}}},
     "required": ["title", "year", "genres"], "additionalProperties": False},
]
TOPICS = ["a person", "a color", "a list of tags", "a customer", "some numbers", "a yes/no answer",
          "an order", "a server status", "a point on a map", "a film"]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return xllm.load(smollm2_gguf)


@pytest.fixture(scope="module")
def sentencepiece_model(data_dir):
    """A real llama2.c model with its SentencePiece tokenizer (512 pieces, byte fallback)."""
    d = data_dir / "llama2c"
    return xllm.load(d / "aidreams260K.bin", tokenizer=d / "aidreams260K_tok512.bin")


def schema_prompts(model):
    """(prompt ids, schema) of the 100 acceptance requests: 10 schemas x 10 phrasings."""
    requests = []
    for k, schema in enumerate(SCHEMAS):
        for j in range(10):
            content = (f"Describe {TOPICS[k]} (variant {j + 1}) as JSON matching this schema: "
                       f"{json.dumps(schema)}")
            requests.append((model.chat_ids([{"role": "user", "content": content}]), schema))
    return requests


def validates(text, schema):
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


# ---- the mask ----

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.randoms(use_true_random=False))
def test_apply_token_mask_matches_a_bit_by_bit_reference(vocab, rnd):
    words = (vocab + 31) // 32 + rnd.randint(0, 2)  # a mask may cover more than the logits
    mask = np.array([rnd.getrandbits(32) for _ in range(words)], np.uint32).view(np.int32)
    logits = np.array([rnd.uniform(-5, 5) for _ in range(vocab)], np.float32)
    expected = logits.copy()
    allowed = 0
    for t in range(vocab):
        if (int(mask.view(np.uint32)[t // 32]) >> (t % 32)) & 1:
            allowed += 1
        else:
            expected[t] = -np.inf
    assert apply_token_mask(logits, mask) == allowed
    np.testing.assert_array_equal(logits, expected)


# ---- the vocabulary as llguidance sees it ----

TEXTS = ["Hello, world!", ' {"a": [1, 2.5e3, true]}', "naïve café — 日本語 😀", "  two  spaces\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text_byte_level(smollm2, text):
    tok = smollm2.tokenizer
    spelled = b"".join(token_bytes(tok)[i] for i in tok.encode(text))
    assert spelled == text.encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text_sentencepiece(sentencepiece_model, text):
    """SentencePiece writes a space as "▁" and adds one before the text (its dummy prefix):
    the bytes are those of the text after a space, as the decoder gives them after other
    text."""
    tok = sentencepiece_model.tokenizer
    spelled = b"".join(token_bytes(tok)[i] for i in tok.encode(text))
    assert spelled == (" " + text).encode("utf-8")
    assert spelled.decode("utf-8") == " " + tok.decode(tok.encode(text))


@pytest.mark.parametrize("name", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"])
def test_token_bytes_spell_llama_cpp_test_strings(data_dir, name):
    """Llama's SentencePiece vocabulary (32,000 pieces, byte fallback) and GPT-2's byte-level
    one, on llama.cpp's tokenizer test strings; and a JSON grammar over them gives a mask."""
    from xllm.tokenizers.loading import load_tokenizer
    folder = data_dir / "llamacpp_vocab"
    tok = load_tokenizer(folder / name)
    spelled = token_bytes(tok)
    prefix = " " if getattr(tok, "add_dummy_prefix", False) else ""
    for text in (folder / (name + ".inp")).read_text().split("\n__ggml_vocab_test__\n"):
        if not text or not text.strip():
            continue  # SentencePiece folds leading blanks: what is left is tested
        assert b"".join(spelled[i] for i in tok.encode(text)) == (prefix + text).encode()
    matcher = Matcher(Constraint.json_schema(SCHEMAS[0]), vocabulary(tok, {tok.eos_id}), 64)
    mask = np.zeros(matcher.words, np.int32)
    matcher.fill_mask(mask)
    allowed = [spelled[t] for t in range(tok.vocab_size)
               if (int(mask.view(np.uint32)[t // 32]) >> (t % 32)) & 1]
    assert allowed and all(b.lstrip().startswith(b"{") for b in allowed)


def test_control_tokens_cannot_be_written_by_a_grammar(smollm2):
    tok = smollm2.tokenizer
    spelled = token_bytes(tok)
    eos = tok.eos_id
    assert spelled[eos] == b"\xff" + tok.id_to_piece(eos).encode()
    vocab = vocabulary(tok, smollm2.stop_ids())
    # "<|im_end|>" as text is allowed, but only spelled with ordinary tokens
    matcher = Matcher(Constraint.regex(r"<\|im_end\|>"), vocab, 16)
    mask = np.zeros(matcher.words, np.int32)
    matcher.fill_mask(mask)
    logits = np.zeros(tok.vocab_size, np.float32)
    apply_token_mask(logits, mask)
    assert logits[eos] == -np.inf
    assert np.isfinite(logits).any()


# ---- constraints refused ----

@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "strin"),
    ({"json_schema": {"type": "string", "pattern": "(?<=a)b"}}, "look-around"),
    ({"json_schema": {"$ref": "#/definitions/missing"}}, "missing"),
    ({"json_schema": {"not": {"type": "string"}}}, "Unimplemented keys"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"grammar": 'root ::= "a" (', }, "grammar"),
    ({"grammar": "   "}, "empty"),
    ({"regex": "(a"}, "unclosed"),
    ({"choices": []}, "empty"),
    ({"choices": ["a", ""]}, "empty string"),
    ({"regex": "x{400}"}, "never finish"),
])
def test_bad_constraints_raise_constraint_error(smollm2, kwargs, message):
    with pytest.raises(ConstraintError, match=message):
        smollm2.generate("Hi", max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("kwargs", [{"json_schema": 3}, {"json_schema": True},
                                    {"regex": b"a"}, {"choices": "ab"}, {"choices": [1]},
                                    {"grammar": ["a"]},
                                    {"json_schema": {"type": "object"}, "regex": "a"}])
def test_wrong_constraint_types_raise_type_error(smollm2, kwargs):
    with pytest.raises(TypeError):
        smollm2.generate("Hi", max_new_tokens=4, **kwargs)


def test_constraint_error_is_a_value_error_and_an_xllm_error():
    assert issubclass(ConstraintError, ValueError)
    assert issubclass(ConstraintError, xllm.XLLMError)


# ---- outputs follow their constraints, both tokenizers, greedy and sampled ----

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choices_regex_and_grammar(smollm2, temperature):
    chat = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    kw = {"temperature": temperature, "seed": 5, "max_new_tokens": 24}
    assert smollm2.chat(chat, choices=["yes", "no"], **kw) in ("yes", "no")
    assert smollm2.last_stats["finish"] == "stop"
    date = smollm2.chat(chat, regex=r"\d{4}-\d{2}-\d{2}", **kw)
    assert len(date) == 10 and date[4] == "-" and date.replace("-", "").isascii()
    gbnf = 'root ::= "(" [0-9] [0-9]? " " ("apples" | "pears") ")"'
    text = smollm2.chat(chat, grammar=gbnf, **kw)
    assert text.startswith("(") and text.endswith(")") and text.split()[1] in ("apples)",
                                                                               "pears)")
    lark = 'start: "A=" NUMBER\nNUMBER: /[1-9][0-9]?/'
    text = smollm2.chat(chat, grammar=lark, **kw)
    assert text.startswith("A=") and 1 <= int(text[2:]) <= 99


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sentencepiece_model_follows_constraints(sentencepiece_model, temperature):
    model = sentencepiece_model
    kw = {"temperature": temperature, "seed": 1, "max_new_tokens": 40}
    text = model.generate("The dream", regex=r" [a-z]+ [a-z]+\.", **kw)
    assert text.startswith(" ") and text.endswith(".") and len(text.split()) == 2
    schema = SCHEMAS[5]
    text = model.generate("The dream", json_schema=schema, **kw)
    assert validates(text, schema), text
    assert model.generate("The dream", choices=["sun", "moon"], **kw) in ("sun", "moon")


def test_session_follows_constraints_turn_by_turn(smollm2):
    session = smollm2.session()
    chat = [{"role": "user", "content": "Pick a colour."}]
    first = session.chat(chat, choices=["red", "green", "blue"], max_new_tokens=8)
    assert first in ("red", "green", "blue")
    chat += [{"role": "assistant", "content": first},
             {"role": "user", "content": "And a number?"}]
    second = session.chat(chat, regex="[1-9][0-9]?", max_new_tokens=8)
    assert 1 <= int(second) <= 99
    assert session.last_stats["finish"] == "stop"


def test_batch_with_and_without_constraints_each_as_alone(smollm2):
    """Each prompt of a batch, constrained or not, gives what it gives alone."""
    chat = [{"role": "user", "content": "Tell me about a film as JSON."}]
    ids = smollm2.chat_ids(chat)
    constraints = [None, Constraint.json_schema(SCHEMAS[9]), Constraint.choices(["a", "b"]),
                   None, Constraint.regex("[a-z ]{1,40}")]
    batch = smollm2.generate_batch([ids] * 5, constraints=constraints, max_new_tokens=48,
                                   temperature=0.9, seed=11)
    for i, constraint in enumerate(constraints):
        alone = smollm2.generate_batch([ids], constraints=[constraint], max_new_tokens=48,
                                       temperature=0.9, seed=11 + i)
        assert batch[i] == alone[0]
    assert validates(batch[1], SCHEMAS[9])
    assert batch[2] in ("a", "b")


# ---- the acceptance run: 200 requests, 10 schemas, greedy and sampled ----

@pytest.mark.slow
def test_200_schema_requests_all_validate_and_without_constraints_fewer_do(smollm2):
    requests = schema_prompts(smollm2)
    valid = {"constrained": 0, "free": 0}
    for mode in ("constrained", "free"):
        for temperature in (0.0, 1.0):
            for start in range(0, len(requests), 25):
                chunk = requests[start:start + 25]
                constraints = [Constraint.json_schema(schema) if mode == "constrained"
                               else None for _, schema in chunk]
                texts = smollm2.generate_batch([ids for ids, _ in chunk],
                                               constraints=constraints,
                                               max_new_tokens=MAX_TOKENS,
                                               temperature=temperature, seed=start)
                for text, (_, schema) in zip(texts, chunk):
                    valid[mode] += validates(text, schema)
    print(f"\nvalid outputs of 200: with constraints {valid['constrained']}, "
          f"without {valid['free']}")
    assert valid["constrained"] == 200
    assert valid["free"] < 200  # the small model's free JSON breaks: why constraints exist


# ---- the engine: concurrent requests, determinism, dead ends ----

def engine_requests(model):
    """16 requests: constrained and not, greedy and seeded, with different schemas."""
    out = []
    for i in range(16):
        schema = SCHEMAS[i % len(SCHEMAS)]
        chat = [{"role": "user", "content": f"Give {TOPICS[i % 10]} as JSON, number {i}."}]
        constraint = Constraint.json_schema(schema) if i % 2 == 0 else None
        temperature = 0.0 if i % 4 < 2 else 0.9
        out.append((model.chat_ids(chat), constraint, temperature, i))
    return out


def run_engine(engine, specs):
    collectors = []
    for ids, constraint, temperature, seed in specs:
        c = Collector()
        engine.submit(Request(ids, 48, SamplingParams(temperature=temperature, seed=seed), c,
                              constraint=constraint))
        collectors.append(c)
    for c in collectors:
        assert c.done.wait(300)
    return collectors


@pytest.mark.slow
def test_16_concurrent_streams_each_identical_to_alone(smollm2):
    specs = engine_requests(smollm2)
    engine = Engine(smollm2, max_running=16, prefix_cache=False)
    try:
        together = run_engine(engine, specs)
        alone = [run_engine(engine, [spec])[0] for spec in specs]
    finally:
        engine.close()
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a.tokens == b.tokens, f"request {i} differs beside others"
        assert a.finish.reason == b.finish.reason
        if specs[i][1] is not None and a.finish.reason == "stop":
            assert validates(a.text, SCHEMAS[i % len(SCHEMAS)]), a.text


def test_engine_refuses_a_bad_constraint_at_submit(smollm2):
    engine = Engine(smollm2, prefix_cache=False)
    try:
        with pytest.raises(ConstraintError):
            engine.submit(Request([1, 2, 3], 8, SamplingParams(), Collector(),
                                  constraint=Constraint.regex("(")))
        with pytest.raises(ConstraintError, match="never finish"):
            engine.submit(Request([1, 2, 3], 2, SamplingParams(), Collector(),
                                  constraint=Constraint.choices(["x" * 400])))
    finally:
        engine.close()


class DeadEnd:
    """A matcher whose grammar allows no token after `after` tokens (a dead end that a real
    grammar reaches when, say, the vocabulary cannot spell what it demands)."""

    def __init__(self, words, after):
        self.words = words
        self.left = after

    def fill_mask(self, out):
        out[:self.words] = -1 if self.left > 0 else 0

    def accept(self, token):
        self.left -= 1
        return True


def test_a_dead_end_ends_the_sequence_with_finish_constraint(smollm2, monkeypatch):
    words = (smollm2.tokenizer.vocab_size + 31) // 32
    free = smollm2.generate("Hello", max_new_tokens=8)
    free_tokens = smollm2.last_stats["tokens"]
    request = smollm2._request(["Hello"], 8, (), None, SamplingParams())
    request.matchers = [DeadEnd(words, 3)]
    text = "".join(piece for _, piece in smollm2._pieces(request, kvs=None,
                                                         stats=smollm2._new_stats()))
    assert smollm2.last_stats["finish"] == "constraint"
    assert smollm2.last_stats["tokens"] == free_tokens[:3]
    assert free.startswith(text)
    engine = Engine(smollm2, prefix_cache=False)
    try:
        monkeypatch.setattr(smollm2, "matcher", lambda constraint, n: DeadEnd(words, 2))
        c = Collector()
        engine.submit(Request(smollm2.encode_prompt("Hello"), 8, SamplingParams(), c))
        assert c.done.wait(60)
    finally:
        engine.close()
    assert c.finish.reason == "constraint"
    assert c.tokens == free_tokens[:2]


# ---- tool calls in the chat convention ----

WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "The weather in a city",
                        "parameters": {"type": "object",
                                       "properties": {"city": {"type": "string",
                                                               "maxLength": 30},
                                                      "unit": {"enum": ["C", "F"]}},
                                       "required": ["city"], "additionalProperties": False}}}


def test_tool_messages_render_in_the_json_convention():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"}]
    rendered, extra = tool_messages(CHATML, messages, [WEATHER])
    assert extra == {}
    text = render_chat(CHATML, rendered)
    assert '"name": "get_weather"' in text  # the tool described in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>" in text


def test_a_template_with_tools_gets_them_its_own_way():
    template = ("{% for m in messages %}{{ m['role'] }}:{% if m.tool_calls %}"
                "{% for c in m.tool_calls %}CALL {{ c.function.name }} "
                "{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m['content'] }}"
                "{% endif %};{% endfor %}{% if tools %}TOOLS {{ tools | length }}{% endif %}")
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    rendered, extra = tool_messages(template, messages, [WEATHER])
    assert render_chat(template, rendered, add_generation_prompt=False, **extra) == \
        'assistant:CALL f {"x": 1};TOOLS 1'


def test_parse_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Oslo"}'), ("f", "{}")]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == \
        ("<tool_call>not json</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])
    # the bare JSON of Llama 3.1 and Mistral templates
    assert parse_tool_calls('{"name": "f", "parameters": {"a": 1}}') == (None, [("f", '{"a": 1}')])
    assert parse_tool_calls('[TOOL_CALLS] [{"name": "f", "arguments": {}}, '
                            '{"name": "g", "arguments": {"b": [2]}}]') == \
        (None, [("f", "{}"), ("g", '{"b": [2]}')])
    assert parse_tool_calls('{"name": "not a call"}') == ('{"name": "not a call"}', [])
    assert parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [])


@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_constraint_gives_arguments_valid_under_the_schema(smollm2, parallel):
    messages, extra = tool_messages(smollm2.chat_template,
                                    [{"role": "user", "content": "Weather in Paris and Rome?"}],
                                    [WEATHER])
    ids = smollm2.chat_ids(messages, **extra)
    for seed in range(3):
        text = smollm2.generate_batch([ids], constraints=[Constraint.tool_calls(
            [WEATHER], parallel=parallel)], max_new_tokens=120, temperature=1.0, seed=seed)[0]
        content, calls = parse_tool_calls(text)
        assert calls, text
        if not parallel:  # one call, then the end (parallel ones may run to max_new_tokens)
            assert len(calls) == 1 and content is None, text
            assert smollm2.last_stats["finish"] == "stop"
        for name, arguments in calls:
            assert name == "get_weather"
            jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


# ---- the server: response_format, the extensions, tool calls (the official openai client) ----

def test_tool_call_stream_holds_back_calls_and_streams_text():
    from xllm.serve.structured import ToolCallStream
    reader = ToolCallStream()
    out = [reader.push(piece) for piece in ["Sure. ", "<tool", "_call>\n{\"name\": ",
                                            "\"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n"]]
    assert "".join(out) == "Sure. "
    rest, calls = reader.finish()
    assert rest == ""
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("f", '{"x": 1}')]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    reader = ToolCallStream()
    assert reader.push("a <tool") == "a "  # may begin a call: held
    assert reader.push("box>") == "<toolbox>"  # it did not
    assert reader.finish() == ("", [])
    reader = ToolCallStream()  # a bare call (Llama 3.1's way) is held back whole
    assert reader.push(" <|python") == ""
    assert reader.push('_tag|>{"name": "f", "parameters": {}}') == ""
    rest, calls = reader.finish()
    assert rest == "" and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    reader = ToolCallStream()  # a reply that only began like one comes out at the end
    assert reader.push("[1] first") == ""
    assert reader.finish() == ("[1] first", [])


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_serve import start_server, stop_server
    url, process = start_server("--max-running", "16")
    yield url
    assert stop_server(process) == 0


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


MODEL = "smollm2-135m-instruct"
PERSON = SCHEMAS[0]


def test_server_response_format_json_schema_and_json_object(client):
    messages = [{"role": "user", "content": "Invent a person as JSON."}]
    for strict in (True, False):
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "strict": strict,
                                             "schema": PERSON}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.7,
                                           seed=3, max_tokens=MAX_TOKENS,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # an open object may run long; what there is still begins one
        assert reply.choices[0].message.content.startswith("{")


def test_server_each_choice_follows_the_constraint(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}], n=3,
        temperature=1.0, seed=4, max_tokens=8, extra_body={"choice": ["red", "green", "blue"]})
    assert len(reply.choices) == 3
    assert all(c.message.content in ("red", "green", "blue") for c in reply.choices)


def test_server_extensions_choice_regex_grammar(client):
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                           extra_body={"choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           extra_body={"guided_regex": "[A-Z][a-z]{2,6}!"})
    text = reply.choices[0].message.content
    assert text[0].isupper() and text.endswith("!") and 4 <= len(text) <= 8
    completion = client.completions.create(
        model=MODEL, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    completion = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=8,
                                           extra_body={"grammar": 'root ::= " " ("yes" | "no")'})
    assert completion.choices[0].text in (" yes", " no")
    stream = client.completions.create(model=MODEL, prompt="Count:", max_tokens=16, stream=True,
                                       extra_body={"regex": " [0-9], [0-9], [0-9]"})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert len(text) == 8 and text[1::3].isdigit()


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "Unimplemented"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"regex": "(", "choice": ["a"]}, "choice", "at most one"),
    ({"grammar": 'root ::= "a" ('}, "grammar", "grammar"),
    ({"regex": "z{900}"}, "regex", "never finish"),
    ({"choice": []}, "choice", "empty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "regex": "a"}, "regex", "cannot be combined"),
])
def test_server_bad_constraints_are_400s(client, extra, param, message):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=8, extra_body=extra,
                                       messages=[{"role": "user", "content": "Hi"}])
    error = caught.value.body
    assert message in error["message"]
    if param is not None:
        assert error["param"] == param


WEATHER_TOOLS = [WEATHER, {"type": "function", "function": {
    "name": "convert", "description": "Convert an amount between currencies",
    "parameters": {"type": "object",
                   "properties": {"amount": {"type": "number", "minimum": 0,
                                             "maximum": 1000000, "multipleOf": 0.01},
                                  "to": {"enum": ["EUR", "USD", "GBP"]}},
                   "required": ["amount", "to"], "additionalProperties": False}}}]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}


def check_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    return message.tool_calls


@pytest.mark.slow
def test_server_required_and_named_tool_calls_validate_in_100_requests(client):
    questions = ["What is the weather in {}?", "Convert 100 dollars to euros for {}.",
                 "Is it raining in {}?", "How much is 20 pounds in {}'s currency?"]
    cities = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]

    def ask(i):
        content = questions[i % 4].format(cities[i % 5])
        choice = "required" if i % 2 == 0 else \
            {"type": "function", "function": {"name": WEATHER_TOOLS[i // 2 % 2]["function"]
                                              ["name"]}}
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], tools=WEATHER_TOOLS,
            tool_choice=choice, parallel_tool_calls=i % 4 != 0, temperature=0.8, seed=i,
            max_tokens=MAX_TOKENS, stream=i % 3 == 0)
        if i % 3 == 0:  # streamed: the calls come whole in one delta
            calls = []
            finish = None
            for chunk in reply:
                delta = chunk.choices[0].delta
                calls += delta.tool_calls or []
                finish = chunk.choices[0].finish_reason or finish
            assert finish in ("tool_calls", "length")
            message = type("Message", (), {"tool_calls": [type("Call", (), {
                "id": c.id, "type": c.type, "function": c.function}) for c in calls]})
        else:
            assert reply.choices[0].finish_reason in ("tool_calls", "length")
            message = reply.choices[0].message
        calls = check_calls(message)
        if isinstance(choice, dict):
            assert {c.function.name for c in calls} == {choice["function"]["name"]}
            assert len(calls) == 1
        return len(calls)

    with __import__("concurrent.futures").futures.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(ask, range(100)))
    assert len(counts) == 100 and min(counts) >= 1


def test_server_two_turns_with_a_tool_message(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    call = check_calls(first.choices[0].message)[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                            temperature=0, max_tokens=40)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tool's answer reached the model through the template: the prompt holds it
    tokens = client.post("/../tokenize", cast_to=object,
                         body={"messages": messages})["tokens"]
    model_text = xllm.load(MODEL).tokenizer.decode(tokens)
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in model_text
    assert '"name": "get_weather"' in model_text


def test_server_tool_choice_none_and_auto(client):
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=16)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           temperature=0, max_tokens=48)
    message = reply.choices[0].message
    assert message.content or message.tool_calls


@pytest.mark.slow
def test_server_16_concurrent_streams_each_identical_to_alone(client):
    """Constrained and unconstrained streams, greedy and seeded, all at once: each one's
    tokens are those it gets alone on the same server."""
    def ask(i):
        body = {"model": MODEL, "max_tokens": 48, "stream": True, "logprobs": True,
                "temperature": 0 if i % 4 < 2 else 0.9, "seed": i,
                "messages": [{"role": "user", "content": f"Describe {TOPICS[i % 10]} as JSON "
                                                         f"({i})."}]}
        if i % 2 == 0:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "x", "schema": SCHEMAS[i % len(SCHEMAS)]}}
        stream = client.chat.completions.create(**body)
        tokens = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += [t.token for t in chunk.choices[0].logprobs.content]
        return tokens

    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    alone = [ask(i) for i in range(16)]
    assert all(together)
    assert together == alone
