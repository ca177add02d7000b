"""An OpenAI-compatible chat-completions client, standard library only.

Used by the evaluation judge, masked-edit recaptioning, the data tools and RL rewards. One :class:`ChatEndpoint`
(validated settings) and one :class:`ChatClient` per endpoint:

- retries with exponential back-off and jitter on HTTP 408 / 409 / 425 / 429 / 5xx, timeouts, connection errors and
  malformed replies; a ``Retry-After`` header (seconds, fractions accepted) is honoured;
- refused credentials (HTTP 401 / 403) are never retried: the first one raises :class:`AuthError` and every later
  request on the client is refused without being sent; until the endpoint has answered once, requests go one at a
  time, so a refused key costs one call however many threads are waiting (:meth:`ChatClient.preflight` asks first);
- ``validate(text)`` raising ``ValueError`` marks a reply unparseable: it is retried, then reported as a failure;
- a disk cache (:mod:`.cache`) so a rerun of the same request costs no call;
- a call budget: every HTTP request counts, cache hits do not; the request past the budget raises
  :class:`BudgetExceeded` instead of being sent;
- the API key is read from the environment variable the endpoint names, at request time, and is never logged, kept
  in a repr, or put in an exception message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import FireRedError
from .cache import ChatCache, request_key

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
MAX_RETRY_AFTER_S = 600.0


class ChatError(FireRedError):
    """A request that failed for good (after its retries), or was refused before being sent."""


class AuthError(ChatError):
    """The endpoint refused the credentials (HTTP 401 / 403): nothing more is sent on this client."""


class BudgetExceeded(ChatError):
    """The endpoint's ``call_budget`` is spent; nothing more is sent."""


@dataclass(frozen=True)
class ChatEndpoint:
    """Where and how to call. Validated on construction; ranges are in the error messages.

    ``api_key_env`` names the environment variable holding the key (the key itself is never stored here); an unset
    variable sends no ``Authorization`` header (local servers such as vLLM or llama.cpp need none).
    ``call_budget`` None = unlimited. ``cache_dir`` None = no disk cache.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    concurrency: int = 4
    call_budget: int | None = None
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        url = str(self.base_url).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise FireRedError(f"base_url {self.base_url!r} must start with http:// or https:// "
                               "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)", field="base_url")
        object.__setattr__(self, "base_url", url)
        if not str(self.model).strip():
            raise FireRedError("model must name the served model (e.g. 'gpt-4.1' or 'Qwen/Qwen2.5-VL-72B-Instruct')",
                              field="model")
        if not str(self.api_key_env).strip() or "=" in self.api_key_env:
            raise FireRedError(f"api_key_env {self.api_key_env!r} must be the NAME of an environment variable",
                              field="api_key_env")
        _check_range("timeout_s", self.timeout_s, 0.001, 3600)
        _check_range("max_retries", self.max_retries, 0, 100, integer=True)
        _check_range("backoff_s", self.backoff_s, 0, 3600)
        _check_range("max_backoff_s", self.max_backoff_s, self.backoff_s, 3600)
        _check_range("concurrency", self.concurrency, 1, 256, integer=True)
        if self.call_budget is not None:
            _check_range("call_budget", self.call_budget, 0, 10**9, integer=True)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"


def _check_range(name: str, value, low, high, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise FireRedError(f"{name}={value!r} must be an integer in [{low}, {high}]", field=name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise FireRedError(f"{name}={value!r} must be a number in [{low}, {high}]", field=name)


@dataclass
class ChatResult:
    """The reply text; ``cached`` when it came from the disk cache; ``attempts`` = HTTP requests it took (0 if
    cached); ``value`` = what ``validate`` returned (None without a validator)."""

    text: str
    cached: bool
    attempts: int
    value: Any = field(default=None, repr=False)


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class ChatClient:
    """Thread-safe; at most ``endpoint.concurrency`` requests in flight across all threads using this client."""

    def __init__(self, endpoint: ChatEndpoint, seed: int | None = None):
        self.endpoint = endpoint
        self.cache = ChatCache(endpoint.cache_dir) if endpoint.cache_dir is not None else None
        self._slots = threading.BoundedSemaphore(endpoint.concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.calls = 0
        self.cache_hits = 0
        self._probe = threading.Lock()  # one request at a time until the endpoint has answered once
        self._answered = False
        self.refused: AuthError | None = None

    def __repr__(self) -> str:
        e = self.endpoint
        return f"ChatClient(model={e.model!r}, base_url={e.base_url!r}, calls={self.calls})"

    def preflight(self) -> ChatResult:
        """One small uncached request, before hours of work depend on the endpoint: :class:`AuthError` when it refuses
        the key, :class:`ChatError` when it cannot answer at all (after the retries); any reply at all passes."""
        return self.complete([{"role": "user", "content": [{"type": "text", "text": "Reply with the word OK."}]}],
                             use_cache=False)

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int | None = None,
                 validate: Callable[[str], Any] | None = None, extra: dict | None = None,
                 use_cache: bool = True) -> ChatResult:
        """One chat completion. ``extra`` = more request fields (e.g. ``response_format``, ``top_p``), part of the
        cache key."""
        params = {"temperature": temperature, "max_tokens": max_tokens, **(extra or {})}
        key = request_key(self.endpoint.model, messages, params) if self.cache is not None and use_cache else None
        if key is not None:
            text = self.cache.get(key)
            if text is not None:
                try:
                    value = validate(text) if validate else None
                except ValueError:
                    pass  # a validator stricter than the one that accepted it: ask again
                else:
                    with self._lock:
                        self.cache_hits += 1
                    return ChatResult(text, True, 0, value)
        body = {"model": self.endpoint.model, "messages": messages,
                **{k: v for k, v in params.items() if v is not None}}
        data = json.dumps(body, ensure_ascii=False).encode()
        attempts, last = 0, "no attempt"
        for attempt in range(self.endpoint.max_retries + 1):
            attempts += 1
            try:
                text = self._post(data)
                value = validate(text) if validate else None
            except ChatError:
                raise
            except ValueError as exc:
                last, retry_after = f"unparseable reply: {self._redact(str(exc))}", None
            except _Retry as exc:
                last, retry_after = str(exc), exc.retry_after
            else:
                if key is not None:
                    self.cache.put(key, text, self.endpoint.model)
                return ChatResult(text, False, attempts, value)
            if attempt < self.endpoint.max_retries:
                delay = self._delay(attempt, retry_after)
                log.info("chat %s: %s; retry %d/%d in %.2fs", self.endpoint.model, last, attempt + 1,
                         self.endpoint.max_retries, delay)
                time.sleep(delay)
        raise ChatError(f"{self.endpoint.url} ({self.endpoint.model}): failed after {attempts} attempt(s): {last}")

    def map(self, message_lists: Sequence[list[dict] | Callable[[], list[dict]]], *,
            on_done: Callable[[int, Any], None] | None = None, **kwargs) -> list[ChatResult | ChatError]:
        """:meth:`complete` over many requests, ``endpoint.concurrency`` at a time, results in input order.

        An item may be a zero-argument function returning the messages: it is called in the worker, so thousands of
        image-heavy requests are never all in memory at once (an error it raises as a ``FireRedError`` becomes that
        item's ChatError). A request that fails gives its :class:`ChatError` (or :class:`BudgetExceeded`) in its
        place instead of raising, so one bad sample does not lose the others. ``on_done(index, result)`` is called as
        each finishes. Refused credentials are the exception: :class:`AuthError` is raised once the requests already
        started have finished (later ones are not sent).
        """
        results: list = [None] * len(message_lists)

        def one(i: int):
            item = message_lists[i]
            try:
                results[i] = self.complete(item() if callable(item) else item, **kwargs)
            except ChatError as exc:
                results[i] = exc
            except FireRedError as exc:
                results[i] = ChatError(str(exc))
            if on_done is not None:
                on_done(i, results[i])

        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            for future in [pool.submit(one, i) for i in range(len(message_lists))]:
                future.result()
        if self.refused is not None:
            raise self.refused
        return results

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        base = min(self.endpoint.max_backoff_s, self.endpoint.backoff_s * 2 ** attempt)
        with self._lock:
            return base * (0.5 + 0.5 * self._rng.random())

    def _take_call(self) -> None:
        with self._lock:
            budget = self.endpoint.call_budget
            if budget is not None and self.calls >= budget:
                raise BudgetExceeded(f"call budget of {budget} request(s) to {self.endpoint.url} is spent; "
                                     "raise call_budget or rerun (cached replies cost nothing)")
            self.calls += 1

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.endpoint.api_key_env)
        return text.replace(key, "***") if key else text

    def _post(self, data: bytes) -> str:
        """One HTTP request -> the reply text; :class:`_Retry` for what is worth retrying, ChatError otherwise."""
        if self.refused is not None:
            raise self.refused
        if self._answered:
            return self._send(data)
        with self._probe:
            if self.refused is not None:
                raise self.refused
            return self._send(data)

    def _send(self, data: bytes) -> str:
        self._take_call()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.endpoint.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint.url, data=data, headers=headers, method="POST")
        with self._slots:
            try:
                with urllib.request.urlopen(request, timeout=self.endpoint.timeout_s) as response:
                    raw = response.read()
                self._answered = True
            except urllib.error.HTTPError as exc:
                detail = self._redact(exc.read(500).decode("utf-8", "replace").strip())
                reason = f"HTTP {exc.code}: {detail[:300]}"
                if exc.code in (401, 403):
                    self.refused = AuthError(f"{self.endpoint.url} ({self.endpoint.model}) refused the API key: "
                                             f"{reason} (is ${self.endpoint.api_key_env} set, and valid for this "
                                             "endpoint?); nothing more is sent")
                    raise self.refused from None
                self._answered = True
                if exc.code in RETRY_STATUS:
                    raise _Retry(reason, _retry_after(exc.headers.get("Retry-After"))) from None
                raise ChatError(f"{self.endpoint.url} ({self.endpoint.model}): {reason}") from None
            except (TimeoutError, socket.timeout):
                raise _Retry(f"timed out after {self.endpoint.timeout_s}s") from None
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise _Retry(f"timed out after {self.endpoint.timeout_s}s") from None
                raise _Retry(f"connection error: {self._redact(str(reason))}") from None
        return _reply_text(raw)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _reply_text(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        content = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry(f"malformed reply (not a chat completion): {raw[:200]!r}") from None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise _Retry(f"malformed reply: content is {type(content).__name__}")
    return content
