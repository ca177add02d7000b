"""The coverage report: which keys of each LoRA matched, which did not (and why), which modules changed."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraCoverage:
    """What one LoRA matched: the keys used, the keys not used (each with why), the modules it changes."""

    name: str
    strength: float
    matched: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # assumptions made (e.g. an unknown alpha), shown in the report

    def line(self) -> str:
        total = len(self.matched) + len(self.unmatched)
        return (f"LoRA {self.name} (strength {self.strength:g}, {'/'.join(self.styles) or '?'} keys): "
                f"{len(self.matched)}/{total} keys matched, {len(self.modules)} modules touched"
                + (f", {len(self.unmatched)} UNMATCHED" if self.unmatched else "")
                + "".join(f"; {note}" for note in self.notes))


@dataclass
class LoraReport:
    """Coverage of every LoRA applied in one call."""

    mode: str
    loras: list[LoraCoverage]

    @property
    def matched(self) -> list[str]:
        return [k for c in self.loras for k in c.matched]

    @property
    def unmatched(self) -> dict[str, str]:
        return {f"{c.name}: {k}": why for c in self.loras for k, why in c.unmatched.items()}

    @property
    def modules(self) -> list[str]:
        return sorted({m for c in self.loras for m in c.modules})

    def summary(self) -> str:
        lines = [c.line() for c in self.loras]
        for c in self.loras:
            lines += [f"  unmatched {k}: {why}" for k, why in list(c.unmatched.items())[:20]]
        return "\n".join(lines)
