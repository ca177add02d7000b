"""Where the shipped post-training recipes were shown to work, and a warning when a run leaves that range.

``benchmarks/posttrain_effect.py`` trains each shipped config (``training/configs/dpo_lora.yaml``,
``nft_lora.yaml``, ``identity_sft.yaml``) scaled down in size and steps, with the learning rate scaled so that
``lr x steps`` stays the shipped product (Adam moves a weight about ``lr`` per step, so this is how far the run moves
the weights), and measures its effect on held-out rows over seeds and model builds (docs/post-training.md). Settings
outside what it ran were not measured: a run with them still trains, with a warning naming each one.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BUDGET_SPAN = 2.0  # lr x steps within [budget / 2, budget * 2] counts as the proven range

# per objective: the proven lr x steps and the settings the proof ran (the shipped configs' values)
PROVEN: dict[str, dict] = {
    "preference": {"budget": 1.0e-5 * 2000, "keys": {"beta": 2500.0, "omega": 1.5, "sft_weight": 0.0}},
    "nft": {"budget": 3.0e-5 * 4000, "keys": {"group_size": 8, "rollout_steps": 10, "beta": 1.0, "adv_clip": 5.0,
                                              "inner_steps": 4, "kl_weight": 0.1, "old_decay": 0.5}},
    "identity": {"budget": 1.0e-4 * 10000, "keys": {"eta": 1.0, "cutoff": 0.9, "normalise": True}},
}


def outside_proven(cfg) -> list[str]:
    """One line per setting of ``cfg``'s post-training objective that the proof did not run (empty: inside)."""
    section = next((name for name in ("preference", "nft", "identity") if getattr(cfg, name).enabled), None)
    if section is None:
        return []
    proven, sub = PROVEN[section], getattr(cfg, section)
    out = []
    budget = cfg.lr * cfg.steps
    if not proven["budget"] / BUDGET_SPAN <= budget <= proven["budget"] * BUDGET_SPAN:
        out.append(f"lr x steps = {budget:.3g} (lr {cfg.lr:g}, {cfg.steps} steps) is outside the proven "
                   f"{proven['budget']:.3g} (x/{BUDGET_SPAN:g}): scale lr to about {proven['budget'] / cfg.steps:.3g}")
    for key, value in proven["keys"].items():
        if getattr(sub, key) != value:
            out.append(f"{section}.{key} = {getattr(sub, key)!r} differs from the proven {value!r}")
    return out


def warn_outside_proven(cfg) -> list[str]:
    """Log a warning for each setting outside the proven range (docs/post-training.md has the measurements)."""
    lines = outside_proven(cfg)
    for line in lines:
        log.warning("post-training recipe outside the range where its effect was measured: %s", line)
    return lines
