"""Disk cache of chat completions, keyed by content: a rerun of the same request costs no call.

The key is ``sha256`` of the canonical JSON of (model, messages, parameters) where every image data URL is replaced
by the hash of its bytes, so the key is short, stable across machines, and changes when any pixel does. Entries are
``<dir>/<key[:2]>/<key>.json`` written atomically (unique temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FORMAT = "firered-chat/1"


def _canonical_messages(messages: list[dict]) -> list:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    parts.append({"type": "image", "sha256": hashlib.sha256(url.encode()).hexdigest()})
                else:
                    parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out


def request_key(model: str, messages: list[dict], params: dict) -> str:
    """The cache key of one request (images by hash; parameters with value None left out)."""
    body = {"format": FORMAT, "model": model, "messages": _canonical_messages(messages),
            "params": {k: v for k, v in params.items() if v is not None}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ChatCache:
    """Replies on disk, one JSON file per key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return entry.get("text") if entry.get("format") == FORMAT else None

    def put(self, key: str, text: str, model: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "model": model, "text": text}, ensure_ascii=False),
                       encoding="utf-8")
        os.replace(tmp, path)
