"""Recaption of a packed instruction through an OpenAI-compatible endpoint, against the loopback fake server:
the request, validation with retries, HTTP errors and retries, the disk cache, the CLI and the node."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_openai import FakeOpenAI, Reply  # noqa: E402

from firered_core import packing as P  # noqa: E402
from firered_core import recaption as R  # noqa: E402
from firered_core.llm import ChatClient, ChatError  # noqa: E402
from test_packing import objects  # noqa: E402

FAST = dict(backoff_s=0.001, max_backoff_s=0.002, timeout_s=5.0, max_retries=2)
ORIGINAL = "Put the hat of Picture 4 on the man in Picture 1"


@pytest.fixture(scope="module")
def packed():
    result = P.pack_pictures(objects(4), area=128 * 128)
    return result, result.rewrite(ORIGINAL)


def client(fake, tmp_path, **kw) -> ChatClient:
    return ChatClient(R.endpoint(fake.url, "recaptioner", cache_dir=tmp_path / "cache", **{**FAST, **kw}))


def test_request_carries_instruction_rewrite_and_table(packed, tmp_path):
    result, rewritten = packed
    with FakeOpenAI() as fake:
        fake.script(Reply.text('"Put the hat on the right of Picture 2 on the man on the left of Picture 1"'))
        got = R.recaption(client(fake, tmp_path), ORIGINAL, rewritten, result, with_images=True)
        body = fake.bodies[0]
    assert got == "Put the hat on the right of Picture 2 on the man on the left of Picture 1"
    assert body["model"] == "recaptioner" and "2 new pictures" in body["messages"][0]["content"]
    parts = body["messages"][1]["content"]
    assert ORIGINAL in parts[0]["text"] and rewritten in parts[0]["text"] and result.table() in parts[0]["text"]
    assert [p["type"] for p in parts[1:]] == ["image_url", "image_url"]


def test_unusable_replies_and_server_errors_are_retried(packed, tmp_path):
    result, rewritten = packed
    with FakeOpenAI() as fake:
        fake.script(Reply.status(429, retry_after="0"), Reply.text("Use Picture 7 here"), Reply.text("   "),
                    Reply.text("fine: Picture 1 and Picture 2"))
        c = client(fake, tmp_path, max_retries=3)
        assert R.recaption(c, ORIGINAL, rewritten, result) == "fine: Picture 1 and Picture 2"
        assert fake.calls == 4
        # the same request again comes from the disk cache: no call
        assert R.recaption(client(fake, tmp_path), ORIGINAL, rewritten, result) == "fine: Picture 1 and Picture 2"
        assert fake.calls == 4


def test_persistent_failure_is_one_clear_error(packed, tmp_path):
    result, rewritten = packed
    with FakeOpenAI(responder=lambda body: Reply.status(503)) as fake:
        with pytest.raises(ChatError, match="failed after 3 attempt"):
            R.recaption(client(fake, tmp_path), ORIGINAL, rewritten, result)
        assert fake.calls == 3
    with FakeOpenAI(responder=lambda body: Reply.text("Picture 9, two lines\nmore")) as fake:
        with pytest.raises(ChatError, match="unparseable reply"):
            R.recaption(client(fake, tmp_path), ORIGINAL, rewritten, result)
    with pytest.raises(R.RecaptionError, match="model name"):
        R.endpoint("http://127.0.0.1:1/v1", "")


def test_check_reply_rules():
    assert R.check_reply(" “Picture 2 only” ", "x" * 30, 2) == "Picture 2 only"
    for bad, why in (("", "empty"), ("a\nb", "one line"), ("y" * 500, "characters"), ("图3里", "Picture 3")):
        with pytest.raises(ValueError, match=why):
            R.check_reply(bad, "x" * 30, 2)


def test_cli_recaptions_the_packed_instruction(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from firered_core import cli
    from firered_core.images import tensor_to_pil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    paths = []
    for k, img in enumerate(objects(4)):
        paths += ["-i", str(tmp_path / f"p{k}.png")]
        tensor_to_pil(img).save(paths[-1])
    with FakeOpenAI(responder=lambda body: Reply.text("The man of Picture 1 wears the hat of Picture 2")) as fake:
        code = cli.main(["--model", str(tiny_model_dir), *paths, "-p", ORIGINAL, "--pack-megapixels", "0.05",
                         "--steps", "1", "--true-cfg", "1", "--vl-area", str(56 * 56), "--vae-area", str(64 * 64),
                         "--recaption-url", fake.url, "--recaption-model", "m", "--width", "64", "--height", "48", "-o", str(tmp_path / "o.png")])
        assert fake.calls == 1
    assert code == 0
    assert "recaptioned instruction: The man of Picture 1 wears the hat of Picture 2" in capsys.readouterr().err
    assert (tmp_path / "xdg" / "firered" / "recaption").is_dir()
