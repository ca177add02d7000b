"""Judge replies -> scores, and scores -> sample, task and overall means.

Parsing is tolerant of how judges actually write (markdown bold, "4/5", "4 out of 5", full-width colons and digits,
bullets, extra prose) and strict about what matters: every criterion the prompt names appears once with a number in
range, and no other criterion does. Anything else raises ``ValueError``, which the chat client retries and finally
reports as a failure.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from .benches import BenchError, BenchSpec, Criterion

_FORMAT_LINE = re.compile(r"^\s*([^:\n]+?)\s*:\s*a number from (\d+) to (\d+)", re.IGNORECASE | re.MULTILINE)
_SCORE_LINE = re.compile(r"^(?P<name>[A-Za-z][\w &'/()\-]*?)\s*(?::|=|-)\s*(?P<value>\d+(?:\.\d+)?)"
                         r"\s*(?:(?:/|out of)\s*(?P<den>\d+))?\s*(?:points?)?\s*[.;,]?\s*$", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`#>]+")
_BULLET = re.compile(r"^\s*(?:[-+•]|\d+[.)])\s+")
REASONING = "brief reasoning"


def criteria_from_prompt(prompt: str) -> tuple[Criterion, ...]:
    """The criteria a REDEdit-style prompt asks for: its ``<Name>: A number from <lo> to <hi>.`` lines."""
    found = [Criterion(m.group(1).strip(" *"), int(m.group(2)), int(m.group(3)))
             for m in _FORMAT_LINE.finditer(prompt)]
    found = [c for c in found if c.name.lower() != REASONING]
    if not found:
        raise BenchError("the judge prompt names no criteria (expected lines like 'Prompt Compliance: A number "
                         "from 1 to 5.'; or give the bench's criteria)")
    return tuple(found)


def criteria_for(spec: BenchSpec, prompt: str) -> tuple[Criterion, ...]:
    return spec.criteria if spec.criteria is not None else criteria_from_prompt(prompt)


def _norm_name(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def _clean(line: str) -> str:
    line = unicodedata.normalize("NFKC", line)
    line = _BULLET.sub("", _MARKUP.sub("", line))
    return line.strip()


@dataclass
class Judgement:
    scores: dict[str, float]
    reasoning: str


def parse_reply(text: str, criteria: tuple[Criterion, ...]) -> Judgement:
    """Scores for exactly ``criteria`` from a judge's reply; ``ValueError`` (with the reason) if that fails."""
    wanted = {_norm_name(c.name): c for c in criteria}
    scores: dict[str, float] = {}
    reasoning, prose = "", []
    for raw in text.splitlines():
        line = _clean(raw)
        if not line:
            continue
        head, _, rest = line.partition(":")
        if _norm_name(head) == REASONING:
            reasoning = rest.strip()
            continue
        m = _SCORE_LINE.match(line)
        if m is None:
            prose.append(line)
            continue
        name = _norm_name(m.group("name"))
        crit = wanted.get(name)
        if crit is None:
            raise ValueError(f"unexpected criterion {m.group('name')!r} (expected {[c.name for c in criteria]})")
        value = float(m.group("value"))
        den = m.group("den")
        if den is not None and int(den) != crit.high:
            raise ValueError(f"{crit.name}: score given out of {den}, expected out of {crit.high}")
        if not crit.low <= value <= crit.high:
            raise ValueError(f"{crit.name}: {value:g} is outside {crit.low}-{crit.high}")
        if crit.name in scores and scores[crit.name] != value:
            raise ValueError(f"{crit.name}: two different scores ({scores[crit.name]:g} and {value:g})")
        scores[crit.name] = value
    missing = [c.name for c in criteria if c.name not in scores]
    if missing:
        raise ValueError(f"no score for {missing}")
    return Judgement(scores, reasoning or " ".join(prose)[:500])


def sample_score(spec: BenchSpec, scores: dict[str, float]) -> float:
    """REDEdit: the mean of the criteria. GEdit-style: sqrt(SC x PQ) (the geometric mean of the criteria)."""
    values = list(scores.values())
    if spec.sample_rule == "sqrt_product":
        return math.prod(values) ** (1.0 / len(values))
    return sum(values) / len(values)
