"""DiffusionNFT's loss and advantages by hand, and the reward plug-ins: typography (fake OCR), VLM judge (fake
server on loopback, cached), any callable, OCR adapters. No model here."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from PIL import Image

from fake_openai import FakeOpenAI, Reply
from firered_core.rewards import CachedReward, CallableReward, RewardBatch, RewardConfig, RewardError, build_reward
from firered_core.rewards.judge import JudgeConfig, JudgeReward
from firered_core.rewards.ocr import OcrBox, as_boxes, from_paddleocr, from_rapidocr, load_ocr
from firered_core.rewards.typography import (TypographyConfig, TypographyReward, requested_region, requested_texts,
                                             text_similarity)
from firered_core.training.nft import NFTConfig, group_advantages, implicit_policies, nft_loss, optimality_probability


# -- the loss ----------------------------------------------------------------------------------------------------
def fixed(value: float, rows: int = 2) -> torch.Tensor:
    return torch.full((rows, 3, 4), value)


def test_nft_loss_equals_a_hand_computation():
    # v = eps - x0 = 0.2 - (-0.3) = 0.5 everywhere; beta 0.5: v+ = 0.5 * 1 + 0.5 * 2 = 1.5 -> (1.5 - 0.5)^2 = 1,
    # v- = 1.5 * 1 - 0.5 * 2 = 0.5 -> 0; rows r = 0.75 / 0.25 -> losses 0.75 / 0.25, mean 0.5
    v_theta, v_old, eps, x0 = fixed(2.0), fixed(1.0), fixed(0.2), fixed(-0.3)
    loss, per_row = nft_loss(v_theta, v_old, eps, x0, torch.tensor([0.75, 0.25]), beta=0.5)
    assert torch.allclose(per_row, torch.tensor([0.75, 0.25])) and loss.item() == pytest.approx(0.5)


def test_nft_loss_on_random_tensors_matches_the_formula_term_by_term():
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, eps, x0 = (torch.randn(3, 5, 8, generator=g) for _ in range(4))
    r, beta = torch.tensor([0.0, 0.3, 1.0]), 0.7
    target = eps - x0
    pos = ((1 - beta) * v_old + beta * v_theta - target).square().mean((1, 2))
    neg = ((1 + beta) * v_old - beta * v_theta - target).square().mean((1, 2))
    loss, per_row = nft_loss(v_theta, v_old, eps, x0, r, beta)
    assert torch.allclose(per_row, r * pos + (1 - r) * neg, atol=1e-6)
    assert per_row[0].item() == pytest.approx(neg[0].item(), abs=1e-6)  # r = 0: the negative term alone
    assert per_row[2].item() == pytest.approx(pos[2].item(), abs=1e-6)  # r = 1: the positive term alone
    # beta = 1: v+ is the trained model itself (plain flow matching at r = 1)
    one, _ = nft_loss(v_theta, v_old, eps, x0, torch.ones(3), 1.0)
    assert one.item() == pytest.approx((v_theta - target).square().mean().item(), abs=1e-6)
    # beta -> 0: both implicit policies are the old one, whatever r
    tiny, _ = nft_loss(v_theta, v_old, eps, x0, r, 1e-8)
    assert tiny.item() == pytest.approx((v_old - target).square().mean().item(), abs=1e-6)


def test_gradient_at_the_old_policy_pulls_positives_and_pushes_negatives():
    # at v_theta = v_old the gradient of a row is 2 beta (2r - 1) (v_theta - v) / (numel * rows)
    g = torch.Generator().manual_seed(1)
    v_old, eps, x0 = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    v_theta = v_old.clone().requires_grad_(True)
    r, beta = torch.tensor([0.9, 0.2]), 0.3
    nft_loss(v_theta, v_old, eps, x0, r, beta)[0].backward()
    want = 2 * beta * (2 * r - 1).view(-1, 1, 1) * (v_old - (eps - x0)) / (12 * 2)
    assert torch.allclose(v_theta.grad, want, atol=1e-7)
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    assert torch.allclose(v_pos + v_neg, 2 * v_old)  # symmetric around the old policy


def test_group_advantages_and_optimality_probability_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-12)
    std = math.sqrt(1.25)  # population std of 1..4
    assert torch.allclose(adv[0], torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64) / std)
    assert torch.equal(group_advantages(rewards)[1], torch.zeros(4, dtype=torch.float64))  # a flat group: neutral
    r = optimality_probability(adv[0], adv_clip=1.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.5 - 0.5 * 0.5 / std, 0.5 + 0.5 * 0.5 / std, 1.0],
                                          dtype=torch.float64))
    assert torch.allclose(optimality_probability(adv[0], 5.0), 0.5 + 0.1 * adv[0])
    # shifting or scaling a group's rewards changes nothing (up to eps)
    assert torch.allclose(group_advantages(rewards[:1] * 7 + 3), group_advantages(rewards[:1]), rtol=1e-3)


def test_nft_config_ranges():
    from firered_core.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="nft.group_size"):
        load_config(None, **{"nft.group_size": 1})
    with pytest.raises(ConfigError, match="nft.old_decay"):
        load_config(None, **{"nft.old_decay": 1.0})
    with pytest.raises(ConfigError, match="nft.reward.kind"):
        load_config(None, **{"nft.reward.kind": "clip"})
    cfg = load_config(None, overrides=["nft.enabled=true", "nft.beta=0.1", "nft.reward.typography.max_height=0.3"])
    assert cfg.nft.enabled and cfg.nft.beta == 0.1 and cfg.nft.reward.typography.max_height == 0.3
    assert NFTConfig().group_size == 4
    from pathlib import Path

    shipped = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "nft_lora.yaml")
    assert shipped.nft.enabled and shipped.nft.reward.kind == "typography"


# -- typography --------------------------------------------------------------------------------------------------
def fake_engine(*boxes):
    """An OCR engine made here: it 'reads' the given detections whatever the image."""
    return lambda image: [OcrBox(t, b, c) for t, b, c in boxes]


IMG = Image.new("RGB", (100, 100))


def typo(*boxes, **cfg) -> TypographyReward:
    return TypographyReward(TypographyConfig(**cfg), engine=fake_engine(*boxes))


def test_typography_exact_numbers_for_a_hand_made_case():
    # "HELLO" read as "HELL0": 1 edit in 5 -> c = 0.8; the box (30, 40)-(70, 60) is centred and inside -> a = 1;
    # 20% of the height <= 25% -> s = 1. Score 0.6 * 0.8 + 0.2 + 0.2 = 0.88
    assert typo(("HELL0", (30, 40, 70, 60), 0.9)).image_score(IMG, 'Write "HELLO" on the sign') == \
        pytest.approx(0.88)
    # oversized: 90% of the height -> s = 1 - (0.9 - 0.25) / 0.75; centred, right text
    assert typo(("HELLO", (0, 5, 100, 95), 0.9)).image_score(IMG, 'Write "HELLO"') == \
        pytest.approx(0.6 + 0.2 + 0.2 * (1 - 0.65 / 0.75))
    # misaligned: centre (10, 5), offsets 0.8 and 0.9 half-images -> a = 1 - hypot(0.8, 0.9) / sqrt(2)
    assert typo(("HELLO", (0, 0, 20, 10), 0.9)).image_score(IMG, 'Write "HELLO"') == \
        pytest.approx(0.6 + 0.2 * (1 - math.hypot(0.8, 0.9) / math.sqrt(2)) + 0.2)


def test_typography_orders_planted_cases():
    ask = 'Add the text "OPEN DAILY" to the shop sign'
    right = typo(("Open Daily", (25, 40, 75, 60), 0.95)).image_score(IMG, ask)
    wrong = typo(("CLOSED", (25, 40, 75, 60), 0.95)).image_score(IMG, ask)
    oversized = typo(("OPEN DAILY", (0, 0, 100, 100), 0.95)).image_score(IMG, ask)
    misaligned = typo(("OPEN DAILY", (0, 85, 30, 100), 0.95)).image_score(IMG, ask)
    assert right == pytest.approx(1.0)
    assert right > oversized and right > misaligned and right > wrong
    assert wrong < 0.6 < min(oversized, misaligned)  # wrong text costs more than placement or size
    # text split over two lines is read in order; low-confidence detections are ignored
    split = typo(("OPEN", (30, 35, 70, 48), 0.9), ("DAILY", (30, 52, 70, 65), 0.9), ("OPEN DAILY", (0, 0, 9, 9), 0.1))
    assert split.image_score(IMG, ask) == pytest.approx(1.0)
    assert typo().image_score(IMG, ask) == 0.0  # nothing read
    assert typo(("HELLO", (30, 40, 70, 60), 1.0)).image_score(IMG, "Make it brighter") == 0.0  # nothing asked


def test_typography_region_and_size_follow_the_instruction():
    top_box = ("SALE", (30, 5, 70, 25), 1.0)
    assert typo(top_box).image_score(IMG, 'Write "SALE" at the top') == pytest.approx(1.0)
    assert typo(top_box).image_score(IMG, 'Write "SALE" at the bottom') == pytest.approx(0.8)  # a = 0
    assert requested_region("in the bottom left corner") == pytest.approx((0.0, 2 / 3, 1 / 3, 1.0))
    assert requested_region("centred") is None
    # "small" lowers the allowed height to 10%: a 20%-high box gets s = 1 - 0.1 / 0.9
    assert typo(("SALE", (30, 40, 70, 60), 1.0)).image_score(IMG, 'Write "SALE" in small letters') == \
        pytest.approx(0.8 + 0.2 * (1 - 0.1 / 0.9))
    assert requested_texts('Write "A b" and “世界” then \'x\' but don\'t') == ["A b", "世界", "x"]
    assert text_similarity("Hello World", "helloworld") == 1.0 and text_similarity("", "") == 1.0


def test_typography_reward_scores_a_batch():
    reward = typo(("HELLO", (30, 40, 70, 60), 1.0))
    batch = RewardBatch(torch.rand(2, 3, 100, 100), ['Write "HELLO"', 'Write "BYE"'])
    scores = reward(batch)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.4)  # BYE vs HELLO: c = 0


def test_ocr_adapters_and_user_engines():
    # rapidocr_onnxruntime: ([[polygon, text, score], ...], elapse); rapidocr >= 2: an object with boxes/txts/scores
    poly = [[10, 20], [50, 20], [50, 40], [10, 40]]
    assert from_rapidocr(([[poly, "Hi", 0.9]], 0.1)) == [OcrBox("Hi", (10, 20, 50, 40), 0.9)]
    assert from_rapidocr((None, 0.1)) == []

    class Out:
        boxes, txts, scores = [poly], ("Hi",), (0.8,)
    assert from_rapidocr(Out()) == [OcrBox("Hi", (10, 20, 50, 40), 0.8)]
    # paddleocr 2.x lists and 3.x dict-like results
    assert from_paddleocr([[[poly, ("Hi", 0.7)]]]) == [OcrBox("Hi", (10, 20, 50, 40), 0.7)]
    assert from_paddleocr([{"rec_texts": ["Hi"], "rec_polys": [poly], "rec_scores": [0.6]}]) == \
        [OcrBox("Hi", (10, 20, 50, 40), 0.6)]
    assert from_paddleocr([None]) == []
    assert as_boxes([("a", (5, 6, 1, 2), 1)]) == [OcrBox("a", (1, 2, 5, 6), 1.0)]
    with pytest.raises(RewardError, match="not \\(text, box, confidence\\)"):
        as_boxes(["oops"])
    engine = load_ocr("test_posttrain_nft:planted_ocr_factory")
    assert engine(IMG) == [OcrBox("HELLO", (0, 0, 10, 10), 1.0)]
    reward = build_reward(RewardConfig(kind="typography",
                                       typography=TypographyConfig(ocr="test_posttrain_nft:planted_ocr_factory")))
    # "HELLO" read right; its box (0, 0)-(10, 10) sits in the top-left corner of 100 x 100: a = 1 - hypot(.9, .9)/sqrt 2
    got = reward(RewardBatch(torch.zeros(1, 3, 100, 100), ['Write "HELLO"']))
    assert got.tolist() == pytest.approx([0.6 + 0.2 * (1 - math.hypot(0.9, 0.9) / math.sqrt(2)) + 0.2])
    with pytest.raises(RewardError, match="cannot import"):
        load_ocr("no_such_module_xyz:factory")


def planted_ocr_factory():
    return lambda image: [("HELLO", [[0, 0], [10, 0], [10, 10], [0, 10]], 1.0)]


def test_missing_ocr_package_is_an_actionable_error():
    pytest.importorskip("torch")
    try:
        import rapidocr  # noqa: F401
        pytest.skip("rapidocr is installed here")
    except ImportError:
        pass
    try:
        import rapidocr_onnxruntime  # noqa: F401
        pytest.skip("rapidocr_onnxruntime is installed here")
    except ImportError:
        pass
    with pytest.raises(RewardError, match="pip install rapidocr"):
        load_ocr("rapidocr")


def rendered(text: str, xy: tuple[int, int], size: int = 56, width: int = 512) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (width, 512), (235, 230, 220))
    ImageDraw.Draw(img).text(xy, text, fill=(20, 20, 20), font=ImageFont.load_default(size=size))
    return img


def test_real_rapidocr_scores_rendered_text():
    """The real RapidOCR (rapidocr_onnxruntime ships its PP-OCRv4 models; not in CI: it pulls the GUI opencv-python)
    through our adapter. Measured here: the requested text at the top scores 1.0; at the bottom 0.8 (alignment 0),
    misspelt 0.9 (correctness 0.833), oversized 0.8 (size 0)."""
    if importlib.util.find_spec("rapidocr") is None and importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.skip("RapidOCR is not installed (pip install rapidocr_onnxruntime)")
    reward = TypographyReward(TypographyConfig(ocr="rapidocr"))
    instruction = 'Write "GRAND OPENING" at the top'
    boxes = reward.engine(rendered("GRAND OPENING", (40, 30)))
    assert len(boxes) == 1 and text_similarity("GRAND OPENING", boxes[0].text) == 1.0
    x0, y0, x1, y1 = boxes[0].box
    assert 30 <= x0 <= 60 and 30 <= y0 <= 60 and 440 <= x1 <= 500 and 80 <= y1 <= 110, boxes[0].box
    top = reward.image_score(rendered("GRAND OPENING", (40, 30)), instruction)
    scores = {"bottom": reward.image_score(rendered("GRAND OPENING", (40, 400)), instruction),
              "misspelt": reward.image_score(rendered("GRAND OPEMNG", (40, 30)), instruction),
              "oversized": reward.image_score(rendered("GRAND OPENING", (10, 150), size=150, width=1600), instruction)}
    assert top == pytest.approx(1.0)
    assert all(0.5 < s < top - 0.05 for s in scores.values()), scores
    assert reward.image_score(rendered("GRAND OPENING", (40, 30)), "Make it brighter") == 0.0  # no quoted text


# -- callable rewards and the cache ---------------------------------------------------------------------------
def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3)).tolist()


def test_callable_reward_and_per_sample_cache(tmp_path):
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.6, 0.2)])
    cached = CachedReward(CallableReward("test_posttrain_nft:brightness"), tmp_path / "scores")
    scores = cached(RewardBatch(images, ["a", "a", "a"]))
    assert torch.allclose(scores, torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64), atol=1e-6)
    assert cached.calls == 2  # the third rollout is the first one again: scored once
    cached(RewardBatch(images, ["a", "a", "a"]))
    assert cached.calls == 2
    cached(RewardBatch(images[:1], ["b"]))
    assert cached.calls == 3  # another instruction is another sample
    again = CachedReward(CallableReward("test_posttrain_nft:brightness"), tmp_path / "scores")
    again(RewardBatch(images, ["a", "a", "a"]))
    assert again.calls == 0  # from disk
    with pytest.raises(RewardError, match="one finite number per image"):
        CachedReward(CallableReward(lambda im, p: [math.nan] * len(p)))(RewardBatch(images, ["a"] * 3))
    with pytest.raises(RewardError, match="needs reward.callable"):
        build_reward(RewardConfig(kind="callable"))


# -- the VLM judge ------------------------------------------------------------------------------------------------
def judge_reply(body: dict) -> Reply:
    """Scores the edit by how bright the output image (the second image of the GEdit-style request) is."""
    import base64
    import io

    parts = body["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    data = base64.b64decode(images[1]["image_url"]["url"].split(",", 1)[1])
    level = round(sum(Image.open(io.BytesIO(data)).convert("L").getdata()) / (8 * 8 * 255) * 10)
    return Reply.text(f"Brief reasoning: fine.\nSemantic Consistency: {level}\nPerceptual Quality: 4")


def test_judge_reward_against_the_fake_server_and_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRERED_TEST_JUDGE_KEY", "sk-test-123")
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.9, 0.1)])
    source = Image.new("RGB", (8, 8), (128, 128, 128))
    batch = RewardBatch(images, ["Make it brighter"] * 2, [[source], [source]])
    with FakeOpenAI(judge_reply) as fake:
        cfg = JudgeConfig(base_url=fake.url, model="judge-1", api_key_env="FIRERED_TEST_JUDGE_KEY", max_retries=0)
        reward = build_reward(RewardConfig(kind="judge", judge=cfg, cache_dir=str(tmp_path / "cache")))
        scores = reward(batch)
        # GEdit rule: sqrt(SC * PQ) on 0..10, mapped to 0..1
        assert torch.allclose(scores, torch.tensor([math.sqrt(9 * 4) / 10, math.sqrt(1 * 4) / 10],
                                                   dtype=torch.float64))
        assert fake.calls == 2
        body = fake.bodies[0]
        texts = [p["text"] for p in body["messages"][0]["content"] if p["type"] == "text"]
        assert texts[0] == "Image A (original):" and "editing instruction is : Make it brighter." in texts[-1]
        assert fake.headers[0]["Authorization"] == "Bearer sk-test-123" and body["model"] == "judge-1"
        # a rerun (a new process: fresh objects, the same cache folder) makes zero calls, from the score cache or,
        # with only the default folder, from the judge's reply cache
        rerun = build_reward(RewardConfig(kind="judge", judge=cfg), tmp_path / "cache")  # replies: default dir
        assert torch.equal(rerun(batch), scores) and fake.calls == 2
        assert rerun.disk is None
        bare = JudgeReward(cfg, tmp_path / "cache" / "judge")
        assert bare(batch) == pytest.approx(scores.tolist()) and fake.calls == 2
        assert "sk-test-123" not in repr(bare.client)


def test_judge_reward_needs_an_endpoint_and_reports_failures(tmp_path):
    with pytest.raises(RewardError, match="needs base_url and model"):
        JudgeReward(JudgeConfig())
    with FakeOpenAI(lambda body: Reply.text("no scores here")) as fake:
        reward = JudgeReward(JudgeConfig(base_url=fake.url, model="j", max_retries=0))
        with pytest.raises(RewardError, match="reward.judge: rollout 0"):
            reward(RewardBatch(torch.rand(1, 3, 8, 8), ["x"]))
