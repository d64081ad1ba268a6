"""Structured output and tool calls in the OpenAI API (docs/structured.rst).

What a request asks for becomes, here, one :class:`xllm.engine.constraints.Constraint` (or
none): OpenAI's ``response_format``, the llama.cpp/vLLM extensions ``grammar``, ``regex`` and
``choice`` (and vLLM's ``guided_*`` names), or ``tool_choice`` "required" or a named function.
A chat's tools and tool messages are rendered by xllm/chat.py (the template's own way, or
xllm's JSON convention); the reply's calls come back in OpenAI's ``tool_calls`` shape, whole or
streamed (:class:`ToolCallStream`)."""
import secrets
from typing import Optional

from ..chat import TOOL_CALL_OPEN, parse_tool_calls, tool_messages
from ..engine.constraints import Constraint, ConstraintError
from .protocol import APIError

# request fields that give a constraint: (field, the Constraint constructor it feeds)
_EXTENSIONS = (("grammar", "grammar"), ("guided_grammar", "grammar"),
               ("regex", "regex"), ("guided_regex", "regex"),
               ("choice", "choices"), ("guided_choice", "choices"),
               ("guided_json", "json_schema"))
_MARK = TOOL_CALL_OPEN.strip()  # what starts a tool call in a reply
_BARE_STARTS = ("{", "[", "<|python_tag|>")  # how a reply that is only calls may begin


class ToolPlan:
    """What a chat request's tools make of it: the tools offered to the model (described in
    the prompt), the constraint on the reply (``tool_choice`` "required" or a named function),
    and whether the reply is read for tool calls."""

    def __init__(self, offered=(), constraint=None, parse=False):
        self.offered = list(offered)
        self.constraint = constraint
        self.parse = parse


NO_TOOLS = ToolPlan()


def tool_plan(body) -> ToolPlan:
    """The :class:`ToolPlan` of a chat request; APIError 400 for malformed tools or a
    tool_choice that names no tool given."""
    tools = body.tools or []
    for i, tool in enumerate(tools):
        _check_tool(tool, i)
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return NO_TOOLS
    if not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    parallel = body.parallel_tool_calls is not False
    if choice == "auto":
        return ToolPlan(tools, None, parse=True)
    if choice == "required":
        return ToolPlan(tools, _tool_constraint(tools, parallel), parse=True)
    name = _named_choice(choice)
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                       param="tool_choice")
    return ToolPlan(tools, _tool_constraint(chosen[:1], False), parse=True)


def _check_tool(tool, i):
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise APIError(400, f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}",
                       param=param)
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
            not function["name"]:
        raise APIError(400, f"{param}.function needs a str name", param=param)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise APIError(400, f"{param}.function.parameters must be a JSON schema (an object)",
                       param=param)


def _named_choice(choice) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict) and \
            isinstance(choice["function"].get("name"), str):
        return choice["function"]["name"]
    raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": '
                        '"function", "function": {"name": ...}}', param="tool_choice")


def _tool_constraint(tools, parallel):
    try:
        return Constraint.tool_calls(tools, parallel=parallel)
    except (ConstraintError, TypeError) as error:
        raise APIError(400, str(error), param="tools") from None


def request_constraint(body, plan: ToolPlan):
    """(the one constraint a request asks for, or None; the request field that gives it);
    APIError 400 (naming the field) if it asks for more than one or gives a malformed one.
    :func:`check_constraint` then checks it against the model."""
    asked = []  # (field, Constraint constructor, value)
    for field, kind in _EXTENSIONS:
        value = getattr(body, field, None)
        if value is not None:
            asked.append((field, kind, value))
    response_schema = _response_format_schema(body.response_format)
    if response_schema is not None:
        asked.append(("response_format", "json_schema", response_schema))
    if plan.constraint is not None:
        if asked:
            raise APIError(400, f"tool_choice {body.tool_choice!r} constrains the reply to tool "
                                f"calls: it cannot be combined with {asked[0][0]}",
                           param=asked[0][0])
        return plan.constraint, "tool_choice"
    if len(asked) > 1:
        raise APIError(400, f"give at most one of {', '.join(f for f, _, _ in asked)}",
                       param=asked[1][0])
    if not asked:
        return None, None
    field, kind, value = asked[0]
    try:
        return getattr(Constraint, kind)(value), field
    except (ConstraintError, TypeError) as error:
        raise APIError(400, f"{field}: {error}", param=field) from None


def matchers(model, constraint, max_tokens, field, count) -> list:
    """`count` new matchers of `constraint` for `model` (None each if it is None), one per
    engine request; APIError 400 naming `field` unless it compiles against the model's
    vocabulary and can finish within `max_tokens`. Compiling takes milliseconds (more for
    large grammars): the app runs this off its event loop."""
    if constraint is None:
        return [None] * count
    try:
        return [model.matcher(constraint, max_tokens) for _ in range(count)]
    except ConstraintError as error:
        raise APIError(400, str(error), param=field) from None


def _response_format_schema(response_format) -> Optional[dict]:
    """The JSON schema that OpenAI's ``response_format`` asks for (None: plain text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON "
                                "schema object", param="response_format")
        return schema
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, "
                        "json_schema", param="response_format")


def chat_messages(messages, template, plan: ToolPlan):
    """(messages as dicts, extra template variables) of a chat request's messages (pydantic
    ChatMessage objects) and its offered tools, ready for ``Model.chat_ids``."""
    plain = []
    for m in messages:
        message = {"role": m.role, "content": m.text() if m.content is not None or
                   m.role != "assistant" else None}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        plain.append(message)
    if not plan.offered and not any("tool_calls" in m or m["role"] == "tool" for m in plain):
        for message in plain:
            message["content"] = message["content"] or ""
        return plain, {}
    return tool_messages(template, plain, plan.offered)


def tool_call_json(name, arguments) -> dict:
    """One call in OpenAI's shape, with a new id."""
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def reply_message(text, plan: ToolPlan):
    """(the assistant message of a whole reply, whether it holds tool calls)."""
    if plan.parse:
        content, calls = parse_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content,
                    "tool_calls": [tool_call_json(n, a) for n, a in calls]}, True
    return {"role": "assistant", "content": text}, False


class ToolCallStream:
    """A streamed reply read for tool calls: text before the first tool call streams as
    content; from the call's opening mark on, the text is held back and read at the end. A
    reply that begins like a bare call (``{``, ``[``, ``<|python_tag|>``: see
    :func:`xllm.chat.parse_tool_calls`) is held back whole."""

    def __init__(self):
        self.pending = ""  # text that may be the beginning of the mark
        self.held = None  # the text from the mark on, once it has appeared
        self.emitted = False  # whether any content went out

    def push(self, text) -> str:
        """The content that can go out now."""
        if self.held is not None:
            self.held += text
            return ""
        text = self.pending + text
        if not self.emitted:
            lead = text.lstrip()
            if lead.startswith(_BARE_STARTS):
                self.pending = ""
                self.held = text
                return ""
            if not lead or any(start.startswith(lead) for start in _BARE_STARTS):
                self.pending = text  # too early to tell
                return ""
        out = self._before_mark(text)
        self.emitted = self.emitted or bool(out)
        return out

    def _before_mark(self, text) -> str:
        found = text.find(_MARK)
        if found >= 0:
            self.pending = ""
            self.held = text[found:]
            return text[:found]
        keep = _partial_mark(text)
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self):
        """(the rest of the content, or ""; the tool calls in OpenAI's shape) at the end."""
        if self.held is None:
            rest = self.pending
            self.pending = ""
            return rest, []
        content, calls = parse_tool_calls(self.held)
        self.held = None
        return content or "", [tool_call_json(n, a) for n, a in calls]


def _partial_mark(text) -> int:
    """The length of the longest end of `text` that begins the mark."""
    for n in range(min(len(text), len(_MARK) - 1), 0, -1):
        if _MARK.startswith(text[-n:]):
            return n
    return 0
