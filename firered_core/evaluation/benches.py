"""Benches as data: where a bench's fields are, how its judge is asked, how its scores are combined.

A :class:`BenchSpec` is plain data (a built-in by name, or a JSON file of the same shape), so a user's own JSONL is
one field mapping away. Built in:

- ``redbench`` — REDEdit-Bench as published (``redbench.jsonl`` + ``prompts.json`` from FireRed's repository): one
  judge prompt per task with ``<edit_prompt>``; the judge sees the source, "这是原图A", the edit, "这是编辑后的图B。
  请进行评估。", then the prompt, and answers three ``<Criterion>: <1-5>`` lines, whose names are read from the
  prompt's "Example Response Format". Sample = mean of its criteria; task = mean of its samples; overall = mean of
  the task means.
- ``gedit`` — GEdit-style (VIEScore-like): semantic consistency (SC) and perceptual quality (PQ), each 0-10, one
  call per sample with both images; sample O = sqrt(SC x PQ); task = mean O; overall = mean of the task means.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import FireRedError

PLACEHOLDER = "<edit_prompt>"
LANGS = ("cn", "en")
SAMPLE_RULES = ("mean", "sqrt_product")
PART_KINDS = ("source", "output", "prompt")  # plus "text:<literal>"

REDEDIT_TASKS = ("add", "adjust", "background", "beauty", "color", "compose", "extract", "lowlevel", "motion",
                 "portrait", "remove", "replace", "stylize", "text", "viewpoint")

GEDIT_PROMPT = """You are a professional digital artist rating an AI image edit. Image A is the original, image B is \
the result of editing A with the instruction below.

Semantic Consistency: how well B carries out the instruction while keeping everything the instruction does not \
mention as it was in A. 0 = the instruction was not followed at all or B is unrelated to A; 10 = the instruction is \
followed exactly and nothing else changed.
Perceptual Quality: how natural and artefact-free B looks on its own (distortions, blur, bad anatomy, unnatural \
lighting, visible seams). 0 = broken image; 10 = indistinguishable from a real photograph or a professional artwork.

Answer in exactly this format:
Brief reasoning: one sentence, no more than 25 words.
Semantic Consistency: A number from 0 to 10.
Perceptual Quality: A number from 0 to 10.

editing instruction is : <edit_prompt>."""


class BenchError(FireRedError):
    """A bench definition, JSONL row or prompt file that cannot be used (names the file, line or key)."""


@dataclass(frozen=True)
class Criterion:
    name: str
    low: int
    high: int


@dataclass(frozen=True)
class BenchSpec:
    """One bench. ``fields`` maps our names (id, source, task, instruction_cn, instruction_en) to JSONL keys;
    ``prompts`` is one judge template per task (``"*"`` = every task) or None to read ``prompts_file`` from the bench
    root; ``criteria`` None = read them from each prompt; ``judge_parts`` is the order of the judge's message."""

    name: str
    fields: dict = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None
    prompts: dict | None = None
    prompts_file: str | None = None
    criteria: tuple[Criterion, ...] | None = None
    judge_parts: tuple[str, ...] = ("source", "output", "prompt")
    sample_rule: str = "mean"
    scale: tuple[int, int] = (1, 5)
    temperature: float = 0.1
    default_lang: str = "cn"

    def __post_init__(self) -> None:
        missing = {"id", "source", "task"} - set(self.fields)
        if missing or not any(k.startswith("instruction_") for k in self.fields):
            raise BenchError(f"bench {self.name!r}: fields must map id, source, task and instruction_cn and/or "
                             f"instruction_en to JSONL keys (missing: {sorted(missing) or ['instruction_*']})")
        if self.sample_rule not in SAMPLE_RULES:
            raise BenchError(f"bench {self.name!r}: sample_rule {self.sample_rule!r} is not one of {SAMPLE_RULES}")
        if self.prompts is None and not self.prompts_file:
            raise BenchError(f"bench {self.name!r}: give prompts (per task) or prompts_file")
        for part in self.judge_parts:
            if part not in PART_KINDS and not part.startswith("text:"):
                raise BenchError(f"bench {self.name!r}: judge part {part!r} is not one of {PART_KINDS} or 'text:...'")
        if self.default_lang not in LANGS:
            raise BenchError(f"bench {self.name!r}: default_lang {self.default_lang!r} is not one of {LANGS}")

    def instruction_key(self, lang: str) -> str:
        key = self.fields.get(f"instruction_{lang}")
        if key is None:
            have = [k.split("_", 1)[1] for k in self.fields if k.startswith("instruction_")]
            raise BenchError(f"bench {self.name!r} has no {lang!r} instructions (it has {have})")
        return key

    def with_fields(self, mapping: dict[str, str]) -> "BenchSpec":
        """This bench read from a JSONL whose keys differ: ``{"id": "uid", "instruction_en": "prompt"}``."""
        unknown = set(mapping) - {"id", "source", "task", "instruction_cn", "instruction_en"}
        if unknown:
            raise BenchError(f"unknown field name(s) {sorted(unknown)}; use id, source, task, instruction_cn, "
                             "instruction_en")
        return replace(self, fields={**self.fields, **mapping})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["criteria"] = None if self.criteria is None else [vars(c) for c in self.criteria]
        return json.loads(json.dumps(out))


REDEDIT = BenchSpec(
    name="redbench",
    fields={"id": "id", "source": "source", "task": "task", "instruction_cn": "a_to_b_instructions",
            "instruction_en": "a_to_b_instructions_eng"},
    tasks=REDEDIT_TASKS, prompts=None, prompts_file="prompts.json",
    judge_parts=("source", "text:这是原图A", "output", "text:这是编辑后的图B。请进行评估。", "prompt"),
    sample_rule="mean", scale=(1, 5), temperature=0.1, default_lang="cn")

GEDIT = BenchSpec(
    name="gedit",
    fields={"id": "key", "source": "input_image", "task": "task_type", "instruction_en": "instruction",
            "instruction_cn": "instruction_cn"},
    tasks=None, prompts={"*": GEDIT_PROMPT},
    criteria=(Criterion("Semantic Consistency", 0, 10), Criterion("Perceptual Quality", 0, 10)),
    judge_parts=("text:Image A (original):", "source", "text:Image B (edited):", "output", "prompt"),
    sample_rule="sqrt_product", scale=(0, 10), temperature=0.0, default_lang="en")

BUILTIN = {b.name: b for b in (REDEDIT, GEDIT)}


def load_spec(name_or_path: str) -> BenchSpec:
    """A built-in bench by name, or a JSON file with :class:`BenchSpec`'s keys."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise BenchError(f"bench {name_or_path!r} is neither a built-in ({sorted(BUILTIN)}) nor a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: not valid JSON ({exc})") from None
    known = {f.name for f in fields(BenchSpec)}
    if not isinstance(data, dict) or set(data) - known:
        raise BenchError(f"{path}: unknown key(s) {sorted(set(data) - known) if isinstance(data, dict) else data!r};"
                         f" known: {sorted(known)}")
    if data.get("criteria") is not None:
        data["criteria"] = tuple(Criterion(**c) for c in data["criteria"])
    for key in ("tasks", "judge_parts", "scale"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    data.setdefault("name", path.stem)
    return BenchSpec(**data)


@dataclass(frozen=True)
class BenchRow:
    """One edit: ``source`` resolved against the bench root; ``instruction`` in the chosen language."""

    id: str
    task: str
    source: Path
    instruction: str
    line: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.task}-{self.id}"


def output_path(out: str | Path, row: BenchRow) -> Path:
    """``<out>/<task>/<task>-<id>.png``: the layout FireRed's official evaluator reads."""
    return Path(out) / f"{row.key}.png"


_SAFE = re.compile(r"^[\w.\-]+$")


def read_rows(spec: BenchSpec, jsonl: str | Path, root: str | Path | None = None, lang: str | None = None,
              tasks: list[str] | None = None, limit: int | None = None) -> list[BenchRow]:
    """The bench's rows in file order, filtered to ``tasks`` and the first ``limit`` of each task.

    Every problem (bad JSON, a missing key, an unknown task, a duplicate id, an unsafe id) is an error naming the
    file and line: a bench silently shorter than it should be would change its averages.
    """
    if limit is not None and limit < 1:
        raise BenchError(f"--limit {limit} must be at least 1 (rows per task)")
    jsonl = Path(jsonl)
    root = Path(root) if root is not None else jsonl.parent
    lang = lang or spec.default_lang
    ikey = spec.instruction_key(lang)
    if tasks and spec.tasks is not None:
        unknown = sorted(set(tasks) - set(spec.tasks))
        if unknown:
            raise BenchError(f"--tasks {unknown} not in bench {spec.name!r} (tasks: {', '.join(spec.tasks)})")
    if not jsonl.is_file():
        raise BenchError(f"bench file {jsonl} does not exist")
    rows, seen, per_task = [], {}, {}
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BenchError(f"{where}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise BenchError(f"{where}: expected a JSON object")
        values = {}
        for ours, theirs in (("id", spec.fields["id"]), ("source", spec.fields["source"]),
                             ("task", spec.fields["task"]), ("instruction", ikey)):
            value = obj.get(theirs)
            if value is None or str(value).strip() == "":
                raise BenchError(f"{where}: missing {theirs!r} (the {ours} field of bench {spec.name!r}; "
                                 f"keys present: {sorted(obj)})")
            values[ours] = str(value)
        task, uid = values["task"], values["id"]
        if spec.tasks is not None and task not in spec.tasks:
            raise BenchError(f"{where}: task {task!r} is not one of bench {spec.name!r}'s tasks")
        if not _SAFE.match(uid) or not _SAFE.match(task):
            raise BenchError(f"{where}: id {uid!r} / task {task!r} must be letters, digits, '.', '_' or '-' "
                             "(they name output files)")
        if (task, uid) in seen:
            raise BenchError(f"{where}: duplicate id {uid!r} in task {task!r} (first at line {seen[task, uid]})")
        seen[task, uid] = n
        if tasks and task not in tasks:
            continue
        if limit is not None and per_task.get(task, 0) >= limit:
            continue
        per_task[task] = per_task.get(task, 0) + 1
        rows.append(BenchRow(uid, task, root / values["source"], values["instruction"], n))
    if not rows:
        raise BenchError(f"{jsonl}: no rows selected (tasks={tasks}, limit={limit})")
    return rows


def load_prompts(spec: BenchSpec, root: str | Path | None, prompts_file: str | Path | None = None) -> dict:
    """Judge templates per task: the spec's own, else ``prompts_file`` (default: the spec's, in the bench root)."""
    if spec.prompts is not None and prompts_file is None:
        return dict(spec.prompts)
    path = Path(prompts_file) if prompts_file else Path(root or ".") / spec.prompts_file
    if not path.is_file():
        raise BenchError(f"judge prompts {path} not found (bench {spec.name!r} reads one prompt per task from "
                         f"{spec.prompts_file!r}; pass --prompts FILE)")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise BenchError(f"{path}: expected an object of task -> prompt text")
    bad = [t for t, p in prompts.items() if PLACEHOLDER not in p]
    if bad:
        raise BenchError(f"{path}: prompt(s) for {bad} lack the placeholder {PLACEHOLDER}")
    return prompts


def prompt_for(prompts: dict, task: str, where: str = "prompts") -> str:
    template = prompts.get(task, prompts.get("*"))
    if template is None:
        raise BenchError(f"{where}: no judge prompt for task {task!r} (have: {sorted(prompts)})")
    return template
