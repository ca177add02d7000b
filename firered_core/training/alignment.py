"""Random instruction alignment and instruction variants.

Alignment (FireRed report): with some probability drop reference images or shuffle their order, and re-index the
"Picture N" / "Image N" / "图N" mentions in the instruction so the text still names the right image. Only images the
instruction does not mention may be dropped (dropping a named image would make the pair wrong), and at least one
image is kept. A variant picks which text a row trains on: English, Chinese, empty (text drop) or the inverse edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from pydantic import with_config

from ..limits import CONFIG, Probability

CN_NUMERALS = "一二三四五六七八九"
_MENTION = re.compile(r"(?P<en>\b(?:[Pp]icture|[Ii]mage|[Ii]mg)\s*)(?P<en_n>\d+)"
                      r"|(?P<cn>图片?\s*)(?P<cn_n>\d+|[" + CN_NUMERALS + "])")
VARIANTS = ("en", "cn", "empty", "inverse", "inverse_cn")


def _number(match: re.Match) -> int:
    raw = match.group("en_n") or match.group("cn_n")
    return int(raw) if raw.isdigit() else CN_NUMERALS.index(raw) + 1


def mentions(text: str) -> set[int]:
    """1-based image numbers the text refers to."""
    return {_number(m) for m in _MENTION.finditer(text or "")}


def reindex(text: str, mapping: dict[int, int]) -> str:
    """Rewrite every mention of image ``old`` as ``mapping[old]`` (1-based); others stay as they are."""
    def sub(m: re.Match) -> str:
        old = _number(m)
        if old not in mapping:
            return m.group(0)
        new = mapping[old]
        if m.group("en") is not None:
            return f"{m.group('en')}{new}"
        digit = m.group("cn_n").isdigit() or new > len(CN_NUMERALS)
        return f"{m.group('cn')}{new if digit else CN_NUMERALS[new - 1]}"
    return _MENTION.sub(sub, text or "")


@with_config(CONFIG)
@dataclass
class AlignmentConfig:
    drop_rate: Probability = 0.0
    permute_rate: Probability = 0.0


def align(num_images: int, texts: list[str], rng: np.random.Generator, config: AlignmentConfig
          ) -> tuple[list[int], list[str]]:
    """Returns (old 0-based image indices in their new order, re-indexed texts)."""
    order = list(range(num_images))
    if num_images < 2:
        return order, list(texts)
    named = set().union(*(mentions(t) for t in texts))
    if config.drop_rate > 0 and rng.random() < config.drop_rate:
        droppable = [i for i in order if i + 1 not in named]
        if len(droppable) == num_images:
            droppable = droppable[1:]
        if droppable:
            drop = droppable[int(rng.integers(len(droppable)))]
            order.remove(drop)
    if config.permute_rate > 0 and len(order) > 1 and rng.random() < config.permute_rate:
        order = [order[j] for j in rng.permutation(len(order))]
    mapping = {old + 1: new + 1 for new, old in enumerate(order)}
    if order == list(range(num_images)):
        return order, list(texts)
    return order, [reindex(t, mapping) for t in texts]


@with_config(CONFIG)
@dataclass
class VariantConfig:
    text_drop: Probability = 0.05
    cn_rate: Probability = 0.5
    inverse_rate: Probability = 0.0


def choose_variant(has_inverse: bool, rng: np.random.Generator, config: VariantConfig) -> str:
    """Which instruction text a row uses this step."""
    r = rng.random()
    if r < config.text_drop:
        return "empty"
    cn = rng.random() < config.cn_rate
    if has_inverse and rng.random() < config.inverse_rate:
        return "inverse_cn" if cn else "inverse"
    return "cn" if cn else "en"


def needed_variants(config: VariantConfig, any_inverse: bool) -> set[str]:
    """Every variant :func:`choose_variant` can draw with these rates (rows with an inverse: ``any_inverse``)."""
    need = {"empty"} if config.text_drop > 0 else set()
    if config.text_drop < 1:
        langs = ({""} if config.cn_rate < 1 else set()) | ({"cn"} if config.cn_rate > 0 else set())
        need |= {"en" if not lang else lang for lang in langs}
        if any_inverse and config.inverse_rate > 0:
            need |= {"inverse" + ("_" + lang if lang else "") for lang in langs}
    return need


def variant_text(sample, variant: str) -> str:
    return {"en": sample.instruction, "cn": sample.instruction_cn, "empty": "",
            "inverse": sample.inverse_instruction, "inverse_cn": sample.inverse_instruction_cn}[variant] or ""
