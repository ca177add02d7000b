"""OpenAI-compatible chat completions (stdlib only): judge calls, recaptioning, data tools, rewards."""

from .cache import ChatCache, request_key
from .client import AuthError, BudgetExceeded, ChatClient, ChatEndpoint, ChatError, ChatResult
from .parts import image_bytes, image_part, text_part

__all__ = ["AuthError", "BudgetExceeded", "ChatCache", "ChatClient", "ChatEndpoint", "ChatError", "ChatResult",
           "image_bytes", "image_part", "request_key", "text_part"]
