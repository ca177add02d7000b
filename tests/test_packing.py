"""Packing 4+ pictures: every crop placed once, no overlaps, composites within the area and aspect limits,
deterministic; regions of interest; the mention rewrite for 4, 5 and 6 pictures in English and Chinese."""

from __future__ import annotations

import itertools

import pytest
import torch

from firered_core import packing as P

SIZES = [(300, 200), (200, 300), (400, 400), (640, 360), (120, 360), (500, 250), (90, 400), (800, 200)]


def objects(n: int, sizes=SIZES) -> list[torch.Tensor]:
    """Pictures on white, each with one flat coloured object (a known box) in it."""
    out = []
    for k, (w, h) in enumerate(sizes[:n]):
        img = torch.ones(h, w, 3)
        img[h // 4:3 * h // 4, w // 5:w // 2] = torch.tensor([0.1 * (k + 1), 0.9 - 0.1 * k, 0.3])
        out.append(img)
    return out


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8])
def test_every_crop_placed_once_without_overlap_within_limits(n):
    result = P.pack_pictures(objects(n))
    assert 2 <= len(result.composites) <= 3
    assert sorted(p.picture for p in result.placements) == list(range(1, n + 1))
    for c, canvas in enumerate(result.composites, 1):
        h, w, _ = canvas.shape
        assert w % 16 == 0 and h % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(w * h / P.PACK_AREA - 1) < 0.06, (w, h)
        rects = [p.rect for p in result.placements if p.composite == c]
        assert sorted(p.item for p in result.placements if p.composite == c) == list(range(1, len(rects) + 1))
        for r in rects:
            assert r[0] >= 0 and r[1] >= 0 and r[0] + r[2] <= w and r[1] + r[3] <= h and r[2] > 0 and r[3] > 0
        assert not any(overlap(a, b) for a, b in itertools.combinations(rects, 2))
        # minimal whitespace: the items cover the canvas up to the aspect clamp and the rounding
        covered = sum(r[2] * r[3] for r in rects) / (w * h)
        assert covered > 0.6, covered


def test_each_crop_lands_in_its_rectangle():
    pictures = objects(5)
    result = P.pack_pictures(pictures)
    for p in result.placements:
        x, y, w, h = p.rect
        cell = result.composites[p.composite - 1][y + h // 2, x + w // 2]
        colour = pictures[p.picture - 1][pictures[p.picture - 1].shape[0] // 2,
                                         pictures[p.picture - 1].shape[1] * 7 // 20]
        torch.testing.assert_close(cell, colour, atol=0.02, rtol=0)


def test_deterministic_for_the_same_inputs():
    a, b = P.pack_pictures(objects(6)), P.pack_pictures(objects(6))
    assert a.placements == b.placements
    assert all(torch.equal(x, y) for x, y in zip(a.composites, b.composites))


def test_regions_of_interest_from_content_box_and_mask():
    img = objects(1)[0]  # 300x200, object at x 60..150, y 50..150
    x0, y0, x1, y1 = P.propose_roi(img)
    assert x0 <= 60 and y0 <= 50 and x1 >= 150 and y1 >= 150
    assert x1 - x0 < 130 and y1 - y0 < 130  # the white around it is cut away
    photo = torch.rand(64, 80, 3)  # content everywhere: the whole picture
    assert P.propose_roi(photo) == (0, 0, 80, 64)
    assert P.propose_roi(torch.ones(50, 50, 3)) == (0, 0, 50, 50)  # blank: whole
    mask = torch.zeros(100, 150)
    mask[10:20, 30:60] = 1  # half the picture's size: stretched first
    assert P.roi_from_mask(mask, 300, 200) == (48, 12, 132, 48)
    result = P.pack_pictures(objects(4), boxes={2: (0, 0, 100, 150)}, masks={3: mask})
    assert [result.placement(k).box for k in (2, 3)] == [(0, 0, 100, 150), P.roi_from_mask(mask, 400, 400)]
    assert result.sources == ["auto", "box", "mask", "auto"]
    with pytest.raises(P.PackError, match="Picture 9"):
        P.pack_pictures(objects(4), boxes={9: (0, 0, 5, 5)})
    with pytest.raises(P.PackError, match="empty"):
        P.pack_pictures(objects(4), boxes={1: (50, 50, 50, 80)})
    assert P.parse_boxes("2: 0,0,100,150\n 4=1, 2, 3, 4") == {2: (0, 0, 100, 150), 4: (1, 2, 3, 4)}
    with pytest.raises(P.PackError, match="x0,y0,x1,y1"):
        P.parse_boxes("2: 0,0,100")


# The mapping for wide/tall pictures of SIZES: the table each count gives (fixed: the layout is deterministic).
EXPECTED = {
    4: {1: "the first item (left) of Picture 1", 2: "the second item (right) of Picture 1",
        3: "the first item (left) of Picture 2", 4: "the second item (right) of Picture 2"},
    5: {1: "the first item (left) of Picture 1", 2: "the second item (right) of Picture 1", 3: "Picture 2",
        4: "the first item (left) of Picture 3", 5: "the second item (right) of Picture 3"},
    6: {1: "the first item (left) of Picture 1", 2: "the second item (right) of Picture 1",
        3: "the first item (left) of Picture 2", 4: "the second item (right) of Picture 2",
        5: "the first item (left) of Picture 3", 6: "the second item (right) of Picture 3"},
}
EXPECTED_ZH = {
    4: {1: "图1中的第一项（左）", 2: "图1中的第二项（右）", 3: "图2中的第一项（左）", 4: "图2中的第二项（右）"},
    5: {1: "图1中的第一项（左）", 2: "图1中的第二项（右）", 3: "图2", 4: "图3中的第一项（左）", 5: "图3中的第二项（右）"},
    6: {1: "图1中的第一项（左）", 2: "图1中的第二项（右）", 3: "图2中的第一项（左）", 4: "图2中的第二项（右）",
        5: "图3中的第一项（左）", 6: "图3中的第二项（右）"},
}


@pytest.mark.parametrize("n", [4, 5, 6])
def test_mention_rewrite_table_english_and_chinese(n):
    result = P.pack_pictures(objects(n))
    prompt_en = " ".join(f"{word} {k}," for k, word in zip(range(1, n + 1), itertools.cycle(["Picture", "image",
                                                                                                  "photo"])))
    got_en = result.rewrite(prompt_en)
    assert got_en == " ".join(f"{EXPECTED[n][k]}," for k in range(1, n + 1))
    prompt_zh = "".join(f"{form.format(k)}、" for k, form in zip(range(1, n + 1), itertools.cycle(["图{}", "第{}张图",
                                                                                                 "图片{}"])))
    assert result.rewrite(prompt_zh) == "".join(f"{EXPECTED_ZH[n][k]}、" for k in range(1, n + 1))
    table = result.table()
    for k in range(1, n + 1):
        assert f"Picture {k} " in table and EXPECTED[n][k] in table and EXPECTED_ZH[n][k] in table
    with pytest.raises(P.PackError, match=f"Picture {n + 1}"):
        result.rewrite(f"Picture {n + 1}")


def test_rewrite_is_one_pass_and_keeps_other_text():
    result = P.pack_pictures(objects(4))
    text = "Put the hat of Picture 4 on the man in Picture 1; keep Picture 2's background. Pictures are nice."
    out = result.rewrite(text)
    assert out == ("Put the hat of the second item (right) of Picture 2 on the man in the first item (left) of "
                   "Picture 1; keep the second item (right) of Picture 1's background. Pictures are nice.")
    assert P.mentions("把图5的猫放到第2张图里, image 3") == [5, 2, 3]


def test_grids_name_rows_and_columns():
    """Four square pictures in one composite: a 2x2 grid (closest to square), named top left ... bottom right."""
    squares = objects(4, [(100, 100)] * 4)
    result = P.pack_pictures(squares, composites=1, auto_roi=False)
    assert [p.position for p in result.placements] == ["top left", "top right", "bottom left", "bottom right"]
    assert [p.mention("zh") for p in result.placements][-1] == "图1中的第四项（右下）"
    h, w, _ = result.composites[0].shape
    assert (w, h) == (1024, 1024)


def test_cli_packs_more_than_three_images(tiny_model_dir, tmp_path, capsys):
    from firered_core import cli
    from firered_core.images import tensor_to_pil

    paths = []
    for k, img in enumerate(objects(5)):
        paths += ["-i", str(tmp_path / f"p{k}.png")]
        tensor_to_pil(img).save(paths[-1])
    out = tmp_path / "out.png"
    code = cli.main(["--model", str(tiny_model_dir), *paths, "-p", "Put Picture 5 into 图1", "--box", "2:0,0,100,150",
                     "--pack-megapixels", "0.05", "--steps", "1", "--true-cfg", "1", "--vl-area", str(56 * 56),
                     "--vae-area", str(64 * 64), "--width", "64", "--height", "48", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file()
    assert "packed 5 images into 3 composites" in err
    assert "instruction: Put the second item (right) of Picture 3 into 图1中的第一项（左）" in err
    assert "0,0,100,150" in err and "box" in err


def test_pack_node_blames_the_input_at_fault():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import nodes_support as S

    node = S.classes()["FireRedPackPictures"]()
    pictures = {f"image{k}": objects(4)[k - 1][None] for k in range(2, 5)}
    with pytest.raises(ValueError, match="FireRed Pack Pictures: input 'boxes': .*Picture 2 is empty"):
        node.pack(objects(1)[0][None], "x", "auto", 0.05, True, "2: 5,5,5,9", **pictures)
    with pytest.raises(ValueError, match="input 'composites'"):
        node.pack(objects(1)[0][None], "x", "3", 0.05, True, "", image2=pictures["image2"])
    with pytest.raises(ValueError, match="input 'prompt': .*Picture 7"):
        node.pack(objects(1)[0][None], "Picture 7", "auto", 0.05, True, "", **pictures)
    one, two, three, prompt, table = node.pack(objects(1)[0][None], "图4", "auto", 0.05, True, "", **pictures)
    assert three is None and prompt == "图2中的第二项（右）" and "Picture 4" in table
