"""Chat templates: turn a list of messages into a prompt, the way Hugging Face does.

Templates are Jinja2, usually shipped with the model (``tokenizer.chat_template``). They are
untrusted code, so they run in Jinja's immutable sandbox."""
import json
from datetime import datetime
from functools import lru_cache
from typing import Optional

from .errors import ChatTemplateError

#: A plain ChatML template, for models that carry none (pass it explicitly).
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{{ (message['content'] or '') + '<|im_end|>\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@lru_cache(maxsize=16)
def _compile(template):
    from jinja2 import TemplateSyntaxError
    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error, line {e.lineno}: {e.message}") from e


def check_messages(messages):
    """Raise ValueError unless `messages` is a list of dicts with a str ``role`` and a str
    (or None) ``content``."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a str 'role', got {m.get('role')!r}")
        if "content" not in m or not isinstance(m["content"], (str, type(None))):
            raise ValueError(f"messages[{i}] needs a 'content' that is a str (or None)")


def render_chat(template: Optional[str], messages, *, add_generation_prompt=True,
                bos_token="", eos_token="", **extra) -> str:
    """Render `messages` (``[{"role": ..., "content": ...}, ...]``) with a Jinja chat template.

    Follows the Hugging Face conventions: the template sees ``messages``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any `extra` keyword (e.g.
    ``tools``), and may call ``raise_exception(msg)``, ``strftime_now(fmt)`` and the
    ``tojson`` filter. With add_generation_prompt the result ends with the header that starts
    the assistant's reply. Raises ValueError for malformed messages and ChatTemplateError when
    there is no template or it does not compile, fails or refuses to render (sandbox
    violations included). Pass ``template=xllm.chat.CHATML`` for models that have none.
    """
    if not template:
        raise ChatTemplateError("this model has no chat template: pass one (e.g. "
                                "template=xllm.chat.CHATML) or format the prompt yourself")
    check_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except ChatTemplateError:
        raise
    except Exception as e:  # a template is code: any failure inside it is the template's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
