"""firered-bench: bench rows, score parsing, judge means and failures, cache, offline metrics, resumable and
sharded generation on the tiny model, and the whole generate -> judge -> report path with a fake judge."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from bench_support import CRITERIA, REPLIES, ROWS, Judge, instruction_of, make_bench, prompt_text
from conftest import random_image
from fake_openai import FakeOpenAI, Reply
from kills import killed_after_calls
from firered_core.evaluation import benches as B
from firered_core.evaluation import generate as generate_module
from firered_core.evaluation.aggregate import aggregate_judge
from firered_core.evaluation.cli import main as bench_main
from firered_core.evaluation.generate import (EditSettings, RunMismatch, generate, ranks_from_env,
                                              write_manifest)
from firered_core.evaluation.judge import judge_rows
from firered_core.evaluation.metrics import phase_shift, sample_metrics
from firered_core.evaluation.report import compare, load_scores
from firered_core.evaluation.scoring import Criterion, criteria_from_prompt, parse_reply
from firered_core.llm import ChatClient, ChatEndpoint

FAST_JUDGE = ["--backoff", "0.001", "--max-backoff", "0.002", "--retries", "2", "--timeout", "10"]


@pytest.fixture
def bench(tmp_path):
    return make_bench(tmp_path / "bench")


# ---- bench definitions and rows --------------------------------------------------------------------------------

def test_rows_selection_and_errors_name_file_and_line(bench, tmp_path):
    spec = B.load_spec("redbench")
    rows = B.read_rows(spec, bench, lang="en")
    assert [r.key for r in rows] == [f"{t}/{t}-{i}" for t, i, _ in ROWS]
    assert rows[0].instruction == "add a red ball" and rows[0].source == bench.parent / "redbench/add/add-1.png"
    assert B.read_rows(spec, bench)[0].instruction == "中文 add a red ball"  # cn by default, as published
    assert [r.key for r in B.read_rows(spec, bench, tasks=["add", "text"], limit=1)] == ["add/add-1", "text/text-1"]
    assert B.output_path("o", rows[3]).as_posix() == "o/remove/remove-1.png"
    with pytest.raises(B.BenchError, match="not in bench"):
        B.read_rows(spec, bench, tasks=["teleport"])
    bad = tmp_path / "bad.jsonl"
    good = bench.read_text(encoding="utf-8").splitlines()
    for line, pattern in [('{"id": "9", "source": "x.png", "task": "add"}', r"bad.jsonl:3: missing 'a_to_b_instr"),
                          (good[0], r"bad.jsonl:3: duplicate id '1' in task 'add' \(first at line 1\)"),
                          ("{oops", r"bad.jsonl:3: not JSON"),
                          (good[0].replace('"add"}', '"zoom"}'), r"bad.jsonl:3: task 'zoom'")]:
        bad.write_text("\n".join([good[0], good[1], line]), encoding="utf-8")
        with pytest.raises(B.BenchError, match=pattern):
            B.read_rows(spec, bad)


def test_own_jsonl_with_a_field_mapping_and_bench_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"uid": "x1", "img": "a.png", "kind": "style", "prompt": "make it blue"}\n')
    spec = B.load_spec("gedit").with_fields({"id": "uid", "source": "img", "task": "kind", "instruction_en": "prompt"})
    (row,) = B.read_rows(spec, mine)
    assert (row.key, row.instruction, row.source) == ("style/style-x1", "make it blue", tmp_path / "a.png")
    spec_file = tmp_path / "bench.json"
    spec_file.write_text(json.dumps({"fields": spec.fields, "prompts": {"*": "rate <edit_prompt>\nQ: A number "
                                                                              "from 0 to 9."}}))
    loaded = B.load_spec(str(spec_file))
    assert loaded.name == "bench" and B.read_rows(loaded, mine, lang="en")[0].id == "x1"
    spec_file.write_text(json.dumps({"fields": spec.fields, "prompts": {}, "weights": 1}))
    with pytest.raises(B.BenchError, match=r"unknown key\(s\) \['weights'\]"):
        B.load_spec(str(spec_file))
    with pytest.raises(B.BenchError, match="unknown field name"):
        spec.with_fields({"image": "img"})


# ---- parsing judge replies -------------------------------------------------------------------------------------

def test_criteria_come_from_the_prompt():
    assert criteria_from_prompt(prompt_text("text")) == tuple(Criterion(n, 1, 5) for n in CRITERIA["text"])
    with pytest.raises(ValueError, match="names no criteria"):
        criteria_from_prompt("rate it: <edit_prompt>")


def test_parse_reply_is_tolerant_of_form_and_strict_on_content():
    crit = criteria_from_prompt(prompt_text("add"))
    for text in REPLIES["add a red ball"], "Prompt Compliance = 5\n**Visual Naturalness**: **4**\n" \
                                          "### Physical & Detail Coherence: 3.\nextra words at the end":
        j = parse_reply(text, crit)
        assert j.scores == {"Prompt Compliance": 5, "Visual Naturalness": 4, "Physical & Detail Coherence": 3}
    assert parse_reply(REPLIES["add a red ball"], crit).reasoning == "looks fine."
    fullwidth = "Prompt Compliance：４\nVisual Naturalness：３／５\nPhysical & Detail Coherence：２"
    assert list(parse_reply(fullwidth, crit).scores.values()) == [4, 3, 2]
    ok = "Prompt Compliance: 5\nVisual Naturalness: 4\nPhysical & Detail Coherence: 3"
    for bad, why in [("Prompt Compliance: 5\nVisual Naturalness: 4", "no score for"),
                     (ok + "\nOverall Score: 4", "unexpected criterion 'Overall Score'"),
                     (ok.replace(": 5", ": 7"), "outside 1-5"),
                     (ok.replace(": 5", ": 5/10"), "out of 10"),
                     (ok + "\nPrompt Compliance: 2", "two different scores"),
                     ("I cannot rate this image.", "no score for")]:
        with pytest.raises(ValueError, match=why):
            parse_reply(bad, crit)


# ---- judge: means, failures, cache -----------------------------------------------------------------------------

def _write_outputs(bench, out, skip=()):
    for n, (task, uid, _) in enumerate(ROWS):
        if f"{task}-{uid}" not in skip:
            path = out / task / f"{task}-{uid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            random_image(32, 32, seed=100 + n).save(path)


def test_judge_means_equal_hand_computed_failures_counted_rerun_is_free(bench, tmp_path):
    spec = B.load_spec("redbench")
    rows = B.read_rows(spec, bench, lang="en")
    out = tmp_path / "run"
    _write_outputs(bench, out, skip={"remove-1"})  # a missing output is a failure, not a gap
    prompts = B.load_prompts(spec, bench.parent)
    judge = Judge(REPLIES, first={"write HELLO": Reply.status(429, retry_after="0.01"),
                                  "write BYE": Reply.status(500)})
    cache = tmp_path / "cache"

    def client(fake):
        return ChatClient(ChatEndpoint(base_url=fake.url, model="judge", max_retries=2, backoff_s=0.001,
                                       max_backoff_s=0.002, concurrency=3, cache_dir=cache))

    with FakeOpenAI(judge) as fake:
        records = judge_rows(spec, rows, out, prompts, client(fake))
        # 1 + 1 + 3 (add-3: unparseable, 2 retries) + 1 + 2 (429) + 2 (500); remove-1 has no image: no call
        assert fake.calls == 10
        first = next(b for b in fake.bodies if instruction_of(b) == "add a red ball")["messages"][0]["content"]
        assert [p["type"] for p in first] == ["image_url", "text", "image_url", "text", "text"]
        assert [first[1]["text"], first[3]["text"]] == ["这是原图A", "这是编辑后的图B。请进行评估。"]
        assert "editing instruction is : add a red ball." in first[4]["text"]

        summary = aggregate_judge(spec, records)
        t = summary["tasks"]
        # add: (5+4+3)/3 = 4 and (4+4+2)/3 = 10/3 -> 11/3; add-3 failed.  remove: only remove-2, 3.
        # text: (2+1+1)/3 = 4/3 and (5+5+4)/3 = 14/3 -> 3.  overall: (11/3 + 3 + 3) / 3 = 29/9
        assert t["add"]["mean"] == pytest.approx(11 / 3) and (t["add"]["n"], t["add"]["failures"]) == (2, 1)
        assert t["remove"]["mean"] == pytest.approx(3.0) and (t["remove"]["n"], t["remove"]["failures"]) == (1, 1)
        assert t["text"]["mean"] == pytest.approx(3.0) and (t["text"]["n"], t["text"]["failures"]) == (2, 0)
        assert summary["overall"]["mean"] == pytest.approx(29 / 9)
        assert (summary["overall"]["judged"], summary["overall"]["failures"]) == (5, 2)
        assert [f["key"] for f in t["add"]["failed"]] == ["add/add-3"]
        assert "unparseable reply: no score for" in t["add"]["failed"][0]["error"]
        assert "no output image" in t["remove"]["failed"][0]["error"]
        assert t["text"]["criteria"]["Text Visual Quality"] == pytest.approx(3.0)  # (1 + 5) / 2
        # failures as the scale's minimum: add (4 + 10/3 + 1)/3 = 25/9, remove (3+1)/2 = 2, text 3 -> 70/27
        assert aggregate_judge(spec, records, "min")["overall"]["mean"] == pytest.approx(70 / 27)

        again = judge_rows(spec, rows, out, prompts, client(fake))  # rerun: only the failed one is asked again
        assert fake.calls == 13 and [r["score"] for r in again] == [r["score"] for r in records]
        judge.replies["add a tree"] = "Prompt Compliance: 1\nVisual Naturalness: 1\nPhysical & Detail Coherence: 1"
        judge_rows(spec, rows, out, prompts, client(fake))
        assert fake.calls == 14
        final = judge_rows(spec, rows, out, prompts, client(fake))
        assert fake.calls == 14  # zero calls: everything comes from the cache
        assert all(r["cached"] for r in final if r["score"] is not None)


def test_gedit_style_bench_scores_sqrt_of_sc_times_pq(tmp_path):
    jsonl = tmp_path / "gedit.jsonl"
    rows = [("a1", "background_change", "make it night"), ("a2", "background_change", "add snow"),
            ("b1", "text_change", "write SALE")]
    lines = []
    for n, (key, task, text) in enumerate(rows):
        random_image(32, 32, seed=n).save(tmp_path / f"{key}.png")
        lines.append(json.dumps({"key": key, "task_type": task, "instruction": text, "input_image": f"{key}.png"}))
    jsonl.write_text("\n".join(lines))
    spec = B.load_spec("gedit")
    selected = B.read_rows(spec, jsonl)
    out = tmp_path / "run"
    for row in selected:
        B.output_path(out, row).parent.mkdir(parents=True, exist_ok=True)
        random_image(32, 32, seed=9).save(B.output_path(out, row))
    replies = {"make it night": "Brief reasoning: ok\nSemantic Consistency: 9\nPerceptual Quality: 4",
               "add snow": "**Semantic Consistency:** 2/10\n**Perceptual Quality:** 8/10",
               "write SALE": "Semantic Consistency: 10\nPerceptual Quality: 11"}  # 11 is out of range
    with FakeOpenAI(lambda body: Reply.text(replies[instruction_of(body)])) as fake:
        client = ChatClient(ChatEndpoint(base_url=fake.url, model="j", max_retries=1, backoff_s=0.001,
                                         max_backoff_s=0.002))
        records = judge_rows(spec, selected, out, dict(spec.prompts), client)
    summary = aggregate_judge(spec, records)
    # O = sqrt(SC x PQ): sqrt(36) = 6 and sqrt(16) = 4 -> 5; text_change failed (PQ 11 is outside 0-10)
    assert summary["tasks"]["background_change"]["mean"] == pytest.approx(5.0)
    assert summary["tasks"]["text_change"]["failures"] == 1 and summary["overall"]["mean"] == pytest.approx(5.0)
    assert "outside 0-10" in summary["tasks"]["text_change"]["failed"][0]["error"]
    assert summary["overall"]["tasks_without_score"] == ["text_change"]


# ---- offline metrics -------------------------------------------------------------------------------------------

def test_shift_metric_finds_a_planted_3px_shift_and_zero_for_identical():
    big = random_image(160, 120, seed=5)
    source = big.crop((3, 0, 131, 96))
    shifted = big.crop((0, 0, 128, 96))  # the content moved 3 px right
    dx, dy = phase_shift(source, shifted)
    assert dx == pytest.approx(3.0, abs=0.05) and dy == pytest.approx(0.0, abs=0.05)
    assert phase_shift(source, big.crop((3, 2, 131, 98))) == pytest.approx((0.0, -2.0), abs=0.05)
    m = sample_metrics(source, shifted)
    assert m.shift_px == pytest.approx(3.0, abs=0.05) and m.size_match
    same = sample_metrics(source, source.copy())
    assert (same.shift_px, same.ssim_unedited, same.psnr_unedited) == (0.0, pytest.approx(1.0), 100.0)


def test_unedited_region_quality_with_estimated_and_given_masks():
    source = random_image(96, 96, seed=1)
    edited = source.copy()
    edited.paste((255, 0, 255), (30, 30, 60, 60))  # the edit; everything else untouched
    est = sample_metrics(source, edited)
    assert est.psnr_unedited == 100.0 and est.ssim_unedited > 0.9 and 0.5 < est.unedited_fraction < 0.95
    mask = Image.new("L", (96, 96), 0)
    mask.paste(255, (30, 30, 60, 60))
    given = sample_metrics(source, edited, mask=mask)
    assert given.psnr_unedited == 100.0 and given.mask == "given"
    assert given.unedited_fraction == pytest.approx(1 - 900 / 96 ** 2)
    blind = sample_metrics(source, edited, mask=Image.new("L", (96, 96), 0))  # nothing marked as edited
    assert blind.psnr_unedited < 20
    smaller = sample_metrics(source, edited.resize((80, 80)))
    assert not smaller.size_match and smaller.output_size == (80, 80)


# ---- generation: resume after a kill, shards -------------------------------------------------------------------

def _settings():
    return EditSettings(steps=2, true_cfg=4.0, seed=43, negative_prompt=" ", width=None, height=None,
                        match_input=True, shift=None, vl_area=32 * 32, vae_area=32 * 32, prompt_mode="pipeline")


def _images(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_killed_generation_resumes_to_identical_images_and_shards_union(bench, tmp_path, tiny_model_dir,
                                                                        monkeypatch):
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    spec = B.load_spec("redbench")
    rows = B.read_rows(spec, bench, lang="en", limit=1)  # add-1, remove-1, text-1
    pipe = EditPipeline(load_model(tiny_model_dir))
    whole = tmp_path / "whole"
    assert generate(rows, whole, pipe, _settings(), progress=False)["generated"] == 3

    killed = tmp_path / "killed"
    with killed_after_calls(generate_module, "save_image_atomic", 1):  # the job dies right after its first image
        generate(rows, killed, pipe, _settings(), progress=False)
    assert len(_images(killed)) == 1
    partial = killed / "text" / ".text-1.png.dead.tmp"  # what a kill during a write leaves
    partial.parent.mkdir()
    partial.write_bytes(b"\x89PNG half")
    summary = generate(rows, killed, pipe, _settings(), progress=False)
    assert (summary["generated"], summary["skipped"]) == (2, 1) and not partial.exists()
    assert _images(killed) == _images(whole)

    sharded = tmp_path / "sharded"  # the CLI, as two torchrun processes
    args = ["generate", "--jsonl", str(bench), "--lang", "en", "--tasks", "add,remove,text", "--limit", "1",
            "--out", str(sharded), "--model", str(tiny_model_dir), "--steps", "2", "--match-input-size",
            "--vl-area", "1024", "--vae-area", "1024", "--no-progress"]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert bench_main(args) == 0
        assert len(_images(sharded)) == (2, 3)[rank]  # rank 0: rows 0 and 2; rank 1: row 1
    assert _images(sharded) == _images(whole)
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["identity"]["edit"]["steps"] == 2 and manifest["identity"]["edit"]["seed"] == 43
    assert manifest["identity"]["model"]["transformer"] and manifest["versions"]["torch"]
    assert manifest["selection"]["tasks"] == ["add", "remove", "text"] and manifest["world_size"] == 2

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RunMismatch, match=r"edit.true_cfg: 4.0 -> 2.0"):  # a resume with other settings
        changed = json.loads(json.dumps(manifest))
        changed["identity"]["edit"]["true_cfg"] = 2.0
        write_manifest(sharded, changed)


def test_ranks_from_env():
    assert ranks_from_env({}) == (0, 1, 0)
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4 is not in"):
        ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})


# ---- the whole path on the tiny model: generate -> metrics -> judge -> report, compare, screenshot --------------

def test_mini_bench_end_to_end_report_and_compare(bench, tmp_path, tiny_model_dir, capsys):
    common = ["--jsonl", str(bench), "--lang", "en", "--model", str(tiny_model_dir), "--steps", "2", "--true-cfg", "1",
              "--match-input-size", "--vl-area", "1024", "--vae-area", "1024", "--no-progress",
              "--judge-model", "judge-1", *FAST_JUDGE]
    run_a, run_b = tmp_path / "base", tmp_path / "seed7"
    with FakeOpenAI(Judge(REPLIES)) as fake:
        assert bench_main(["run", "--out", str(run_a), "--judge-url", fake.url, *common]) == 0
        calls = fake.calls
        assert bench_main(["judge", "--out", str(run_a), "--judge-url", fake.url, *FAST_JUDGE,
                           "--judge-model", "judge-1"]) == 0
        assert fake.calls == calls + 3  # only add-3 (never parseable) is asked again: 1 + 2 retries
    a = load_scores(run_a)
    # add: 4 and 10/3 (add-3 failed) -> 11/3; remove: 2 and 3 -> 2.5; text: 4/3 and 14/3 -> 3
    assert {t: v["mean"] for t, v in a["tasks"].items()} == pytest.approx({"add": 11 / 3, "remove": 2.5, "text": 3})
    assert a["overall"]["mean"] == pytest.approx((11 / 3 + 2.5 + 3) / 3)
    assert (a["overall"]["failures"], a["tasks"]["add"]["failed"][0]["key"]) == (1, "add/add-3")
    assert a["metrics"]["overall"]["samples"] == 7 and a["metrics"]["overall"]["size_mismatches"] == 0
    assert a["settings"]["identity"]["edit"]["match_input"] is True
    html = (run_a / "report.html").read_text(encoding="utf-8")
    assert "<table" in html and 'loading="lazy"' in html and "add/add-3" in html and "looks fine." in html
    assert len(list((run_a / "report_files").rglob("*.jpg"))) == 14

    other = {**REPLIES, "add a red ball": "Prompt Compliance: 2\nVisual Naturalness: 2\n"
                                          "Physical & Detail Coherence: 2",
             "remove the cat": "Prompt Compliance: 4\nVisual Naturalness: 4\nPhysical & Detail Integrity: 4",
             "write HELLO": "Text Instruction Compliance: 3\nText Visual Quality: 3\nOverall Edit Quality: 3"}
    with FakeOpenAI(Judge(other)) as fake:
        assert bench_main(["run", "--out", str(run_b), "--judge-url", fake.url, "--seed", "7", "--limit", "1",
                           *common]) == 0
    out = tmp_path / "cmp" / "compare.html"
    assert bench_main(["report", "--compare", str(run_a), str(run_b), "-o", str(out)]) == 0
    result = compare(load_scores(run_a), load_scores(run_b))
    assert {t: r["delta"] for t, r in result["tasks"].items()} == pytest.approx(
        {"add": 2 - 11 / 3, "remove": 4 - 2.5, "text": 3 - 3})
    assert [(c["key"], round(c["delta"], 4)) for c in result["changed"]] == [
        ("add/add-1", -2.0), ("remove/remove-1", 2.0), ("text/text-1", round(3 - 4 / 3, 4))]
    assert result["settings"] == ["edit.seed: 43 -> 7"]
    assert "add/add-1" in out.read_text(encoding="utf-8") and "edit.seed: 43 -&gt; 7" in out.read_text(encoding="utf-8")


def test_report_screenshot_draws_its_tables(bench, tmp_path, tiny_model_dir):
    """Its own test, so a machine without Chromium skips only the screenshot, not the end-to-end asserts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: the report's screenshot is not taken")
    run_a = tmp_path / "base"
    with FakeOpenAI(Judge(REPLIES)) as fake:
        assert bench_main(["run", "--out", str(run_a), "--judge-url", fake.url, "--jsonl", str(bench), "--lang",
                           "en", "--model", str(tiny_model_dir), "--steps", "1", "--true-cfg", "1", "--limit", "1",
                           "--match-input-size", "--vl-area", "1024", "--vae-area", "1024", "--no-progress",
                           "--judge-model", "judge-1", *FAST_JUDGE]) == 0
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,1000", (run_a / "report.html").as_uri()], capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1000)
    pixels = list(img.getdata())
    header = sum(1 for p in pixels if p == (243, 243, 243))  # the tables' header cells (#f3f3f3)
    dark = sum(1 for p in pixels if max(p) < 100)
    assert header > 2000 and dark > 2000  # the tables and their text were drawn, not a blank page


@pytest.mark.parametrize("argv, message", [
    (["metrics", "--out", "{tmp}/none"], "--jsonl is needed"),
    (["judge", "--out", "{tmp}/none", "--jsonl", "{bench}"], "--judge-url and --judge-model are needed"),
    (["judge", "--out", "{tmp}/none", "--jsonl", "{bench}", "--judge-url", "api.example.com", "--judge-model", "m"],
     "base_url 'api.example.com' must start with http"),
    (["judge", "--out", "{tmp}/none", "--jsonl", "{bench}", "--prompts", "{tmp}/missing.json",
      "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "judge prompts .*missing.json not found"),
    (["metrics", "--out", "{tmp}/none", "--jsonl", "{bench}", "--bench", "nope"], "neither a built-in"),
    (["report", "--compare", "{tmp}/a", "{tmp}/b"], "scores.json not found"),
    (["metrics", "--out", "{tmp}/none", "--jsonl", "{bench}", "--face-embedder", "{tmp}/arcface.onnx"],
     "--face-embedder / --face-detector: identity.embedder '.*arcface.onnx' is neither a file"),
    (["metrics", "--out", "{tmp}/none", "--jsonl", "{bench}", "--ocr", "no_such_ocr_xyz:engine"],
     "--ocr: reward.typography.ocr 'no_such_ocr_xyz:engine': cannot import"),
])
def test_cli_errors_are_one_line(argv, message, bench, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, bench=bench) for a in argv]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("firered-bench: error: ")
    assert re.search(message, err[0])


# ---- a judge that fails fast; FireRed's aggregation --------------------------------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_costs_one_call_one_line_exit_2_and_no_image(status, bench, tmp_path, tiny_model_dir,
                                                                 monkeypatch, capsys):
    secret = "sk-REFUSED-5f3a9c"
    monkeypatch.setenv("FIRERED_TEST_JUDGE_KEY", secret)
    judge = ["--judge-model", "judge-1", "--api-key-env", "FIRERED_TEST_JUDGE_KEY", "--concurrency", "8",
             *FAST_JUDGE]
    with FakeOpenAI(lambda body: Reply.status(status, text=f"invalid api key {secret}")) as fake:
        run = tmp_path / "run"
        assert bench_main(["run", "--out", str(run), "--jsonl", str(bench), "--lang", "en", "--model",
                           str(tiny_model_dir), "--steps", "2", "--no-progress", "--judge-url", fake.url,
                           *judge]) == 2
        assert fake.calls == 1  # the preflight, before any model is loaded or image generated
        assert not list(run.rglob("*.png")) and not (run / "manifest.json").exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("firered-bench: error: ") and fake.url in err[0]
        assert f"HTTP {status}" in err[0] and "refused the API key" in err[0] and secret not in err[0]

        elsewhere = tmp_path / "elsewhere"  # `judge` on images made elsewhere: 8 threads, still one call
        _write_outputs(bench, elsewhere)
        assert bench_main(["judge", "--out", str(elsewhere), "--jsonl", str(bench), "--lang", "en",
                           "--judge-url", fake.url, *judge]) == 2
        assert fake.calls == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fake.url in err[0] and secret not in err[0] and "Traceback" not in err[0]
        assert not (elsewhere / "judge.json").exists()


def test_a_report_with_no_scores_says_so(bench, tmp_path, capsys):
    out = tmp_path / "run"
    _write_outputs(bench, out)
    with FakeOpenAI(lambda body: Reply.text("I cannot rate images.")) as fake:
        assert bench_main(["judge", "--out", str(out), "--jsonl", str(bench), "--lang", "en", "--judge-url",
                           fake.url, "--judge-model", "j", *FAST_JUDGE]) == 1  # nothing scored: not a success
    for aggregation in ("mean", "fireredteam"):
        capsys.readouterr()
        assert bench_main(["report", "--out", str(out), "--jsonl", str(bench), "--lang", "en", "--aggregation",
                           aggregation]) == 0
        assert "no scores: 0 of 7 samples judged (7 failed)" in capsys.readouterr().err
        assert "no scores" in (out / "report.html").read_text(encoding="utf-8")
    # FireRed's evaluator prints 0 when nothing scored; that number is kept for comparison, the report says no scores
    assert load_scores(out)["overall"]["mean"] == 0.0


def test_fireredteam_aggregation_equals_firereds_steps_by_hand(bench, tmp_path, capsys):
    out = tmp_path / "run"
    _write_outputs(bench, out)
    with FakeOpenAI(Judge(REPLIES)) as fake:
        assert bench_main(["judge", "--out", str(out), "--jsonl", str(bench), "--lang", "en", "--judge-url",
                           fake.url, "--judge-model", "j", "--aggregation", "fireredteam", *FAST_JUDGE]) == 0
        body = fake.bodies[0]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.1, 0.95, 8192)
    assert bench_main(["report", "--out", str(out), "--jsonl", str(bench), "--lang", "en"]) == 0
    firered = load_scores(out)
    # samples: add 4.0, 3.33 (10/3), add-3 unscorable; remove 2.0, 3.0; text 1.33 (4/3), 4.67 (14/3)
    # task means rounded: add round(3.665, 2) = 3.67, remove 2.5, text 3.0; overall (3.67 + 2.5 + 3.0) / 3, unrounded
    assert {t: v["mean"] for t, v in firered["tasks"].items()} == {"add": 3.67, "remove": 2.5, "text": 3.0}
    assert firered["overall"]["mean"] == pytest.approx(9.17 / 3, abs=1e-12)
    assert "aggregation <b>fireredteam</b>" in (out / "report.html").read_text(encoding="utf-8")
    assert bench_main(["report", "--out", str(out), "--jsonl", str(bench), "--lang", "en", "--aggregation",
                       "mean"]) == 0
    plain = load_scores(out)  # the default keeps every digit: add 11/3, overall (11/3 + 2.5 + 3) / 3
    assert plain["tasks"]["add"]["mean"] == pytest.approx(11 / 3, abs=1e-12)
    assert plain["overall"]["mean"] == pytest.approx((11 / 3 + 5.5) / 3, abs=1e-12)
    assert abs(plain["overall"]["mean"] - firered["overall"]["mean"]) > 1e-3
    assert "aggregation <b>mean</b>" in (out / "report.html").read_text(encoding="utf-8")
    assert "aggregation mean" in capsys.readouterr().err
    assert "aggregation: 'fireredteam' -> 'mean'" in compare(firered, plain)["settings"]  # a comparison says so
