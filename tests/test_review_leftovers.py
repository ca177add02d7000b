"""Leftovers of the bad-input review: the Pack Pictures node takes a MASK per picture as its region of interest;
firered-bench refuses a multi-process run it cannot join in one line; the "alpha unknown" note is not printed for
diffusers-style LoRA files (their alpha is folded into the weights)."""

from __future__ import annotations

import torch

import nodes_support as S  # noqa: E402
from test_lora import make_weights, transformer  # noqa: E402,F401
from test_packing import objects  # noqa: E402

from firered_core import packing as PK  # noqa: E402
from firered_core.evaluation.cli import main as bench_main  # noqa: E402
from firered_core.lora import apply_loras, remove_loras, save_lora  # noqa: E402


def test_pack_node_mask_inputs_set_the_region_of_interest():
    node = S.classes()["FireRedPackPictures"]
    optional = node.INPUT_TYPES()["optional"]
    assert all(optional[f"mask{k}"][0] == "MASK" for k in range(1, 9))
    pictures = objects(4)
    mask = torch.zeros(1, 100, 150)
    mask[:, 10:20, 30:60] = 1  # half the picture's size: stretched to it
    images = {f"image{k}": pictures[k - 1][None] for k in range(2, 5)}
    *_, table = node().pack(pictures[0][None], "x", "auto", 0.05, True, "", **images, mask3=mask,
                            mask2=torch.zeros(1, 64, 64))  # LoadImage's empty mask: ignored (auto crop)
    h, w = pictures[2].shape[:2]
    want = PK.roi_from_mask(mask[0], w, h)
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in table.splitlines()[1:]}
    assert rows["Picture 3"][1:3] == [",".join(map(str, want)), "mask"], table
    assert rows["Picture 2"][2] == "auto" and rows["Picture 1"][2] == "auto", table


def test_bench_run_without_a_rendezvous_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    (tmp_path / "b.jsonl").write_text("")
    assert bench_main(["run", "--out", str(tmp_path / "out"), "--jsonl", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("firered-bench: error: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set")
    assert "Traceback" not in "\n".join(err)
    for bad in ({"RANK": "x"}, {"RANK": "2"}, {"WORLD_SIZE": "0"}, {"LOCAL_RANK": "1.5"}):
        for key, value in bad.items():
            monkeypatch.setenv(key, value)
        assert bench_main(["run", "--out", str(tmp_path / "out"), "--jsonl", str(tmp_path / "b.jsonl")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("firered-bench: error: "), bad
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_alpha_note_only_where_alpha_is_really_unknown(transformer, tmp_path):  # noqa: F811
    weights = make_weights(transformer, alpha=None)
    for style, noted in (("diffusers", False), ("comfy", True)):
        path = save_lora(weights, tmp_path / f"{style}.safetensors", style=style)
        report = apply_loras(transformer, [path])
        assert ("alpha unknown" in report.summary()) == noted, (style, report.summary())
        remove_loras(transformer)
