"""Synthetic pairs: mask-based remove / add pairs, task inversion, hard negatives by instruction perturbation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..extras import DataToolError, require
from ..files import write_bytes
from ..imageops import load_rgb, resize_to
from ..rows import make_row
from .base import ADD, KEEP, Stage, StageResult, decision, keep_all, seeded_rng

REMOVE = ("Remove the {label} from Picture 1", "移除图1中的{label_cn}")
ADD_TEXT = ("Add a {label} to Picture 1", "在图1中添加{label_cn}")


def _png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class MaskPairsStage(Stage):
    """(image, mask, label) -> a remove pair and an add pair. ``paste``: the masked object is pasted onto another
    record's image (the removal target is a real photo); ``inpaint``: the object is inpainted away (OpenCV)."""

    kind = "mask_pairs"

    def check(self) -> None:
        if self.cfg.mode == "inpaint":
            require("cv2", f"stage '{self.name}' (mode: inpaint)")

    def side_items(self) -> list[dict]:
        """The mask records (held in memory: the paste cycle pairs each record with another)."""
        path = Path(self.cfg.masks)
        if not path.is_file():
            raise DataToolError(f"stage '{self.name}': masks file {path} not found")
        records = []
        for line_no, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                item = {"id": f"{self.name}/{path.stem}:{line_no}", "image": str((path.parent / rec["image"]).resolve()),
                        "mask": str((path.parent / rec["mask"]).resolve()), "label": str(rec["label"]),
                        "label_cn": str(rec.get("label_cn") or "")}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataToolError(f"{path}:{line_no}: needs image, mask and label ({exc})") from None
            records.append(item)
        if self.cfg.mode == "paste":
            order = [int(i) for i in seeded_rng(self.cfg.seed, "paste").permutation(len(records))]
            for j, i in enumerate(order):  # each object onto the next record's picture, in a seeded cycle
                records[i]["background"] = records[order[(j + 1) % len(order)]]["image"]
        return records

    def score(self, item: dict) -> dict:
        img = load_rgb(item["image"])
        mask = np.asarray(Image.open(item["mask"]).convert("L").resize((img.shape[1], img.shape[0]), Image.NEAREST))
        m = (mask > 127).astype(np.float32)[..., None]
        share = float(m.mean())
        if not 0.002 <= share <= 0.7:
            return {"error": f"mask covers {share:.1%} of the image (0.2%..70% accepted)"}
        if self.cfg.mode == "paste":
            if item["background"] == item["image"]:
                return {"error": "paste mode needs at least two records"}
            bg = resize_to(load_rgb(item["background"]), (img.shape[1], img.shape[0]))
            with_obj = (bg * (1 - m) + img * m).round().astype(np.uint8)
            without = np.ascontiguousarray(bg)
        else:
            cv2 = require("cv2", "mask_pairs mode inpaint")
            hole = cv2.dilate((m[..., 0] * 255).astype(np.uint8), np.ones((5, 5), np.uint8))
            without, with_obj = cv2.inpaint(np.ascontiguousarray(img), hole, 5, cv2.INPAINT_TELEA), img
        folder = self.ctx.out / "synth" / self.name
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item["id"].split("/", 1)[1])
        paths = {"with": folder / f"{stem}_with.png", "without": folder / f"{stem}_without.png"}
        write_bytes(paths["with"], _png(with_obj))
        write_bytes(paths["without"], _png(without))
        return {"with": str(paths["with"]), "without": str(paths["without"]), "mask_share": share}

    def decide(self, rows, items, scores, start=0) -> StageResult:
        out, decisions = list(rows), keep_all(rows)
        for item, s in zip(items, scores):
            if "error" in s:
                decisions.append(decision({"uid": item["id"]}, "drop", s["error"]))
                continue
            lab = {"label": item["label"], "label_cn": item["label_cn"] or item["label"]}
            rem = {"instruction": REMOVE[0].format(**lab), "instruction_cn": REMOVE[1].format(**lab)}
            add = {"instruction": ADD_TEXT[0].format(**lab), "instruction_cn": ADD_TEXT[1].format(**lab)}
            pairs = [(self.cfg.remove_task, "remove", s["with"], s["without"], rem, add),
                     (self.cfg.add_task, "add", s["without"], s["with"], add, rem)]
            for task, what, src, tgt, text, inverse in pairs:
                record = {**text, "inverse_instruction": inverse["instruction"],
                          "inverse_instruction_cn": inverse["instruction_cn"], "synthetic": f"mask_{what}"}
                row = make_row(f"{item['id']}/{what}", task, [src], tgt, record)
                out.append(row)
                decisions.append(decision(row, ADD, f"{what} pair from {Path(item['image']).name} "
                                                     f"({self.cfg.mode})", mask_share=s["mask_share"]))
        return StageResult(rows=out, decisions=decisions)


class InvertStage(Stage):
    """Rows with one source and an inverse instruction also give the inverse pair (target -> source)."""

    kind = "invert"
    scores_items = False

    def decide(self, rows, items, scores, start=0) -> StageResult:
        out, decisions = list(rows), keep_all(rows)
        for row in rows:
            rec = row["record"]
            inv, inv_cn = rec.get("inverse_instruction"), rec.get("inverse_instruction_cn")
            if len(row["sources"]) != 1 or not (inv or inv_cn):
                continue
            if self.cfg.tasks is not None and row["task"] not in self.cfg.tasks:
                continue
            record = {**rec, "instruction": inv or inv_cn, "instruction_cn": inv_cn or inv,
                      "inverse_instruction": rec.get("instruction") or rec.get("instruction_cn"),
                      "inverse_instruction_cn": rec.get("instruction_cn") or rec.get("instruction"),
                      "inverted_from": row["uid"]}
            new = {**make_row(f"{row['uid']}~inv", self.cfg.task or row["task"], [row["target"]],
                              row["sources"][0], record), "cluster": row.get("cluster", row["uid"])}
            out.append(new)
            decisions.append(decision(new, ADD, f"inverse of {row['uid']}"))
        return StageResult(rows=out, decisions=decisions)


# word classes for perturbation: english -> chinese
VOCAB = {
    "colour": {"red": "红", "blue": "蓝", "green": "绿", "yellow": "黄", "purple": "紫", "orange": "橙",
               "black": "黑", "white": "白", "pink": "粉", "brown": "棕", "grey": "灰"},
    "object": {"cat": "猫", "dog": "狗", "car": "汽车", "tree": "树", "hat": "帽子", "bird": "鸟", "chair": "椅子",
               "cup": "杯子", "flower": "花", "circle": "圆", "square": "方块", "triangle": "三角形"},
    "count": {"one": "一", "two": "两", "three": "三", "four": "四", "five": "五"},
}


def perturb(text: str, text_cn: str, rng: np.random.Generator) -> tuple[str, str | None, str] | None:
    """Swap one vocabulary word (colour / object / count) of ``text`` for another of its class; the Chinese
    instruction gets the same swap when it holds the matching word (else None). None when no word is found."""
    found = []
    for cls, words in VOCAB.items():
        for w in words:
            for m in re.finditer(rf"\b{w}\b", text, flags=re.IGNORECASE):
                found.append((m.start(), m.end(), cls, w))
    if not found:
        return None
    start, end, cls, word = found[int(rng.integers(len(found)))]
    choices = sorted(w for w in VOCAB[cls] if w != word)
    new = choices[int(rng.integers(len(choices)))]
    orig = text[start:end]
    new_cased = new.capitalize() if orig[:1].isupper() else new
    out = text[:start] + new_cased + text[end:]
    cn_old, cn_new = VOCAB[cls][word], VOCAB[cls][new]
    out_cn = text_cn.replace(cn_old, cn_new, 1) if text_cn and cn_old in text_cn else None
    return out, out_cn, f"{cls}: {word} -> {new}"


class NegativesStage(Stage):
    """Rows stay as they are; each also yields hard-negative rows (written to ``negatives/``, never to ``data/``)."""

    kind = "hard_negatives"
    scores_items = False

    def decide(self, rows, items, scores, start=0) -> StageResult:
        negatives, decisions = [], []
        for row in rows:
            rec = row["record"]
            rng = seeded_rng(self.cfg.seed, row["uid"])
            made = []
            for _ in range(self.cfg.per_row * 3):
                if len(made) >= self.cfg.per_row:
                    break
                got = perturb(rec.get("instruction") or "", rec.get("instruction_cn") or "", rng)
                if got is None:
                    break
                if got[0] in [m[0] for m in made]:
                    continue
                made.append(got)
            for k, (text, text_cn, what) in enumerate(made):
                record = {key: v for key, v in rec.items() if not key.startswith("inverse_")}
                record.update(instruction=text, negative=True, perturbation=what,
                              positive_instruction=rec.get("instruction"))
                if text_cn:
                    record["instruction_cn"] = text_cn
                else:
                    record.pop("instruction_cn", None)
                negatives.append(make_row(f"{row['uid']}~neg{k}", row["task"], row["sources"], row["target"], record))
            decisions.append(decision(row, KEEP, "; ".join(m[2] for m in made) or "no colour / object / count word",
                                      negatives=len(made)))
        return StageResult(rows=list(rows), decisions=decisions, extra={"negatives": negatives})
