"""Optional recaption of a packed instruction through an OpenAI-compatible chat endpoint (off by default).

After packing (:mod:`.packing`), the mechanical rewrite ("the second item (right) of Picture 2") is correct but
stilted. As FireRed's agent does with its hosted model, a chat model can be asked to rephrase it naturally, seeing
the original instruction, the mechanical rewrite, the mapping table and (optionally) the composites. The reply is
validated (non-empty, one instruction, only pictures that exist) and retried if it is not; replies are cached on
disk, so a rerun costs no call. The client is :mod:`firered_core.llm` (retries, back-off, key from the environment).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .conditioning import check_prompt_text
from .errors import FireRedError
from .llm import ChatClient, ChatEndpoint, image_part, text_part
from .packing import PackResult, mentions

SYSTEM = (
    "You rewrite image-editing instructions for an image-editing model that sees at most 3 pictures. The user's "
    "original pictures were cropped and packed into {count} new pictures; the mapping table says where each "
    "original picture went. Rewrite the instruction so that it refers only to the new pictures (as 'Picture N' in "
    "English, '图N' in Chinese) and to the items' positions in them, keeping every other word of the request. Answer "
    "with the rewritten instruction only, in the language of the original, on one line, without quotes.")
MAX_GROWTH = 6  # a reply more than this many times longer than the mechanical rewrite is not an instruction


class RecaptionError(FireRedError):
    """The endpoint settings are incomplete or the reply could not be used."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/firered/recaption`` (``~/.cache/firered/recaption``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "firered" / "recaption"


def endpoint(base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
             cache_dir: str | Path | None = None, **kwargs) -> ChatEndpoint:
    """A validated endpoint for recaptioning (cache in :func:`default_cache_dir` unless given)."""
    if not base_url or not model:
        raise RecaptionError("recaption needs both a base URL (e.g. https://api.openai.com/v1) and a model name")
    return ChatEndpoint(base_url=base_url, model=model, api_key_env=api_key_env,
                        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(), **kwargs)


def messages(original: str, rewritten: str, result: PackResult,
             composites: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """The chat request: the rules, then the instruction, its mechanical rewrite, the table (and the pictures)."""
    text = (f"Original instruction: {original}\nMechanical rewrite: {rewritten}\n"
            f"Mapping table:\n{result.table()}")
    user: list[dict] | str = text
    if composites:
        from .images import tensor_to_pil

        user = [text_part(text)] + [image_part(tensor_to_pil(c)) for c in composites]
    return [{"role": "system", "content": SYSTEM.format(count=len(result.composites))},
            {"role": "user", "content": user}]


def check_reply(text: str, rewritten: str, count: int) -> str:
    """The cleaned reply, or ValueError (the client retries): empty, several lines, far too long, or naming a
    picture that does not exist among the ``count`` composites."""
    reply = text.strip().strip('"“”').strip()
    if not reply:
        raise ValueError("empty reply")
    if "\n" in reply:
        raise ValueError("more than one line")
    if len(reply) > MAX_GROWTH * max(len(rewritten), 20):
        raise ValueError(f"reply of {len(reply)} characters for an instruction of {len(rewritten)}")
    check_prompt_text(reply, "the reply")  # it becomes a prompt (an InputError is a ValueError: retried)
    bad = [n for n in mentions(reply) if not 1 <= n <= count]
    if bad:
        raise ValueError(f"the reply names Picture {bad[0]}, but there are {count} pictures")
    return reply


def recaption(client: ChatClient, original: str, rewritten: str, result: PackResult,
              with_images: bool = False) -> str:
    """Ask the endpoint for a natural rewrite of the packed instruction; raise ChatError when it keeps failing."""
    count = len(result.composites)
    reply = client.complete(messages(original, rewritten, result, result.composites if with_images else None),
                            validate=lambda text: check_reply(text, rewritten, count))
    return reply.value
