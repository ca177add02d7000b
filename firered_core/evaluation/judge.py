"""Ask an OpenAI-compatible judge about every edited image of a run; record scores and failures per sample.

The request is the bench's ``judge_parts`` in order (source image, output image, literal texts, the task's prompt
with ``<edit_prompt>`` filled in) as one user message. Replies are parsed by :func:`scoring.parse_reply`: an
unparseable reply is retried by the client, then becomes a failure. A sample without an output image is a failure
too. Nothing is dropped: every selected row comes back, with ``score`` or ``error``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..images import load_image
from ..llm import ChatClient, ChatError, image_part, text_part
from .benches import PLACEHOLDER, BenchRow, BenchSpec, output_path, prompt_for
from .scoring import criteria_for, parse_reply, sample_score

# what FireRed's evaluator (rededit_bench redbench_eval.py) asks its judge for
FIREREDTEAM_REQUEST = {"temperature": 0.1, "max_tokens": 8192, "extra": {"top_p": 0.95}}


def request_params(spec: BenchSpec, aggregation: str = "mean") -> dict:
    """The judge request's sampling fields: the bench's temperature, or FireRed's own with ``fireredteam``."""
    if aggregation == "fireredteam":
        return {**FIREREDTEAM_REQUEST, "extra": dict(FIREREDTEAM_REQUEST["extra"])}
    return {"temperature": spec.temperature}


def judge_messages(spec: BenchSpec, row: BenchRow, output: Path, prompt: str) -> list[dict]:
    return judge_request(spec, [load_image(row.source)], load_image(output), prompt, row.instruction)


def judge_request(spec: BenchSpec, sources: list, output, prompt: str, instruction: str) -> list[dict]:
    """The judge's one user message: ``spec.judge_parts`` in order, the template's placeholder filled with the
    instruction (also what the RL judge reward, :mod:`firered_core.rewards.judge`, sends for in-memory images)."""
    parts = []
    for part in spec.judge_parts:
        if part == "source":
            parts.extend(image_part(src) for src in sources)
        elif part == "output":
            parts.append(image_part(output))
        elif part == "prompt":
            parts.append(text_part(prompt.replace(PLACEHOLDER, instruction)))
        else:
            parts.append(text_part(part[len("text:"):]))
    return [{"role": "user", "content": parts}]


def judge_rows(spec: BenchSpec, rows: list[BenchRow], out: str | Path, prompts: dict, client: ChatClient,
               on_done: Callable[[int, object], None] | None = None, request: dict | None = None) -> list[dict]:
    """One record per row, in row order: ids, ``scores`` per criterion, ``score``, ``reasoning``, ``reply``,
    ``cached``, ``attempts``; or ``error`` (no output image, unparseable after retries, HTTP failure, budget).
    ``request``: the sampling fields (:func:`request_params`). A refused key raises :class:`~..llm.AuthError`."""
    request = request if request is not None else request_params(spec)
    records, todo, jobs = [], [], []
    for row in rows:
        output = output_path(out, row)
        record = {"id": row.id, "task": row.task, "key": row.key, "score": None, "error": None}
        records.append(record)
        if not output.is_file():
            record["error"] = f"no output image {output}"
            continue
        prompt = prompt_for(prompts, row.task)
        criteria = criteria_for(spec, prompt)
        todo.append((record, criteria))
        jobs.append(lambda row=row, output=output, prompt=prompt: judge_messages(spec, row, output, prompt))

    # one map per distinct criteria set (each with its validator), run side by side: the client's own semaphore
    # keeps the requests in flight at ``endpoint.concurrency`` overall
    groups: dict[tuple, list[int]] = {}
    for i, (_, criteria) in enumerate(todo):
        groups.setdefault(criteria, []).append(i)

    def run_group(criteria, idx):
        results = client.map([jobs[i] for i in idx], validate=lambda text: parse_reply(text, criteria),
                             on_done=on_done, **request)
        for i, result in zip(idx, results):
            record = todo[i][0]
            if isinstance(result, ChatError):
                record["error"] = str(result)
                continue
            judgement = result.value
            record.update(scores=judgement.scores, score=sample_score(spec, judgement.scores),
                          reasoning=judgement.reasoning, reply=result.text, cached=result.cached,
                          attempts=result.attempts)

    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        for future in [pool.submit(run_group, c, idx) for c, idx in groups.items()]:
            future.result()
    return records
