"""xllm: Llama-family language models, fast on ordinary CPUs, from Python.

>>> import xllm
>>> model = xllm.load("path/to/model")            # doctest: +SKIP
>>> model.generate("Once upon a time", max_new_tokens=32)   # doctest: +SKIP
"""
from ._kernels import get_threads, set_threads
from .api import Model, Session, load
from .config import ModelConfig
from .errors import (ChatTemplateError, ConstraintError, ContextLengthError, ModelFormatError,
                     SessionBusyError, XLLMError)

__version__ = "0.1.0"
__all__ = ["load", "Model", "Session", "ModelConfig", "set_threads", "get_threads", "XLLMError",
           "ModelFormatError", "ContextLengthError", "ChatTemplateError", "SessionBusyError",
           "ConstraintError",
           "__version__"]
