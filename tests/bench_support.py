"""A mini REDEdit-format bench for the evaluation tests: synthetic images, JSONL, judge prompts, canned replies.

The prompts follow the published format (criteria lines, "Example Response Format", ``<edit_prompt>``) but are
written here; nothing is copied from FireRed's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import random_image
from fake_openai import Reply

ROWS = [  # (task, id, English instruction)
    ("add", "1", "add a red ball"), ("add", "2", "add a blue hat"), ("add", "3", "add a tree"),
    ("remove", "1", "remove the cat"), ("remove", "2", "remove the dog"),
    ("text", "1", "write HELLO"), ("text", "2", "write BYE"),
]
CRITERIA = {"add": ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence"),
            "remove": ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"),
            "text": ("Text Instruction Compliance", "Text Visual Quality", "Overall Edit Quality")}

# canned judge replies, in the many ways judges write them
REPLIES = {
    "add a red ball": "**Brief reasoning:** looks fine.\n**Prompt Compliance:** 5\nVisual Naturalness: 4/5\n"
                      "Physical & Detail Coherence：3",                                   # 4.0
    "add a blue hat": "Brief reasoning: hat ok\nPrompt Compliance: 4\nVisual Naturalness: 4\n"
                      "Physical & Detail Coherence: 2\nHope this helps!",                 # 10/3
    "add a tree": "I cannot rate this image.",                                            # never parseable
    "remove the cat": "Brief reasoning: meh\nPrompt Compliance: 2\nVisual Naturalness: 2\n"
                      "Physical & Detail Integrity: 2",                                   # 2.0
    "remove the dog": "Prompt Compliance: 3\nVisual Naturalness: 3\nPhysical & Detail Integrity: 3",  # 3.0
    "write HELLO": "Brief reasoning: wrong text\n- Text Instruction Compliance: 2\n- Text Visual Quality: 1\n"
                   "- Overall Edit Quality: 1",                                           # 4/3
    "write BYE": "Text Instruction Compliance: 5 out of 5\nText Visual Quality: ５\nOverall Edit Quality: 4",  # 14/3
}


def prompt_text(task: str) -> str:
    names = CRITERIA[task]
    scales = "\n".join(f"{n}\n1  bad.\n5  perfect." for n in names)
    fmt = "\n".join(f"{n}: A number from 1 to 5." for n in names)
    return (f"You rate {task} edits on three criteria.\n\n{scales}\n\nExample Response Format:\n"
            f"Brief reasoning: A short explanation, no more than 20 words.\n{fmt}\n"
            "editing instruction is : <edit_prompt>.\n\nBelow are the images before and after editing:\n")


def make_bench(root: Path, size=(32, 32)) -> Path:
    """``root/redbench.jsonl``, ``root/prompts.json`` and ``root/redbench/<task>/<task>-<id>.png``."""
    lines = []
    for n, (task, uid, text) in enumerate(ROWS):
        src = Path("redbench") / task / f"{task}-{uid}.png"
        (root / src).parent.mkdir(parents=True, exist_ok=True)
        random_image(*size, seed=n).save(root / src)
        lines.append(json.dumps({"id": uid, "source": src.as_posix(), "a_to_b_instructions": f"中文 {text}",
                                 "a_to_b_instructions_eng": text, "task": task}, ensure_ascii=False))
    (root / "redbench.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "prompts.json").write_text(json.dumps({t: prompt_text(t) for t in CRITERIA}, ensure_ascii=False),
                                       encoding="utf-8")
    return root / "redbench.jsonl"


def instruction_of(body: dict) -> str:
    prompt = body["messages"][0]["content"][-1]["text"]
    return re.search(r"editing instruction is : (.*?)\.(?:\n|$)", prompt).group(1)


class Judge:
    """Responder: canned replies by instruction; the first call for an instruction in ``first`` gets that reply."""

    def __init__(self, replies: dict, first: dict | None = None):
        self.replies, self.first, self.seen = dict(replies), dict(first or {}), set()

    def __call__(self, body: dict) -> Reply:
        if "editing instruction is" not in body["messages"][0]["content"][-1]["text"]:
            return Reply.text("OK")  # ``run``'s preflight
        text = instruction_of(body)
        if text in self.first and text not in self.seen:
            self.seen.add(text)
            return self.first[text]
        return Reply.text(self.replies[text])
