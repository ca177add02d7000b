"""``scores.json`` and a static HTML report (readable from disk, no server), and the comparison of two runs.

The report: the overall score and what it stands on, the run's settings, a per-task table (judge means with their
sample counts and failures, criterion means, offline metrics), the failures per task, and one row per sample:
source | output | scores | judge's reasoning, with lazily loaded thumbnails (``report_files/``, made once).
``compare``: per-task deltas of two runs side by side and the samples whose score changed most.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from PIL import Image

from .generate import diff, write_json_atomic

SCORES = "scores.json"
REPORT = "report.html"
THUMBS = "report_files"
THUMB_SIDE = 256
FORMAT = "firered-bench-scores/1"

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{margin:0 0 4px}h2{margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.big{font-size:28px;font-weight:600}
.muted{color:#777}.bad{color:#b00020}.good{color:#1b7f2a}.grid td{vertical-align:top}
.grid img{width:160px;height:auto;display:block;image-rendering:auto}code{background:#f6f6f6;padding:1px 4px}
details{margin:4px 0}.reason{max-width:420px;text-align:left;white-space:pre-wrap}"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _delta(value) -> str:
    if value is None:
        return "–"
    cls = "good" if value > 0 else "bad" if value < 0 else "muted"
    return f'<span class="{cls}">{value:+.3f}</span>'


def build_scores(*, run: str, out: str | Path, spec, rows, manifest: dict | None, judge: dict | None,
                 judge_records: list[dict] | None, metric_records: list[dict] | None) -> dict:
    """Everything the report shows, as one JSON-able dict (written as ``scores.json``)."""
    from .aggregate import aggregate_judge, aggregate_metrics
    from .benches import output_path

    by_key_j = {r["key"]: r for r in judge_records or []}
    by_key_m = {r["key"]: r for r in metric_records or []}
    samples = []
    for row in rows:
        j, m = by_key_j.get(row.key, {}), by_key_m.get(row.key)
        if m is not None:
            m = {k: v for k, v in m.items() if k not in ("id", "task", "key")}
        samples.append({"id": row.id, "task": row.task, "key": row.key, "instruction": row.instruction,
                        "source": str(row.source), "output": str(output_path(out, row)),
                        "score": j.get("score"), "scores": j.get("scores"), "reasoning": j.get("reasoning"),
                        "error": j.get("error"), "metrics": m})
    judged = aggregate_judge(spec, judge_records, (judge or {}).get("failure_policy", "exclude"),
                             (judge or {}).get("aggregation", "mean")) if judge_records is not None else None
    from .agreement import judge_vs_metrics

    metrics = aggregate_metrics(spec, metric_records) if metric_records is not None else None
    agreement = judge_vs_metrics(samples, list(metrics["tasks"])) if metrics and judged else None
    return {"format": FORMAT, "run": run, "bench": {"name": spec.name, "sample_rule": spec.sample_rule,
                                                    "scale": list(spec.scale)},
            "settings": manifest, "judge": judge,
            "overall": judged["overall"] if judged else None, "tasks": judged["tasks"] if judged else None,
            "metrics": metrics, "agreement": agreement, "samples": samples}


def write_scores(out: str | Path, scores: dict) -> Path:
    path = Path(out) / SCORES
    write_json_atomic(path, scores)
    return path


def load_scores(run: str | Path) -> dict:
    path = Path(run)
    path = path if path.suffix == ".json" else path / SCORES
    if not path.is_file():
        from ..errors import FireRedError

        raise FireRedError(f"{path} not found: run `firered-bench report --out RUN` first")
    scores = json.loads(path.read_text(encoding="utf-8"))
    scores["_dir"] = str(path.parent)
    return scores


def _thumb(image: str | Path, dest: Path) -> bool:
    src = Path(image)
    if not src.is_file():
        return False
    if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
        return True
    try:
        with Image.open(src) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIDE, THUMB_SIDE))
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.save(dest, format="JPEG", quality=85)
    except OSError:
        return False
    return True


def make_thumbs(run_dir: str | Path, samples: list[dict]) -> None:
    from tqdm import tqdm

    root = Path(run_dir) / THUMBS
    for s in tqdm(samples, desc="thumbnails", unit="row", disable=None, leave=False):
        name = s["key"].replace("/", "__") + ".jpg"
        s["_thumb_src"] = str(root / "src" / name) if _thumb(s["source"], root / "src" / name) else None
        s["_thumb_out"] = str(root / "out" / name) if _thumb(s["output"], root / "out" / name) else None


def _img(path: str | None, base: Path, link: str | None = None) -> str:
    if path is None:
        return '<span class="bad">missing</span>'
    rel = html.escape(Path(os.path.relpath(path, base)).as_posix())
    href = html.escape(Path(os.path.relpath(link, base)).as_posix()) if link else rel
    return f'<a href="{href}"><img loading="lazy" src="{rel}" alt=""></a>'


def _settings_html(scores: dict) -> str:
    items = []
    manifest = scores.get("settings") or {}
    ident = manifest.get("identity", {})
    edit, changed = ident.get("edit", {}), manifest.get("speed_changed", {})
    sources = manifest.get("sources", {})
    if sources:
        items.append(f"model <code>{html.escape(str(sources.get('model')))}</code>")
    if edit:
        items.append(", ".join(f"{k} {_fmt(edit.get(k))}" for k in ("steps", "true_cfg", "seed", "match_input")))
    if changed:
        items.append("speed " + ", ".join(f"{k}={_fmt(v)}" for k, v in changed.items()))
    loras = ident.get("model", {}).get("loras") or []
    for lora in loras:
        items.append(f"LoRA {html.escape(lora['file'])} x{lora['strength']}")
    judge = scores.get("judge")
    if judge:
        items.append(f"judge <code>{html.escape(judge['model'])}</code> ({judge['calls']} calls, "
                     f"{judge['cache_hits']} cached; failures: {html.escape(judge.get('failure_policy', 'exclude'))})")
    return "<p class='muted'>" + " · ".join(items) + "</p>" if items else ""


def _task_table(scores: dict) -> str:
    tasks = scores.get("tasks") or {}
    metrics = (scores.get("metrics") or {}).get("tasks", {})
    names = list(tasks) or list(metrics)
    head = ["<th class=l>task</th>"]
    if tasks:
        head += ["<th>rows</th><th>judged</th><th>failures</th><th>mean</th><th class=l>criteria means</th>"]
    if metrics:
        head += ["<th>shift px (mean / max)</th><th>&gt;1 px</th><th>size ≠</th><th>PSNR unedited</th>"
                 "<th>SSIM unedited</th>"]
    faces = any(m.get("face_n") for m in metrics.values())
    texts = any(m.get("text_n") for m in metrics.values())
    if faces:
        head.append("<th>face identity</th>")
    if texts:
        head.append("<th>text accuracy</th><th>text placement / size</th>")
    body = []

    def cells(task: str, t: dict | None, m: dict | None) -> str:
        out = [f"<td class=l>{html.escape(task)}</td>"]
        if tasks:
            fails = t["failures"] if t else 0
            n = f" <span class=muted>n={t['n']}</span>" if t and "n" in t else ""  # what the mean stands on
            out += [f"<td>{t['rows'] if t else '–'}</td><td>{t['judged'] if t else '–'}</td>",
                    f"<td class='{'bad' if fails else ''}'>{fails}</td><td><b>{_fmt(t['mean'] if t else None)}</b>"
                    f"{n}</td>"]
            crit = "<br>".join(f"{html.escape(c)} {_fmt(v, 2)}" for c, v in ((t or {}).get("criteria") or {}).items())
            out.append(f"<td class='l muted'>{crit}</td>")
        if metrics:
            out += [f"<td>{_fmt(m['shift_px_mean'], 2)} / {_fmt(m['shift_px_max'], 2)}</td>"
                    f"<td>{m['shifted_over_1px']}</td><td>{m['size_mismatches']}</td>"
                    f"<td>{_fmt(m['psnr_unedited'], 2)}</td><td>{_fmt(m['ssim_unedited'], 3)}</td>"
                    if m else "<td colspan=5>–</td>"]
        m = m or {}
        if faces:
            out.append(f"<td>{_fmt(m.get('face_identity'), 3)}{_n(m.get('face_n'))}</td>")
        if texts:
            out.append(f"<td>{_fmt(m.get('text_accuracy'), 3)}{_n(m.get('text_n'))}</td>"
                       f"<td>{_fmt(m.get('text_placement'), 2)} / {_fmt(m.get('text_size'), 2)}</td>")
        return "<tr>" + "".join(out) + "</tr>"

    for name in names:
        body.append(cells(name, tasks.get(name), metrics.get(name)))
    overall = scores.get("overall")
    if overall or metrics:
        o = dict(overall or {})
        if overall:
            o.update(rows=overall["rows"], judged=overall["judged"], criteria={})
        body.append(cells("overall", o if overall else None, (scores.get("metrics") or {}).get("overall"))
                    .replace("<td class=l>overall</td>", "<td class=l><b>overall</b></td>"))
    return f"<table><tr>{''.join(head)}</tr>{''.join(body)}</table>"


def _n(n) -> str:
    return f" <span class=muted>n={n}</span>" if n else ""


AGREEMENT_NAMES = {"face_identity": "face identity", "text_accuracy": "text accuracy",
                   "ssim_unedited": "SSIM unedited"}


def _agreement_html(scores: dict) -> str:
    """Spearman's rho between the judge's sample scores and each objective metric, per task and over all."""
    agreement = scores.get("agreement")
    if not agreement or not agreement["all"]:
        return ""
    metrics = [m for m in AGREEMENT_NAMES if m in agreement["all"]]
    head = "".join(f"<th>{AGREEMENT_NAMES[m]}</th>" for m in metrics)

    def row(name: str, block: dict) -> str:
        cells = []
        for m in metrics:
            r = block.get(m)
            rho = None if r is None else r["rho"]
            cls = "" if rho is None else "bad" if rho < 0.2 else "good" if rho >= 0.5 else ""
            cells.append(f"<td class='{cls}'>{_fmt(rho, 2)}{_n(r and r['n'])}</td>")
        return f"<tr><td class=l>{name}</td>{''.join(cells)}</tr>"

    body = "".join(row(html.escape(t), b) for t, b in agreement["tasks"].items())
    body += row("<b>all samples</b>", agreement["all"])
    return ("<h2>Judge vs metrics</h2><p class=muted>Spearman rank correlation between the judge's sample scores "
            "and each metric (n = samples with both); low or negative: the judge and the metric disagree on which "
            f"edits are better.</p><table><tr><th class=l>task</th>{head}</tr>{body}</table>")


def _failures_html(scores: dict) -> str:
    tasks = scores.get("tasks") or {}
    parts = []
    for name, t in tasks.items():
        if t["failed"]:
            items = "".join(f"<li><code>{html.escape(f['key'])}</code>: {html.escape(str(f['error']))[:300]}</li>"
                            for f in t["failed"])
            parts.append(f"<details><summary>{html.escape(name)}: {len(t['failed'])} failed</summary>"
                         f"<ul>{items}</ul></details>")
    return "<h2>Failures</h2>" + "".join(parts) if parts else ""


def _sample_rows(samples: list[dict], base: Path) -> str:
    rows = []
    for s in samples:
        crit = "<br>".join(f"{html.escape(k)}: {v:g}" for k, v in (s.get("scores") or {}).items())
        m = s.get("metrics") or {}
        met = (f"<br><span class=muted>shift {m['shift_px']:.2f} px · PSNR {_fmt(m.get('psnr_unedited'), 1)}"
               f"</span>" if m.get("shift_px") is not None else "")
        if m.get("face_identity") is not None:
            met += f"<br><span class=muted>face identity {m['face_identity']:.3f} ({m.get('face_box')})</span>"
        if m.get("text_accuracy") is not None:
            met += (f"<br><span class=muted>text {m['text_accuracy']:.2f} · placement {m['text_placement']:.2f} · "
                    f"size {m['text_size']:.2f}; read: {html.escape(m.get('text_read') or '')}</span>")
        score = (f"<b>{s['score']:.3f}</b><br>{crit}" if s.get("score") is not None
                 else "<span class=bad>failed</span>" if s.get("error") else "–")
        why = html.escape(s.get("reasoning") or s.get("error") or "")
        rows.append(f"<tr><td class=l><code>{html.escape(s['key'])}</code><br>{html.escape(s['instruction'])}</td>"
                    f"<td>{_img(s.get('_thumb_src'), base, s['source'])}</td>"
                    f"<td>{_img(s.get('_thumb_out'), base, s['output'])}</td>"
                    f"<td class=l>{score}{met}</td><td class=reason>{why}</td></tr>")
    return ("<table class=grid><tr><th class=l>sample</th><th>source</th><th>output</th><th class=l>scores</th>"
            f"<th class=l>judge's reasoning</th></tr>{''.join(rows)}</table>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(run_dir: str | Path, scores: dict) -> Path:
    run_dir = Path(run_dir)
    samples = [dict(s) for s in scores["samples"]]
    make_thumbs(run_dir, samples)
    overall = scores.get("overall")
    if overall and overall["tasks"]:
        how = ("aggregation <b>fireredteam</b>: samples and task means rounded to 2 decimals, as FireRed's evaluator"
               if overall.get("aggregation") == "fireredteam" else "aggregation <b>mean</b>: unrounded")
        headline = (f"<p><span class=big>{_fmt(overall['mean'])}</span> overall "
                    f"(mean of {overall['tasks']} task means; {overall['judged']} of {overall['rows']} samples judged,"
                    f" <span class='{'bad' if overall['failures'] else ''}'>{overall['failures']} failed</span>; "
                    f"{how})</p>")
    elif overall:
        headline = (f"<p><span class='big bad'>no scores</span> (0 of {overall['rows']} samples judged, "
                    f"{overall['failures']} failed)</p>")
    else:
        headline = "<p class=muted>no judge scores (offline metrics only)</p>"
    body = (f"<h1>{html.escape(scores['run'])} · {html.escape(scores['bench']['name'])}</h1>{headline}"
            f"{_settings_html(scores)}<h2>Per task</h2>{_task_table(scores)}{_agreement_html(scores)}"
            f"{_failures_html(scores)}"
            f"<h2>Samples</h2>{_sample_rows(samples, run_dir)}")
    path = run_dir / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    tmp.write_text(_page(f"{scores['run']} report", body), encoding="utf-8")
    os.replace(tmp, path)
    return path


def compare(a: dict, b: dict, top: int = 20) -> dict:
    """Per-task means of runs A and B, their deltas, and the ``top`` samples whose score changed most."""
    tasks = list(dict.fromkeys([*(a.get("tasks") or {}), *(b.get("tasks") or {})]))
    rows = {}
    for t in tasks:
        ta, tb = (a.get("tasks") or {}).get(t), (b.get("tasks") or {}).get(t)
        ma, mb = ta and ta["mean"], tb and tb["mean"]
        rows[t] = {"a": ma, "b": mb, "n_a": ta and ta["n"], "n_b": tb and tb["n"],
                   "delta": None if ma is None or mb is None else mb - ma}
    oa, ob = (a.get("overall") or {}).get("mean"), (b.get("overall") or {}).get("mean")
    by_a = {s["key"]: s for s in a["samples"]}
    changed = []
    for sb in b["samples"]:
        sa = by_a.get(sb["key"])
        if sa and sa.get("score") is not None and sb.get("score") is not None:
            changed.append({"key": sb["key"], "delta": sb["score"] - sa["score"], "a": sa, "b": sb})
    changed.sort(key=lambda c: (-abs(c["delta"]), c["key"]))
    settings = diff((a.get("settings") or {}).get("identity"), (b.get("settings") or {}).get("identity"))
    judges = [(s.get("judge") or {}).get("model") for s in (a, b)]
    if judges[0] != judges[1]:
        settings.append(f"judge: {judges[0]!r} -> {judges[1]!r}")
    ways = [(s.get("overall") or {}).get("aggregation", "mean") for s in (a, b)]
    if ways[0] != ways[1]:  # rounded and unrounded means differ in the third decimal
        settings.append(f"aggregation: {ways[0]!r} -> {ways[1]!r}")
    return {"tasks": rows, "overall": {"a": oa, "b": ob, "delta": None if oa is None or ob is None else ob - oa},
            "changed": changed[:top], "settings": settings}


def write_compare(a: dict, b: dict, path: str | Path, top: int = 20) -> Path:
    path = Path(path)
    base = path.parent
    base.mkdir(parents=True, exist_ok=True)
    for run in (a, b):
        make_thumbs(run["_dir"], run["samples"])
    result = compare(a, b, top)
    na, nb = html.escape(a["run"]), html.escape(b["run"])
    trs = "".join(f"<tr><td class=l>{html.escape(t)}</td><td>{_fmt(r['a'])}</td><td>{_fmt(r['b'])}</td>"
                  f"<td>{_delta(r['delta'])}</td><td>{_fmt(r['n_a'])} / {_fmt(r['n_b'])}</td></tr>"
                  for t, r in result["tasks"].items())
    o = result["overall"]
    trs += (f"<tr><td class=l><b>overall</b></td><td><b>{_fmt(o['a'])}</b></td><td><b>{_fmt(o['b'])}</b></td>"
            f"<td>{_delta(o['delta'])}</td><td></td></tr>")
    table = (f"<table><tr><th class=l>task</th><th>A: {na}</th><th>B: {nb}</th><th>B − A</th><th>n A / B</th></tr>"
             f"{trs}</table>")
    by_a = {s["key"]: s for s in a["samples"]}
    by_b = {s["key"]: s for s in b["samples"]}
    grid = []
    for c in result["changed"]:
        sa, sb = by_a[c["key"]], by_b[c["key"]]
        grid.append(f"<tr><td class=l><code>{html.escape(c['key'])}</code><br>{html.escape(sb['instruction'])}"
                    f"<br>{_delta(c['delta'])}</td><td>{_img(sa.get('_thumb_src'), base, sa['source'])}</td>"
                    f"<td>{_img(sa.get('_thumb_out'), base, sa['output'])}<br>{_fmt(sa['score'])}</td>"
                    f"<td>{_img(sb.get('_thumb_out'), base, sb['output'])}<br>{_fmt(sb['score'])}</td>"
                    f"<td class=reason>A: {html.escape(sa.get('reasoning') or '')}\nB: "
                    f"{html.escape(sb.get('reasoning') or '')}</td></tr>")
    diffs = "".join(f"<li><code>{html.escape(d)}</code></li>" for d in result["settings"][:30])
    diffs = f"<p>What differs (A -> B):</p><ul>{diffs}</ul>" if diffs else "<p class=muted>same settings</p>"
    body = (f"<h1>{na} vs {nb}</h1>{diffs}<h2>Per task</h2>{table}<h2>Samples that changed most</h2>"
            f"<table class=grid><tr><th class=l>sample</th><th>source</th><th>A</th><th>B</th>"
            f"<th class=l>reasoning</th></tr>{''.join(grid)}</table>")
    path.write_text(_page(f"{a['run']} vs {b['run']}", body), encoding="utf-8")
    return path
