"""The OpenAI-compatible chat client against a fake server on loopback: retries, validation, cache, budget, keys."""

from __future__ import annotations

import base64
import io
import json
import logging
import time

import pytest
from PIL import Image

from fake_openai import FakeOpenAI, Reply
from firered_core.errors import FireRedError
from firered_core.llm import (AuthError, BudgetExceeded, ChatClient, ChatEndpoint, ChatError, image_part,
                              request_key, text_part)

FAST = dict(backoff_s=0.001, max_backoff_s=0.002, timeout_s=5.0)


def endpoint(fake: FakeOpenAI, **kw) -> ChatEndpoint:
    return ChatEndpoint(base_url=fake.url, model="judge-1", **{**FAST, **kw})


def user(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(i) for i in images), text_part(text)]}]


def test_plain_reply_request_shape_and_key_header(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    with FakeOpenAI() as fake:
        fake.script(Reply.text("hello"))
        result = ChatClient(endpoint(fake, api_key_env="MY_JUDGE_KEY")).complete(user("hi"), max_tokens=7)
    assert (result.text, result.cached, result.attempts) == ("hello", False, 1)
    body = fake.bodies[0]
    assert body["model"] == "judge-1" and body["temperature"] == 0.0 and body["max_tokens"] == 7
    assert body["messages"][0]["content"] == [{"type": "text", "text": "hi"}]
    assert fake.headers[0]["Authorization"] == "Bearer sk-test-123"


def test_no_key_in_env_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with FakeOpenAI() as fake:
        ChatClient(endpoint(fake, api_key_env="NOT_SET_ANYWHERE")).complete(user("hi"))
    assert "Authorization" not in fake.headers[0]


def test_429_retry_after_is_honoured():
    with FakeOpenAI() as fake:
        fake.script(Reply.status(429, retry_after="0.3"), Reply.text("ok"))
        start = time.perf_counter()
        result = ChatClient(endpoint(fake)).complete(user("x"))
        waited = time.perf_counter() - start
    assert (result.text, result.attempts, fake.calls) == ("ok", 2, 2)
    assert waited >= 0.3  # the back-off alone would be ~1 ms


@pytest.mark.parametrize("first", [Reply.status(500), Reply.status(503), Reply.malformed(), Reply.status(408)])
def test_transient_failures_are_retried(first):
    with FakeOpenAI() as fake:
        fake.script(first, first, Reply.text("fine"))
        result = ChatClient(endpoint(fake)).complete(user("x"))
    assert (result.text, result.attempts, fake.calls) == ("fine", 3, 3)


def test_timeout_is_retried():
    with FakeOpenAI() as fake:
        fake.script(Reply.slow(3.0), Reply.text("in time"))
        result = ChatClient(endpoint(fake, timeout_s=0.6)).complete(user("x"))
    assert (result.text, result.attempts) == ("in time", 2)


def test_gives_up_after_max_retries_and_does_not_retry_client_errors():
    with FakeOpenAI(lambda body: Reply.status(500)) as fake:
        with pytest.raises(ChatError, match=r"after 3 attempt\(s\): HTTP 500"):
            ChatClient(endpoint(fake, max_retries=2)).complete(user("x"))
        assert fake.calls == 3
    with FakeOpenAI(lambda body: Reply.status(400, text="bad request")) as fake:
        with pytest.raises(ChatError, match="HTTP 400: .*bad request"):
            ChatClient(endpoint(fake, max_retries=5)).complete(user("x"))
        assert fake.calls == 1


def test_connection_error_is_retried_then_reported():
    with FakeOpenAI() as fake:
        url = fake.url
    with pytest.raises(ChatError, match="after 2 attempt.*connection error"):
        ChatClient(ChatEndpoint(base_url=url, model="m", max_retries=1, **FAST)).complete(user("x"))


def test_validate_retries_unparseable_then_fails():
    def number(text: str) -> int:
        return int(text.strip())  # ValueError on anything else

    with FakeOpenAI() as fake:
        fake.script(Reply.text("I think four"), Reply.text(" 4 "))
        result = ChatClient(endpoint(fake)).complete(user("x"), validate=number)
        assert (result.value, result.attempts) == (4, 2)
    with FakeOpenAI(lambda body: Reply.text("never a number")) as fake:
        with pytest.raises(ChatError, match="unparseable reply"):
            ChatClient(endpoint(fake, max_retries=1)).complete(user("x"), validate=number)
        assert fake.calls == 2


def test_disk_cache_rerun_makes_zero_calls(tmp_path, make_image):
    a, b = make_image(32, 32, 0), make_image(32, 32, 1)
    with FakeOpenAI(lambda body: Reply.text(f"n={len(body['messages'][0]['content'])}")) as fake:
        first = ChatClient(endpoint(fake, cache_dir=tmp_path)).complete(user("judge", a))
        assert fake.calls == 1 and not first.cached
        again = ChatClient(endpoint(fake, cache_dir=tmp_path))  # a new process would see the same files
        second = again.complete(user("judge", a))
        assert (second.text, second.cached, second.attempts, fake.calls) == (first.text, True, 0, 1)
        again.complete(user("judge", b))  # another picture: another key
        again.complete(user("judge", a), temperature=0.5)  # other parameters: another key
        assert fake.calls == 3 and again.calls == 2 and again.cache_hits == 1
    assert len(list(tmp_path.rglob("*.json"))) == 3


def test_cache_key_hashes_images_and_ignores_nothing_else(make_image):
    img = make_image(16, 16, 0)
    key = request_key("m", user("p", img), {"temperature": 0.0})
    assert key == request_key("m", user("p", img.copy()), {"temperature": 0.0, "max_tokens": None})
    changed = img.copy()
    changed.putpixel((3, 3), (0, 0, 0))
    for other in (request_key("m2", user("p", img), {"temperature": 0.0}),
                  request_key("m", user("q", img), {"temperature": 0.0}),
                  request_key("m", user("p", changed), {"temperature": 0.0}),
                  request_key("m", user("p", img), {"temperature": 0.1})):
        assert other != key


def test_call_budget(tmp_path):
    with FakeOpenAI(lambda body: Reply.text("ok")) as fake:
        client = ChatClient(endpoint(fake, call_budget=2, cache_dir=tmp_path))
        client.complete(user("a"))
        client.complete(user("b"))
        with pytest.raises(BudgetExceeded, match="call budget of 2"):
            client.complete(user("c"))
        assert client.complete(user("a")).cached  # cached replies cost nothing
        assert fake.calls == 2
    with FakeOpenAI(lambda body: Reply.status(500)) as fake:  # retries count against the budget too
        with pytest.raises(BudgetExceeded):
            ChatClient(endpoint(fake, call_budget=2, max_retries=5)).complete(user("a"))
        assert fake.calls == 2


def test_api_key_never_in_errors_reprs_or_logs(monkeypatch, caplog):
    secret = "sk-SECRET-abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    echo = lambda body: Reply.status(401, text=f"invalid key {secret}")  # noqa: E731  (a server that echoes it)
    with FakeOpenAI(echo) as fake:
        client = ChatClient(endpoint(fake))
        with pytest.raises(ChatError) as info:
            client.complete(user("x"))
        assert fake.headers[0]["Authorization"] == f"Bearer {secret}"
    with FakeOpenAI(lambda body: Reply.status(500, text=f"oops {secret}")) as fake:
        with pytest.raises(ChatError) as info2:
            ChatClient(endpoint(fake, max_retries=2)).complete(user("x"))
    for text in (str(info.value), repr(info.value), str(info2.value), repr(client), repr(client.endpoint),
                 caplog.text):
        assert secret not in text
    assert "***" in str(info.value) and "OPENAI_API_KEY" in str(info.value)
    assert "retry" in caplog.text  # the retries were logged, redacted


def test_map_bounded_concurrency_order_and_failures_in_place():
    def responder(body):
        text = body["messages"][0]["content"][0]["text"]
        return Reply.status(400, text="no") if text == "bad" else Reply.slow(0.15, text.upper())

    prompts = ["a", "b", "bad", "c", "d", "e", "f", "g"]
    done = []
    with FakeOpenAI(responder) as fake:
        results = ChatClient(endpoint(fake, concurrency=3)).map([user(p) for p in prompts],
                                                                on_done=lambda i, r: done.append(i))
    assert 2 <= fake.max_in_flight <= 3
    assert [r.text for r in results if not isinstance(r, ChatError)] == ["A", "B", "C", "D", "E", "F", "G"]
    assert isinstance(results[2], ChatError) and sorted(done) == list(range(8))


def test_backoff_is_exponential_with_jitter_and_capped():
    client = ChatClient(ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m", backoff_s=1.0,
                                     max_backoff_s=5.0), seed=0)
    delays = [client._delay(a, None) for a in range(6)]
    for attempt, delay in enumerate(delays):
        base = min(5.0, 2.0 ** attempt)
        assert 0.5 * base <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered
    assert client._delay(0, 2.5) == 2.5  # Retry-After wins


@pytest.mark.parametrize("kw, field", [(dict(base_url="api.openai.com"), "base_url"), (dict(model=" "), "model"),
                                      (dict(concurrency=0), "concurrency"), (dict(timeout_s=0), "timeout_s"),
                                      (dict(max_retries=1.5), "max_retries"),
                                      (dict(backoff_s=2.0, max_backoff_s=1.0), "max_backoff_s"),
                                      (dict(call_budget=-1), "call_budget"),
                                      (dict(api_key_env="sk-abc=1"), "api_key_env")])
def test_endpoint_validation_names_the_field(kw, field):
    with pytest.raises(FireRedError, match=field) as info:
        ChatEndpoint(**{"base_url": "http://x/v1", "model": "m", **kw})
    assert info.value.field == field


def test_image_part_data_urls(tmp_path, make_image):
    img = make_image(20, 12, 3)
    url = image_part(img)["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.size == (20, 12) and back.tobytes() == img.tobytes()
    img.save(tmp_path / "a.jpg")
    assert image_part(tmp_path / "a.jpg")["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert image_part((tmp_path / "a.jpg").read_bytes()) == image_part(str(tmp_path / "a.jpg"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(FireRedError, match="x.txt"):
        image_part(tmp_path / "x.txt")
    with pytest.raises(FireRedError, match="does not exist"):
        image_part(tmp_path / "missing.png")
    assert json.dumps(text_part("图B")) and text_part(3) == {"type": "text", "text": "3"}


def test_budget_holds_under_concurrency():
    with FakeOpenAI(lambda body: Reply.slow(0.05, "ok")) as fake:
        results = ChatClient(endpoint(fake, call_budget=3, concurrency=4)).map([user(str(i)) for i in range(8)])
    assert fake.calls == 3
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 5


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_is_one_call_even_with_many_threads(status):
    """The first request goes alone until the endpoint has answered: a refused key costs one call whatever the
    concurrency, is never retried, and nothing is sent afterwards; an accepted key lifts the one-at-a-time gate."""
    with FakeOpenAI(lambda body: Reply.slow(0.05, "ok") if body["model"] == "good" else Reply.status(status)) as fake:
        client = ChatClient(endpoint(fake, concurrency=8, max_retries=5))
        with pytest.raises(AuthError, match=rf"{fake.url}/chat/completions \(judge-1\) refused the API key: HTTP "
                                            rf"{status}"):
            client.map([user(str(i)) for i in range(12)])
        assert fake.calls == 1
        with pytest.raises(AuthError):
            client.complete(user("again"))
        with pytest.raises(AuthError):
            client.preflight()
        assert fake.calls == 1
        good = ChatClient(ChatEndpoint(base_url=fake.url, model="good", concurrency=4, **FAST))
        assert good.preflight().text == "ok" and fake.calls == 2
        assert [r.text for r in good.map([user(str(i)) for i in range(8)])] == ["ok"] * 8
        assert fake.max_in_flight > 1  # answered once: the requests run side by side again

