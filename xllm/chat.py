"""Chat templates: turn a list of messages into a prompt, the way Hugging Face does.

Templates are Jinja2, usually shipped with the model (``tokenizer.chat_template``). They are
untrusted code, so they run in Jinja's immutable sandbox."""
import json
import re
import string
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, wraps
from typing import Optional

from .errors import ChatTemplateError
from .tokenizers.base import ESCAPE_MARK

#: The rendering budget of a chat template (templates are untrusted code: a loop inside a loop
#: could run for hours). Steps are loop iterations, calls (functions, methods, macros, filters,
#: tests), attribute and item lookups and arithmetic; SmolLM2's template takes 9 steps per
#: message, so the budget covers conversations of 500,000 messages.
MAX_RENDER_STEPS = 5_000_000
#: The longest rendered prompt, in characters (far beyond any model's context).
MAX_RENDER_OUTPUT = 20_000_000
#: The largest value a template may make (characters of a string, items of a list), and the
#: largest number it may pass as a width, count or format field (so no single step can
#: allocate more than about this much).
MAX_RENDER_VALUE = 10_000_000
_MAX_INT_BITS = 4096  # integers a template computes stay below 2**4096

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
    indent_text = indent if isinstance(indent, str) else " " * (indent or 0)
    if len(indent_text) > 64:
        _over(f"tojson with an indent of {indent!r} (at most 64)")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
    # ASCII JSON writes the escape mark as \ufdd0: put it back (not after a backslash that is
    # itself escaped), so the special token text after it stays escaped
    if ensure_ascii:
        text = re.sub(r"(?<!\\)((?:\\\\)*)\\ufdd0", "\\1" + ESCAPE_MARK, text)
    return text


_budget: ContextVar = ContextVar("xllm_chat_budget", default=None)  # steps left, per render


def _over(what):
    raise ChatTemplateError(f"the chat template went over its rendering budget: {what} (see "
                            "xllm.chat.MAX_RENDER_STEPS / MAX_RENDER_OUTPUT / MAX_RENDER_VALUE)")


def _step():
    """Count one step of the current render against its budget."""
    if (left := _budget.get()) is not None:
        if left[0] <= 0:
            _over(f"more than {MAX_RENDER_STEPS:,} steps (loop iterations, calls, lookups)")
        left[0] -= 1


def _check_value(value):
    """`value`, unless it is larger than a template may make."""
    sized = isinstance(value, (str, list, tuple, dict, set, frozenset))
    if sized and len(value) > MAX_RENDER_VALUE:
        _over(f"a {type(value).__name__} of {len(value):,} items (the limit is "
              f"{MAX_RENDER_VALUE:,})")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        _over(f"an integer of {value.bit_length():,} bits")
    return value


def _check_arguments(args, kwargs=None, numbers=True):
    """Refuse strings or lists larger than MAX_RENDER_VALUE as arguments and, with `numbers`,
    numbers above it (widths, counts)."""
    for a in (*args, *(kwargs or {}).values()):
        if numbers and isinstance(a, int) and not isinstance(a, bool) and \
                abs(a) > MAX_RENDER_VALUE:
            _over(f"the number {a} passed as an argument (the limit is {MAX_RENDER_VALUE:,})")
        _check_value(a)


def _check_format(fmt):
    """Refuse format strings (``%``-style and ``{}``-style) with widths above the limit."""
    specs = [m.group(1) for m in re.finditer(r"%[#0 +-]*(\d*)", fmt)]
    try:
        specs += [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    except ValueError:
        pass  # not a {}-style format string (format will say so itself if it is used as one)
    for digits in re.findall(r"\d+", " ".join(specs)):
        if len(digits) > 7 and int(digits) > MAX_RENDER_VALUE:
            _over(f"a field width of {digits} in a format string")


def _expected_size(name, text, args, kwargs=None):
    """An upper bound, roughly, on the length of what str method or filter `name` makes of
    `text` with the `args` and `kwargs` that follow it (0 when it is not one that can blow
    up)."""
    n = len(text)
    if name == "wordwrap":  # (width, break_long_words, wrapstring)
        width = args[0] if args and isinstance(args[0], int) else 1
        wrap = (kwargs or {}).get("wrapstring") or (args[2] if len(args) > 2 else None)
        if not isinstance(wrap, str):
            wrap = "\n"  # the default
        lines = n // max(width, 1) + 1
        return n + lines * len(wrap)
    if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        old = str(args[0])
        new = args[1]
        replaced = text.count(old) if old else n + 1  # "" is found between all characters
        return n + replaced * len(new)
    if name == "indent" and args and isinstance(args[0], int):
        return n + (text.count("\n") + 1) * args[0]
    if name == "expandtabs" and args and isinstance(args[0], int):
        return n + text.count("\t") * args[0]
    if name == "join" and args and isinstance(args[0], list):
        return sum(len(x) if isinstance(x, str) else 32 for x in args[0]) + n * len(args[0])
    if name in ("format", "format_map", "%"):  # every field may repeat the longest argument
        values = [*args, *(v for a in args if isinstance(a, dict) for v in a.values())]
        longest = max((len(v) for v in values if isinstance(v, str)), default=32)
        return n + (text.count("{") + text.count("%")) * longest
    return 0


def _guard(name, f):
    """Filter or test `f` counted as a step, its arguments and result checked (the numbers
    among its parameters, not the value it filters or tests)."""
    first = 1 if getattr(f, "jinja_pass_arg", None) else 0  # after a context, if it takes one

    @wraps(f)
    def guarded(*args, **kwargs):
        _step()
        if name == "join" and len(args) > first:  # (items, separator)
            args = (*args[:first], list(args[first]), *args[first + 1:])
            separator = args[first + 1] if len(args) > first + 1 else kwargs.get("d", "")
            if _expected_size("join", str(separator), args[first:first + 1]) > MAX_RENDER_VALUE:
                _over(f"the join filter would make more than {MAX_RENDER_VALUE:,} characters")
        # numbers are widths and counts, except for a format without "*" (a number to print)
        numbers = name != "format" or "*" in str(args[first:first + 1])
        _check_arguments(args[:first + 1], numbers=False)
        _check_arguments(args[first + 1:], kwargs, numbers=numbers)
        if len(args) > first and isinstance(text := args[first], str):
            if name == "format":
                _check_format(text)
            if _expected_size(name, text, args[first + 1:], kwargs) > MAX_RENDER_VALUE:
                _over(f"the {name} filter would make more than {MAX_RENDER_VALUE:,} characters")
        return _check_value(f(*args, **kwargs))
    return guarded


def _counted(iterable):
    """Iterate `iterable`, one step per item (every for loop's iterable is wrapped in this)."""
    for item in iterable:
        _step()
        yield item


def _checked_call_arguments(obj, args, kwargs):
    """The arguments of a template's call of ``obj``, checked (a str method's format string
    and the size of its result first); a str.join's items are made a list, checked."""
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    target = getattr(method, "__self__", None)
    _check_arguments(args, kwargs, numbers=isinstance(target, str))  # str widths
    if not isinstance(target, str):
        return args
    name = getattr(method, "__name__", "")
    if name in ("format", "format_map"):
        _check_format(target)
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        _check_arguments(args)
    if _expected_size(name, target, args) > MAX_RENDER_VALUE:
        _over(f"str.{name} would make more than {MAX_RENDER_VALUE:,} characters")
    return args


def _check_binop(operator, left, right):
    """Refuse a template's ``left operator right`` if its result would be too large."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                    and len(seq) * count > MAX_RENDER_VALUE):
                _over(f"a repetition making {len(seq) * count:,} items")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and right * left.bit_length() > _MAX_INT_BITS:
            _over(f"the power {left} ** {right}")
    elif operator == "%" and isinstance(left, str):
        right_args = right if isinstance(right, tuple) else (right,)
        _check_format(left)
        _check_arguments(right_args, numbers="*" in left)  # "%*s": a width argument
        if _expected_size("%", left, right_args) > MAX_RENDER_VALUE:
            _over(f"a % format making more than {MAX_RENDER_VALUE:,} characters")


def _budgeted_sandbox(sandbox, nodes):
    """A subclass of Jinja's immutable ``sandbox`` with every step counted and every value's
    size checked (``nodes`` is ``jinja2.nodes``)."""

    class BudgetedSandbox(sandbox):
        intercepted_binops = frozenset(["+", "*", "%", "**", "//"])

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (as in Jinja)
            _step()
            args = _checked_call_arguments(__obj, args, kwargs)
            return _check_value(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            _step()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _step()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            _step()
            _check_binop(operator, left, right)
            return _check_value(super().call_binop(context, operator, left, right))

        def _generate(self, source, name, filename, defer_init=False):
            for loop in source.find_all(nodes.For):  # count every loop's iterations
                loop.iter = nodes.Filter(loop.iter, "xllm_counted", [], [], None, None,
                                         lineno=loop.lineno)
            return super()._generate(source, name, filename, defer_init)

    return BudgetedSandbox


def _budgeted_namespace(namespace):
    """A subclass of Jinja's ``namespace`` whose assignments are counted and checked."""

    class BudgetedNamespace(namespace):
        def __setitem__(self, name, value):  # {% set ns.x = ... %}
            _step()
            super().__setitem__(name, _check_value(value))

    return BudgetedNamespace


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment():
    """The sandbox that renders every chat template (made once)."""
    try:
        from jinja2 import nodes
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from e
    sandbox = _budgeted_sandbox(ImmutableSandboxedEnvironment, nodes)
    env = sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    for table in (env.filters, env.tests):
        for name, f in list(table.items()):
            table[name] = _guard(name, f)
    env.filters["xllm_counted"] = _counted
    env.globals.update(raise_exception=_raise_exception, namespace=_budgeted_namespace(Namespace),
                       strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=16)
def _compile(template):
    from jinja2 import TemplateSyntaxError
    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error, line {e.lineno}: {e.message}") from e


def check_messages(messages):
    """Raise ValueError unless `messages` is a list of dicts with a str ``role`` and a
    ``content`` that is a str, None or a list of parts (dicts such as ``{"type": "text",
    "text": ...}``, for templates that take them)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a str 'role', got {m.get('role')!r}")
        content = m.get("content", 0)
        parts = isinstance(content, list) and all(isinstance(p, dict) for p in content)
        if not (parts or isinstance(content, (str, type(None)))):
            raise ValueError(f"messages[{i}] needs a 'content' that is a str, None or a list "
                             "of parts (dicts)")


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
    token = _budget.set([MAX_RENDER_STEPS])
    try:
        pieces = []
        size = 0
        for piece in compiled.generate(messages=messages, bos_token=bos_token,
                                       add_generation_prompt=add_generation_prompt,
                                       eos_token=eos_token, **extra):
            size += len(piece)
            if size > MAX_RENDER_OUTPUT:
                _over(f"more than {MAX_RENDER_OUTPUT:,} characters of output")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except Exception as e:  # a template is code: any failure inside it is the template's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _budget.reset(token)


def encode_chat(tokenizer, template: Optional[str], messages, *, add_generation_prompt=True,
                special_in_content=False, **extra) -> list:
    """The token ids of `messages` rendered with the chat `template` (see ``render_chat``;
    ``bos_token`` and ``eos_token`` are the tokenizer's), ready for the model's reply.

    The template's own markup becomes control tokens, while every string the caller gives (in
    `messages`: contents, roles, tool calls...; and in `extra`, e.g. ``tools``) stays text: a
    special token's text inside it, such as ``<|im_end|>``, is encoded as those characters and
    can never close a turn or open another. This works by escaping those strings before
    rendering (``tokenizer.escape_special``), so templates that rewrite contents (for example
    keep what follows ``</think>``) still render. With ``special_in_content=True`` strings are
    not escaped: special token texts in them become control tokens (only for trusted input)."""
    bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id >= 0 else ""
    eos = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id >= 0 else ""
    if not special_in_content:
        try:
            messages = _escaped(messages, tokenizer.escape_special)
            extra = _escaped(extra, tokenizer.escape_special)
        except RecursionError:
            raise ValueError("messages or template variables nest too deeply") from None
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=bos, eos_token=eos, **extra)
    return tokenizer.encode(text, parse_special=True, escaped=not special_in_content)


def _escaped(value, escape):
    """`value` with `escape` applied to every string in it (dict keys too)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {_escaped(k, escape): _escaped(v, escape) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_escaped(v, escape) for v in value)
    return value


# ---- tool calls ----
#
# A template that defines tool calling (it reads ``tools`` or a message's ``tool_calls``) gets
# them the Hugging Face way: ``tools=[...]`` as a template variable, each call's ``arguments``
# as a dict. A template that does not gets xllm's JSON convention, the one Hermes-style models
# (Qwen2.5 among them) are trained on: the functions described in the system message, each call
# written as {"name": ..., "arguments": {...}} between TOOL_CALL_OPEN and TOOL_CALL_CLOSE, and
# each tool result sent back in a user turn between <tool_response> tags.

#: What opens and closes one tool call in xllm's convention (the model writes them as text).
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>\n"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>\s*", re.DOTALL)
_TOOLS_PROMPT = (
    "You may call one or more functions to help with the user's request. The functions, as "
    "JSON schemas:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with a JSON object "
    'of the form {{"name": <function name>, "arguments": <arguments object>}} between '
    "<tool_call> and </tool_call> tags, one pair of tags per call.")


def template_defines_tools(template: Optional[str]) -> bool:
    """Whether `template` renders tools or tool calls itself (it reads ``tools`` or
    ``tool_calls``)."""
    return bool(template) and re.search(r"\btools?_?calls?\b|\btools\b", template) is not None


def tool_messages(template: Optional[str], messages, tools=None):
    """(messages, extra template variables) that render `messages` (OpenAI chat messages, with
    ``tool_calls`` on assistant messages and ``tool`` messages) and describe `tools` (OpenAI
    function tools; None or [] for none) with `template`: the template's own way where it
    defines one (:func:`template_defines_tools`), xllm's convention otherwise (see above)."""
    check_messages(messages)
    if template_defines_tools(template):
        extra = {"tools": list(tools)} if tools else {}
        return [_with_argument_dicts(m) for m in messages], extra
    out = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{_text_content(m)}\n</tool_response>"
            if out and out[-1].get("_tool_results"):  # results of one turn share a user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif m.get("tool_calls"):
            calls = "".join(TOOL_CALL_OPEN + _call_json(call) + TOOL_CALL_CLOSE
                            for call in m["tool_calls"])
            text = _text_content(m)
            content = f"{text}\n{calls}" if text else calls
            out.append({**{k: v for k, v in m.items() if k != "tool_calls"}, "content": content})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = _TOOLS_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{_text_content(out[0])}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def parse_tool_calls(text: str):
    """(the text outside tool calls, stripped, or None if there is none; [(name, arguments as
    JSON text)] of each well-formed call) of a reply written in xllm's convention. A block
    that is not a JSON object with a str ``name`` stays in the text. A reply without blocks
    that is nothing but such an object, or a list of them (as Llama 3.1 and Mistral write
    calls: ``{"name": ..., "parameters": {...}}``, ``[TOOL_CALLS] [...]``), is read as calls
    too."""
    calls = []
    kept = []
    position = 0
    for match in _TOOL_CALL_RE.finditer(text):
        call = _call_of(match[1])
        if call is None:
            continue
        calls.append(call)
        kept.append(text[position:match.start()])
        position = match.end()
    kept.append(text[position:])
    content = "".join(kept).strip()
    if not calls:
        bare = _bare_calls(content)
        if bare:
            return None, bare
    return (content or None), calls


def _call_of(text):
    """(name, arguments as JSON text) of a call written as a JSON object, or None."""
    try:
        call = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    if "arguments" not in call and "parameters" not in call:
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return call["name"], arguments


def _bare_calls(text):
    """The calls of a reply that is only a call object or a list of them (after a
    ``[TOOL_CALLS]`` or ``<|python_tag|>`` marker, if any); [] otherwise."""
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        if text.startswith(marker):
            text = text[len(marker):].strip()
    if not text.startswith(("{", "[")):
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item) for item in items]
    if not calls or None in calls:
        return []
    return calls


def _call_json(call) -> str:
    """An OpenAI tool call ({"function": {"name", "arguments"}}) as the convention's JSON."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # kept as the text it is
    return json.dumps({"name": function.get("name"), "arguments": arguments},
                      ensure_ascii=False)


def _with_argument_dicts(message):
    """`message` with its tool calls' ``arguments`` as dicts (OpenAI sends JSON text; chat
    templates expect the object, as Hugging Face's do)."""
    if not message.get("tool_calls"):
        return dict(message)
    calls = []
    for call in message["tool_calls"]:
        call = dict(call)
        function = dict(call.get("function", {}))
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass
        call["function"] = function
        calls.append(call)
    return {**message, "tool_calls": calls}


def _text_content(message) -> str:
    """A message's content as text (None: "", a list of parts: their texts joined)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content
