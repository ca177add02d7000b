"""Per-stage HTML reports: a histogram per score with its cut-offs drawn (inline SVG), and thumbnail grids of the
dropped rows and of the kept rows nearest a cut-off (borderline). One self-contained file per stage."""

from __future__ import annotations

import base64
import heapq
import html
import io
import json
import math
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .files import write_text
from .imageops import load_rgb

STYLE = ("body{font-family:sans-serif;margin:20px;color:#222}h1{font-size:20px}h2{font-size:16px;margin-top:24px}"
         ".grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:220px;font-size:11px;border:1px solid #ddd;padding:4px}"
         ".cell img{display:block}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}")


def histogram_svg(values, cutoffs: dict | None, title: str, bins: int = 30) -> str:
    """An inline SVG histogram with the low / high cut-offs as red dashed lines."""
    w, h, pad = 380, 140, 28
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    cuts = [(k, c) for k, c in (cutoffs or {}).items() if c is not None and math.isfinite(c)]
    if not len(vals):
        return f"<p>{html.escape(title)}: no values</p>"
    lo = min([vals.min()] + [c for _, c in cuts])
    hi = max([vals.max()] + [c for _, c in cuts])
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)

    def x(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (w - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
             f'<text x="{pad}" y="14" font-size="12">{html.escape(title)} (n={len(vals)})</text>']
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        bh = (h - 2 * pad) * c / top
        parts.append(f'<rect x="{x(a):.1f}" y="{h - pad - bh:.1f}" width="{max(x(b) - x(a) - 1, 1):.1f}" '
                     f'height="{bh:.1f}" fill="#5b8def"/>')
    parts.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>')
    parts.append(f'<text x="{pad}" y="{h - 8}" font-size="10">{lo:.3g}</text>'
                 f'<text x="{w - pad}" y="{h - 8}" font-size="10" text-anchor="end">{hi:.3g}</text>')
    for name, c in cuts:
        parts.append(f'<line class="cutoff" x1="{x(c):.1f}" y1="{pad - 6}" x2="{x(c):.1f}" y2="{h - pad}" '
                     f'stroke="#d22" stroke-dasharray="4 3" stroke-width="2"/>'
                     f'<text x="{x(c) + 3:.1f}" y="{pad + 4}" font-size="10" fill="#d22">{name} {c:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _thumb(path: str, size: int, boxes: list | None = None) -> str:
    """A JPEG thumbnail as an <img>; ``boxes`` ([x0, y0, x1, y1] as fractions) drawn in red where a local artefact
    was found."""
    try:
        img = Image.fromarray(load_rgb(path))
    except Exception:  # noqa: BLE001 - a report never fails on one unreadable picture
        return ""
    img.thumbnail((size, size))
    if boxes:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle((x0 * img.width, y0 * img.height, x1 * img.width - 1, y1 * img.height - 1),
                           outline=(255, 0, 0), width=2)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'


def _cell(d: dict, row: dict, size: int) -> str:
    boxes = d["scores"].get("boxes") or []
    names = ["source 1"][:len(row["sources"][:1])] + ["target"]
    pics = "".join(_thumb(p, size, [b[1:5] for b in boxes if b[0] == n]) for n, p in
                   zip(names, [*row["sources"][:1], row["target"]]) if p)
    scores = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d["scores"].items()
                       if isinstance(v, (int, float)))
    return (f'<div class="cell"><div style="display:flex;gap:2px">{pics}</div><b>{html.escape(d["row"])}</b><br>'
            f'{html.escape(d["verdict"])}: {html.escape(d["reason"])}<br><span style="color:#666">'
            f'{html.escape(scores)}</span></div>')


def _margin(d: dict, cutoffs: dict, spread: dict) -> float:
    """Distance of a kept row's scores to the nearest cut-off, in units of each score's spread."""
    best = math.inf
    for k, cut in cutoffs.items():
        v = d["scores"].get(k)
        if not isinstance(v, (int, float)):
            continue
        for c in (cut.get("low"), cut.get("high")):
            if c is not None:
                best = min(best, abs(v - c) / spread.get(k, 1.0))
    return best


def _decisions(path: Path, pics: Path) -> Iterator[tuple[dict, dict]]:
    """A stage's decisions with, for each, the pictures of its row (``{"sources": [...], "target"}``)."""
    with open(path, encoding="utf-8") as fd, open(pics, encoding="utf-8") as fp:
        for d, row in zip(fd, fp):
            yield json.loads(d), json.loads(row)


def write_stage_report(path: Path, name: str, kind: str, decisions: Path, pics: Path, cutoffs: dict,
                       values: dict[str, np.ndarray], cfg, problems: list[str] | None = None) -> None:
    """The stage's report from its decisions file, read twice (counts, dropped rows and per-row values; then the
    borderline rows, which need every value's spread): the decisions are never all in memory."""
    values = dict(values)
    extra: dict[str, array] = {}  # scores the stage did not give a full distribution for: the per-row values
    counts = {v: 0 for v in ("keep", "drop", "fix", "add")}
    dropped = []
    for d, row in _decisions(decisions, pics):
        counts[d["verdict"]] = counts.get(d["verdict"], 0) + 1
        if d["verdict"] == "drop" and len(dropped) < cfg.thumbnails:
            dropped.append((d, row))
        for k, v in d["scores"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in values:
                extra.setdefault(k, array("d")).append(v)
    values.update({k: np.frombuffer(v, dtype=np.float64) for k, v in extra.items()})
    spread = {k: (float(np.std(v)) or 1.0) for k, v in values.items() if len(v)}
    kept = ((d, row) for d, row in _decisions(decisions, pics) if d["verdict"] == "keep")
    border = heapq.nsmallest(cfg.thumbnails // 2, ((d, row) for d, row in kept
                                                   if math.isfinite(_margin(d, cutoffs, spread))),
                             key=lambda x: _margin(x[0], cutoffs, spread))
    hists = "".join(histogram_svg(v, cutoffs.get(k), k) for k, v in sorted(values.items()))
    body = [f"<h1>Stage {html.escape(name)} ({html.escape(kind)})</h1>",
            "<p>" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ' · <a href="index.html">all stages</a></p>',
            *(f'<p class="problem" style="color:#c00"><b>error:</b> {html.escape(p)}</p>' for p in problems or []),
            "<h2>Scores and cut-offs</h2>", f'<div class="grid">{hists or "<p>no numeric scores</p>"}</div>',
            f"<h2>Dropped ({counts['drop']}, first {len(dropped)} shown)</h2>",
            '<div class="grid">' + "".join(_cell(d, row, cfg.thumb_size) for d, row in dropped) + "</div>",
            f"<h2>Borderline kept rows ({len(border)})</h2>",
            '<div class="grid">' + "".join(_cell(d, row, cfg.thumb_size) for d, row in border) + "</div>"]
    write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
                     f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_index(path: Path, summary: list[dict], per_task: dict[str, int]) -> None:
    rows = "".join(
        f"<tr><td>{html.escape(s['stage'])}</td><td>{s.get('kind', '')}</td><td>{s['in']}</td><td>{s.get('keep', 0)}"
        f"</td><td>{s.get('drop', 0)}</td><td>{s.get('fix', 0)}</td><td>{s.get('add', 0)}</td><td>"
        + (f'<a href="{s["report"]}">report</a>' if s.get("report") else "") + "</td></tr>" for s in summary)
    tasks = "".join(f"<tr><td>{html.escape(t)}</td><td>{n}</td></tr>" for t, n in per_task.items())
    write_text(path, "<!doctype html><html><head><meta charset='utf-8'><title>data pipeline</title>"
                     f"<style>{STYLE}</style></head><body><h1>Data pipeline</h1><table><tr><th>stage</th><th>kind"
                     "</th><th>in</th><th>keep</th><th>drop</th><th>fix</th><th>add</th><th></th></tr>"
                     f"{rows}</table><h2>Output rows per task</h2><table>{tasks}</table></body></html>")
