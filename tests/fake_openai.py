"""A scriptable OpenAI-compatible chat-completions server on loopback, for tests (no network).

    with FakeOpenAI() as fake:                      # http://127.0.0.1:<free port>/v1
        fake.script(Reply.status(429, retry_after="0.2"), Reply.text("ok"))   # consumed in order, one per call
        fake.responder = lambda body: Reply.text("default")                    # after the script runs out
        ... ChatEndpoint(base_url=fake.url, model="judge") ...
        fake.calls, fake.bodies, fake.headers                                   # what was received

Reply kinds: ``text`` (a normal completion), ``status`` (an HTTP error, optional Retry-After), ``slow`` (sleeps
before answering, to trigger client timeouts), ``malformed`` (a 200 whose body is not a chat completion).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    kind: str
    content: str = ""
    code: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0

    @classmethod
    def text(cls, text: str) -> "Reply":
        return cls("text", content=text)

    @classmethod
    def status(cls, code: int, retry_after: str | None = None, text: str = "error") -> "Reply":
        return cls("status", content=text, code=code, retry_after=retry_after)

    @classmethod
    def slow(cls, delay_s: float, text: str = "late") -> "Reply":
        return cls("slow", content=text, delay_s=delay_s)

    @classmethod
    def malformed(cls) -> "Reply":
        return cls("malformed", content="{not json")


def completion(text: str, model: str = "fake") -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeOpenAI:
    """ThreadingHTTPServer on 127.0.0.1, port 0; counts calls; thread-safe."""

    def __init__(self, responder: Callable[[dict], Reply] | None = None):
        self.responder = responder or (lambda body: Reply.text("ok"))
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self.calls = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                reply = fake._record(self.path, body, dict(self.headers))
                self.counted = True
                try:
                    fake._answer(self, reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    fake._leave(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def script(self, *replies: Reply) -> "FakeOpenAI":
        with self._lock:
            self._script.extend(replies)
        return self

    def _record(self, path: str, body: dict, headers: dict) -> Reply:
        with self._lock:
            self.calls += 1
            self.bodies.append(body)
            self.headers.append(headers)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            if path.rstrip("/") != "/v1/chat/completions":
                return Reply.status(404, text=f"no route {path}")
            return self._script.popleft() if self._script else None

    def _answer(self, handler: BaseHTTPRequestHandler, reply: Reply | None, body: dict) -> None:
        if reply is None:
            try:
                reply = self.responder(body)
            except Exception as exc:  # a broken responder answers 500, naming the error, instead of hanging
                reply = Reply.status(500, text=f"fake responder failed: {exc!r}")
        if reply.kind == "slow":
            time.sleep(reply.delay_s)
        if reply.kind == "status":
            payload = json.dumps({"error": {"message": reply.content, "code": reply.code}}).encode()
            code = reply.code
        elif reply.kind == "malformed":
            payload, code = reply.content.encode(), 200
        else:
            payload, code = json.dumps(completion(reply.content, body.get("model", "fake"))).encode(), 200
        self._leave(handler)  # before the answer leaves: the client may send its next request as soon as it reads it
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        if reply.retry_after is not None:
            handler.send_header("Retry-After", reply.retry_after)
        handler.end_headers()
        handler.wfile.write(payload)

    def _leave(self, handler: BaseHTTPRequestHandler) -> None:
        """The request stops counting as in flight (once)."""
        with self._lock:
            if getattr(handler, "counted", False):
                handler.counted = False
                self._in_flight -= 1

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
