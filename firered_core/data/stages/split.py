"""Task splitting (optional, off unless configured): multi-operation instructions are split into single operations
by an OpenAI-compatible chat endpoint (firered_core.llm: retries, disk cache, call budget). The row stays as it is
and gains ``operations`` (verdict "fix"); rows that read as one operation are kept without a call."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..extras import DataToolError
from .base import FIX, KEEP, Stage, StageResult, decision

# an instruction that may hold several operations: a conjunction or a list separator (English or Chinese)
MULTI_HINT = re.compile(r"\b(and|then|also|plus)\b|[,;，；、]|和|并且|然后|同时", re.IGNORECASE)

PROMPT = ("You split image-editing instructions into their single operations. Reply with JSON only: "
          '{{"operations": [{{"instruction": "...", "instruction_cn": "..."}}, ...]}} with 1 to {max_ops} '
          "operations, in the order given, each a complete instruction on its own (keep 'Picture N' references). "
          "An instruction with one operation gives a list of one.")


def parse_operations(text: str, max_ops: int) -> list[dict]:
    """The validator: JSON (optionally in a code fence) with 1..max_ops operations; ValueError makes the client
    ask again."""
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    data = json.loads(body)
    ops = data.get("operations") if isinstance(data, dict) else None
    if not isinstance(ops, list) or not 1 <= len(ops) <= max_ops:
        raise ValueError(f"expected 'operations': a list of 1..{max_ops}")
    out = []
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("instruction"), str) or not op["instruction"].strip():
            raise ValueError("each operation needs a non-empty 'instruction'")
        item = {"instruction": op["instruction"].strip()}
        if isinstance(op.get("instruction_cn"), str) and op["instruction_cn"].strip():
            item["instruction_cn"] = op["instruction_cn"].strip()
        out.append(item)
    return out


class SplitTasksStage(Stage):
    kind = "split_tasks"
    scores_items = False

    def _client(self):
        from ...llm import ChatClient, ChatEndpoint

        cfg = self.cfg
        cache = cfg.cache_dir or str(Path(self.ctx.output) / ".work" / "llm-cache")
        try:
            endpoint = ChatEndpoint(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                                    max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                                    call_budget=cfg.call_budget, cache_dir=cache, timeout_s=cfg.timeout_s)
        except ValueError as exc:
            raise DataToolError(f"stage '{self.name}': {exc}") from None
        return ChatClient(endpoint, seed=0)

    def decide(self, rows, items, scores, start=0) -> StageResult:
        from ...llm import ChatError

        cfg = self.cfg
        todo = [i for i, r in enumerate(rows) if MULTI_HINT.search(_text(r)) or not cfg.only_hinted]
        system = {"role": "system", "content": PROMPT.format(max_ops=cfg.max_ops)}
        client = self._client()
        results = client.map([[system, {"role": "user", "content": _text(rows[i])}] for i in todo],
                             validate=lambda t: parse_operations(t, cfg.max_ops))
        got = dict(zip(todo, results))
        out, decisions = [], []
        for i, row in enumerate(rows):
            res = got.get(i)
            if res is None:
                out.append(row)
                decisions.append(decision(row, KEEP, "one operation (no conjunction)"))
            elif isinstance(res, ChatError):
                out.append(row)
                decisions.append(decision(row, KEEP, f"not split: {res}"))
            elif len(res.value) == 1:
                out.append(row)
                decisions.append(decision(row, KEEP, "one operation", operations=1, cached=res.cached))
            else:
                out.append({**row, "record": {**row["record"], "operations": res.value}})
                decisions.append(decision(row, FIX, f"split into {len(res.value)} operations",
                                          operations=len(res.value), cached=res.cached))
        return StageResult(rows=out, decisions=decisions)


def _text(row: dict) -> str:
    rec = row["record"]
    return "\n".join(t for t in (rec.get("instruction"), rec.get("instruction_cn")) if t)
