"""DBCache-style block cache with optional first-order TaylorSeer extrapolation.

Each step runs the first ``first`` blocks, then compares their residual (output - input of the image stream) with the
one of the last fully computed step. When the relative L1 change is below ``threshold`` (after ``warmup`` steps and
for at most ``max_consecutive`` steps in a row) the middle blocks are skipped: their residual of the last computed
step (or, with TaylorSeer, its linear extrapolation from the last two computed steps) is added instead. The last
``last`` blocks always run, so the output head sees fresh features. Every CFG branch keeps its own state, because the
conditional and unconditional trajectories differ; a sampler calls one branch once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError

from .transformer_forward import BlockCall


@dataclass
class BlockCacheConfig:
    """``threshold`` 0 disables skipping (every block runs)."""

    threshold: float = 0.08
    first: int = 1
    last: int = 1
    warmup: int = 2
    max_consecutive: int = 3
    taylorseer: bool = False

    def __post_init__(self) -> None:
        if self.first < 1 or self.last < 0 or self.warmup < 0 or self.max_consecutive < 0 or self.threshold < 0:
            raise InputError(f"invalid block cache settings: {self}")


@dataclass
class _Branch:
    step: int = 0
    consecutive: int = 0
    probe: torch.Tensor | None = None
    residuals: list = field(default_factory=list)  # [(step, hidden residual, encoder residual)], newest last
    computed: int = 0
    total: int = 0
    cached_steps: int = 0
    diffs: list = field(default_factory=list)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().float().mean() / b.abs().float().mean().clamp_min(1e-12))


class BlockCache:
    """Per-branch cache state; use :meth:`loop` as the ``block_loop`` of ``run_transformer``."""

    def __init__(self, config: BlockCacheConfig):
        self.config = config
        self.branches: dict[str, _Branch] = {}

    def loop(self, branch: str):
        state = self.branches.setdefault(branch, _Branch())

        def run(blocks: torch.nn.ModuleList, hidden: torch.Tensor, encoder: torch.Tensor, call: BlockCall):
            return self._step(state, blocks, hidden, encoder, call)
        return run

    def _step(self, state: _Branch, blocks, hidden, encoder, call: BlockCall):
        cfg, n = self.config, len(blocks)
        first, last = min(cfg.first, n), min(cfg.last, max(n - cfg.first, 0))
        start = hidden
        for block in blocks[:first]:
            encoder, hidden = call(block, hidden, encoder)
        probe = hidden - start
        if state.residuals and state.residuals[-1][1].shape != hidden.shape:
            state.residuals.clear()
            state.probe = None
        diff = relative_l1(probe, state.probe) if state.probe is not None and cfg.threshold > 0 else None
        if diff is not None:
            state.diffs.append(round(diff, 4))
        use_cache = (diff is not None and first + last < n and state.step >= cfg.warmup
                     and state.consecutive < cfg.max_consecutive and diff < cfg.threshold)
        if use_cache:
            dh, de = self._residual(state)
            hidden, encoder = hidden + dh, encoder + de
            state.consecutive += 1
            state.cached_steps += 1
            state.computed += first + last
        else:
            mid_h, mid_e = hidden, encoder
            for block in blocks[first:n - last]:
                encoder, hidden = call(block, hidden, encoder)
            state.residuals = (state.residuals + [(state.step, hidden - mid_h, encoder - mid_e)])[-2:]
            state.probe = probe
            state.consecutive = 0
            state.computed += n
        for block in blocks[n - last:]:
            encoder, hidden = call(block, hidden, encoder)
        state.total += n
        state.step += 1
        return encoder, hidden

    def _residual(self, state: _Branch) -> tuple[torch.Tensor, torch.Tensor]:
        """The last computed residual, or its first-order Taylor extrapolation to this step."""
        step, dh, de = state.residuals[-1]
        if not self.config.taylorseer or len(state.residuals) < 2:
            return dh, de
        prev_step, ph, pe = state.residuals[0]
        k = (state.step - step) / (step - prev_step)
        return dh + k * (dh - ph), de + k * (de - pe)

    def report(self) -> dict:
        """Blocks computed / total and cached steps, per branch and overall; ``diffs`` are the probe's relative
        changes seen at each step (what ``threshold`` is compared with)."""
        per = {name: {"computed": s.computed, "total": s.total, "cached_steps": s.cached_steps, "steps": s.step,
                      "diffs": s.diffs}
               for name, s in self.branches.items()}
        computed = sum(v["computed"] for v in per.values())
        total = sum(v["total"] for v in per.values())
        return {"computed": computed, "total": total, "fraction": computed / total if total else 1.0,
                "branches": per}
