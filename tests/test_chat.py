"""Chat templates: Hugging Face conventions, errors and the sandbox."""

import pytest

from xllm.chat import CHATML, check_messages, render_chat
from xllm.errors import ChatTemplateError, XLLMError

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hé <b> & \"hi\"."}]

# Templates that exercise whitespace control, tojson, loop controls and the special tokens.
TEMPLATES = [
    CHATML,
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "[{{ m.role|upper }}] {{ m.content }}{{ eos_token }}\n{% endfor %}\n"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
    "{{ messages|tojson }}|{{ messages[1]|tojson(indent=2, sort_keys=true) }}",
]


def _hf_render(template, messages, **kw):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf):
    """SmolLM2's own template, from the default model's GGUF metadata."""
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_matches_transformers(smollm2_template, gen):
    for messages in (MESSAGES, MESSAGES[1:]):  # the second gets SmolLM2's default system
        got = render_chat(smollm2_template, messages, add_generation_prompt=gen)
        assert got == _hf_render(smollm2_template, messages, add_generation_prompt=gen)
    assert render_chat(smollm2_template, MESSAGES).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers(template, gen):
    kw = dict(bos_token="<s>", eos_token="</s>")
    assert (render_chat(template, MESSAGES, add_generation_prompt=gen, **kw)
            == _hf_render(template, MESSAGES, add_generation_prompt=gen, **kw))


def test_chatml():
    assert render_chat(CHATML, MESSAGES[1:]) == (
        "<|im_start|>user\nSay hé <b> & \"hi\".<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(CHATML, [{"role": "assistant", "content": None}],
                       add_generation_prompt=False) == "<|im_start|>assistant\n<|im_end|>\n"


def test_extra_variables_and_globals():
    out = render_chat("{{ tools|tojson }}|{{ strftime_now('%Y') }}", [], tools=[{"n": "é"}])
    tools, year = out.split("|")
    assert tools == '[{"n": "é"}]' and year.isdigit()


@pytest.mark.parametrize("template, match", [
    ("{{ raise_exception('only user/assistant roles') }}", "only user/assistant roles"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ nope.attr }}", "undefined"),
    ("", "no chat template"),
    (None, "no chat template"),
])
def test_template_errors(template, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat(template, MESSAGES)
    assert isinstance(info.value, XLLMError)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set _ = messages[0].update(role='hacked') %}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ (messages|first).__class__.mro() }}",
])
def test_sandbox(template):
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat(template, messages)
    assert messages == MESSAGES


@pytest.mark.parametrize("template", ["{{ messages.__class__ }}", "{{ ''.__class__ }}",
                                      "{{ raise_exception.__globals__ }}"])
def test_sandbox_unsafe_attribute_is_undefined(template):
    # As in Jinja and transformers: printing an unsafe attribute gives "", using it raises.
    assert render_chat(template, MESSAGES) == ""


@pytest.mark.parametrize("messages, match", [
    ({"role": "user", "content": "x"}, "list"),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\] needs a str 'role'"),
    ([{"role": 3, "content": "x"}], r"messages\[0\] needs a str 'role'"),
    ([{"role": "user"}], r"messages\[0\] needs a 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], r"messages\[1\]"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        check_messages(messages)
    with pytest.raises(ValueError, match=match):
        render_chat(CHATML, messages)
