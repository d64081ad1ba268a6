"""Exceptions raised by xllm. All derive from XLLMError (and ValueError where the input is wrong)."""


class XLLMError(Exception):
    """Base class of every error xllm raises on purpose."""


class ModelFormatError(XLLMError, ValueError):
    """A model, weight or tokenizer file is missing, truncated, corrupt or inconsistent."""


class ContextLengthError(XLLMError, ValueError):
    """A sequence would grow past the model's context length."""


class ChatTemplateError(XLLMError, ValueError):
    """A chat template is missing, does not compile, or fails (or refuses) to render."""


class DownloadError(XLLMError):
    """A named model could not be downloaded, verified or cached."""


class SessionBusyError(XLLMError, RuntimeError):
    """A session was called while another of its calls (or an unfinished stream) was running."""


class ConstraintError(XLLMError, ValueError):
    """A constraint (JSON schema, grammar, regex, choices) is malformed, uses something the
    grammar library does not support, or can never be satisfied within the tokens the request
    allows (HTTP 400)."""
