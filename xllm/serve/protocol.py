"""The OpenAI API's request bodies, as pydantic models, and its error JSON.

Unknown fields are ignored (as llama.cpp and vLLM do, so clients that send extras keep
working). Fields xllm does not implement but whose silent omission would change the answer are
refused with 400 "not supported". Types are strict: a string where a number belongs is a 400,
not a guess."""
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # as OpenAI's API


class APIError(Exception):
    """An error answered with OpenAI's error JSON and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def __reduce__(self):
        # picklable with its fields (it crosses processes between Ray Serve replicas)
        return (_api_error, (self.status, self.message, self.type, self.param, self.code,
                             self.headers))


def _api_error(status, message, type, param, code, headers) -> APIError:
    return APIError(status, message, type=type, param=param, code=code, headers=headers)


def not_supported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server", param=param,
                    code="not_supported")


Number = Union[StrictInt, StrictFloat]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Optional[Number] = Field(default=None, ge=0, le=2)
    top_p: Optional[Number] = Field(default=None, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    seed: Optional[StrictInt] = Field(default=None, ge=0, lt=2**63)
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    stream: StrictBool = False
    stream_options: Optional[Dict[str, Any]] = None
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2)
    logit_bias: Optional[Dict[str, Any]] = None
    user: Optional[StrictStr] = None
    # extensions that llama.cpp and vLLM accept
    top_k: StrictInt = Field(default=0, ge=0)
    min_p: Number = Field(default=0.0, ge=0, le=1)
    repetition_penalty: Number = Field(default=1.0, gt=0)
    ignore_eos: StrictBool = False  # vLLM's and llama.cpp's: generate max_tokens (benchmarks)
    # structured output (xllm/serve/structured.py): llama.cpp's and vLLM's names
    grammar: Optional[StrictStr] = None
    regex: Optional[StrictStr] = None
    choice: Optional[List[StrictStr]] = None
    guided_grammar: Optional[StrictStr] = None
    guided_regex: Optional[StrictStr] = None
    guided_choice: Optional[List[StrictStr]] = None
    guided_json: Optional[Union[Dict[str, Any], StrictStr]] = None

    def stop_strings(self) -> tuple:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def check_supported(self):
        if self.logit_bias:
            raise not_supported("logit_bias", "logit_bias")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, List[ContentPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None  # an assistant's calls
    tool_call_id: Optional[StrictStr] = None  # the call a tool message answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise not_supported("messages", f"content of type {part.type!r}")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Body):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Any]] = None  # checked in xllm/serve/structured.py
    tool_choice: Optional[Union[StrictStr, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    functions: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None

    def check_supported(self):
        super().check_supported()
        if self.functions:
            raise not_supported("functions", "functions (deprecated: use tools)")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def token_limit(self) -> Optional[int]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprobs_count(self) -> Optional[int]:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_Body):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None

    def check_supported(self):
        super().check_supported()
        if self.echo:
            raise not_supported("echo", "echo")
        if self.suffix:
            raise not_supported("suffix", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise not_supported("best_of", "best_of other than n")

    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    def logprobs_count(self) -> Optional[int]:
        return self.logprobs

    def prompts(self) -> list:
        """The prompts: texts or lists of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    content: Optional[StrictStr] = None  # llama.cpp's name
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[StrictStr] = None
    tokens: List[StrictInt]


def validation_error(error) -> APIError:
    """The first problem of a pydantic ValidationError as a 400, naming the field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()))
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                    param=param or None)
