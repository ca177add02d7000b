"""Post-training loss terms on fixed tensors (DPO, identity), the face embedder loader and the low-VRAM switches."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from firered_core.training.identity import (IdentityConfig, IdentityError, face_crops, identity_loss,
                                            identity_weight, latent_box, load_embedder, x0_estimate)
from firered_core.training.losses import row_errors
from firered_core.training.lowvram import Fp8BaseLinear, store_frozen_fp8
from firered_core.training.preference import dpo_logits, dpo_loss


class TinyFaceEmbedder(torch.nn.Module):
    """Average-pooled colour statistics through a fixed random projection: a stand-in for ArcFace."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.proj = torch.nn.Linear(8 * 4 * 4, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(torch.tanh(self.conv(x * 2 - 1)), 4)
        return self.proj(h.flatten(1))


def published_diffusion_dpo(model_pred, ref_pred, target, beta):
    """The loss of the Diffusion-DPO authors' diffusers script (train_diffusion_dpo.py), rows = [w..., l...]."""
    model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_ref_loss = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2])
    ref_losses_w, ref_losses_l = raw_ref_loss.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return -F.logsigmoid(inside_term).mean(), implicit_acc


def test_lambda_schedule_by_hand():
    sigma = torch.tensor([0.2, 0.89, 0.95])
    got = identity_weight(sigma, eta=0.5)
    assert torch.allclose(got, torch.tensor([0.5 * 0.04, 0.5 * 0.7921, 0.0]), atol=1e-7)
    assert identity_weight(torch.tensor([0.9]), 1.0).item() == 0.0  # the cutoff itself is off


def test_x0_estimate_by_hand():
    xt, v = torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), 2.0)
    got = x0_estimate(xt, torch.tensor([0.25, 0.5]), v)
    assert torch.equal(got[0], torch.full((3, 4), 0.5)) and torch.equal(got[1], torch.zeros(3, 4))
    # exact for a flow-matching interpolation with the true velocity
    x0, noise, s = torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.tensor([0.3])
    assert torch.allclose(x0_estimate((1 - s) * x0 + s * noise, s, noise - x0), x0, atol=1e-6)


def test_dpo_with_omega_1_equals_the_published_loss():
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l, noise = (torch.randn(3, 6, 8, generator=g) for _ in range(3))
    pw, pl, rw, rl = (torch.randn(3, 6, 8, generator=g) for _ in range(4))
    target = torch.cat([noise - x0_w, noise - x0_l])
    for beta in (1.0, 5.0):
        want, want_acc = published_diffusion_dpo(torch.cat([pw, pl]), torch.cat([rw, rl]), target, beta)
        errs = [row_errors(p, noise, x, outlier=None)[0] for p, x in ((pw, x0_w), (pl, x0_l), (rw, x0_w), (rl, x0_l))]
        got, stats = dpo_loss(*errs, beta=beta, omega=1.0)
        assert torch.allclose(got, want, atol=1e-6) and stats.accuracy == pytest.approx(float(want_acc))
        assert torch.allclose(stats.margin, dpo_logits(*errs, beta=beta))


def test_omega_changes_only_the_preferred_term_and_sft_adds_the_preferred_error():
    mw, ml = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.10])
    rw, rl = torch.tensor([0.35, 0.45]), torch.tensor([0.30, 0.20])
    beta, omega = 4.0, 1.5
    one, many = dpo_logits(mw, ml, rw, rl, beta), dpo_logits(mw, ml, rw, rl, beta, omega)
    assert torch.allclose(many - one, -0.5 * beta * (omega - 1) * (mw - rw))
    # by hand, row 0: -2 * (1.5 * (0.30 - 0.35) - (0.40 - 0.30)) = 0.35
    assert many[0].item() == pytest.approx(0.35, abs=1e-6)
    # the dispreferred side's gradient is the same whatever omega
    for w in (1.0, omega):
        ml_ = ml.clone().requires_grad_(True)
        mw_ = mw.clone().requires_grad_(True)
        dpo_loss(mw_, ml_, rw, rl, beta, w)[0].backward()
        if w == 1.0:
            grad_l_one = ml_.grad * torch.sigmoid(-one) / torch.sigmoid(-one)  # d/dl at omega = 1
            sig_one = torch.sigmoid(-one)
        else:
            # d loss / d e_l = -beta/2 * sigmoid(-inside) / rows: only sigmoid(-inside) changes with omega
            assert torch.allclose(ml_.grad / torch.sigmoid(-many), grad_l_one / sig_one)
            assert torch.allclose(mw_.grad, 0.5 * beta * omega * torch.sigmoid(-many) / 2)
    sft, _ = dpo_loss(mw, ml, rw, rl, beta, omega, sft_weight=0.25)
    assert sft.item() == pytest.approx(dpo_loss(mw, ml, rw, rl, beta, omega)[0].item() + 0.25 * 0.4, abs=1e-6)
    # published form by hand for row 1 at omega = 1: -log sigmoid(-2 * ((0.5 - 0.45) - (0.1 - 0.2)))
    assert one[1].item() == pytest.approx(-2 * (0.05 + 0.1), abs=1e-6)
    assert -F.logsigmoid(one[1]).item() == pytest.approx(-math.log(1 / (1 + math.exp(0.3))), abs=1e-6)


def test_preference_config_ranges():
    """Ranges are stated once, in the typed fields, and checked when the config is loaded."""
    from firered_core.errors import ConfigError
    from firered_core.training.config import load_config

    with pytest.raises(ConfigError, match="'preference.omega': value 0.5 is not a number >= 1"):
        load_config(None, **{"preference.omega": 0.5})
    with pytest.raises(ConfigError, match="'preference.beta'"):
        load_config(None, **{"preference.beta": 0})


def test_latent_box_scales_and_widens_to_whole_latent_pixels():
    # stored 128x64, trained at 64x32: box (10, 4)-(50, 30) -> (5, 2)-(25, 15) pixels -> latent cols 0..4, rows 0..2
    assert latent_box((10, 4, 50, 30), (128, 64), (64, 32)) == (0, 2, 0, 4)
    assert latent_box((64, 32, 64, 32), (64, 64), (64, 64)) == (4, 5, 7, 8)  # empty box at the edge: last pixel
    assert latent_box((0, 0, 90, 90), (64, 64), (64, 64)) == (0, 8, 0, 8)  # clipped to the image


def test_identity_loss_equals_the_hand_computation(tiny_model):
    vae = tiny_model.vae.float().requires_grad_(False)
    embedder = TinyFaceEmbedder().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x0, xt, v = (torch.randn(1, 16, 64, generator=g) for _ in range(3))
    boxes = [(8, 8, 40, 40), (16, 0, 64, 30)]
    cfg = IdentityConfig(eta=0.5, input_size=16)
    for s in (0.2, 0.95):  # 0.89's weight is in test_lambda_schedule_by_hand
        sigma = torch.tensor([s])
        got, stats = identity_loss(xt, sigma, v, x0, boxes, (64, 64), (64, 64), vae, embedder, cfg)
        want = torch.tensor(0.0)
        if s < 0.9:
            hat = face_crops(xt - s * v, boxes, (64, 64), (64, 64), vae, 16)
            ref = face_crops(x0, boxes, (64, 64), (64, 64), vae, 16)
            cos = F.cosine_similarity(embedder(hat), embedder(ref), dim=1)
            want = 0.5 * s * s * (1 - cos).mean()
            assert stats["identity_distance"] > 0
        assert torch.allclose(got, want, atol=1e-6), (s, got, want)
    # only the crops are decoded: a crop of latent rows 1..5, cols 1..5 decodes to 40x40 pixels
    from firered_core import latents as L
    z = L.denormalize(L.unpack(x0, 64, 64), vae.config)[..., 1:5, 1:5]
    assert vae.decode(z, return_dict=False)[0].shape[-2:] == (32, 32)


def test_identity_gradient_reaches_the_velocity(tiny_model_dir):
    from firered_core.model import load_model

    # a model of its own: the session's shared one may hold weights made under inference_mode by earlier tests
    vae = load_model(tiny_model_dir).vae.float().requires_grad_(False)
    v = torch.randn(1, 16, 64, requires_grad=True)
    x0 = torch.randn(1, 16, 64)
    loss, _ = identity_loss(torch.randn(1, 16, 64), torch.tensor([0.5]), v, x0, [(0, 0, 32, 32)], (64, 64),
                            (64, 64), vae, TinyFaceEmbedder(), IdentityConfig(eta=1.0, input_size=16))
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # tokens outside the face (the right half of the latent grid) get no gradient
    assert v.grad.view(4, 4, 64)[:, 3].abs().max() == 0


def test_embedder_from_torchscript_file_and_factory(tmp_path):
    path = tmp_path / "face.pt"
    torch.jit.script(TinyFaceEmbedder()).save(str(path))
    loaded = load_embedder(str(path))
    x = torch.rand(2, 3, 16, 16)
    assert loaded(x).shape == (2, 16) and not any(p.requires_grad for p in loaded.parameters())
    assert isinstance(load_embedder("torch.nn:Identity"), torch.nn.Identity)
    with pytest.raises(IdentityError, match="neither a file"):
        load_embedder(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(IdentityError, match="bad.pt"):
        load_embedder(str(tmp_path / "bad.pt"))


def test_fp8_base_stores_frozen_linears_in_fp8_and_keeps_trained_ones():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    net[2].requires_grad_(True)
    net[0].requires_grad_(False)
    x = torch.randn(4, 32)
    want = net(x)
    before = sum(t.numel() * t.element_size() for t in net[0].state_dict().values())
    assert store_frozen_fp8(net) == 1
    assert isinstance(net[0], Fp8BaseLinear) and net[0].qweight.dtype == torch.float8_e4m3fn
    assert type(net[2]) is torch.nn.Linear  # trained: untouched
    after = sum(t.numel() * t.element_size() for t in net[0].state_dict().values())
    assert after < 0.5 * before
    got = net(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.08 * want.abs().max()  # e4m3 (2^-4) weights, bf16 matmul


def lora_transformer(model_dir):
    from peft import LoraConfig

    from firered_core.model import load_model

    transformer = load_model(model_dir).transformer.float()
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "img_mlp.net.2"]))
    with torch.no_grad():  # non-zero B so the LoRA changes the output
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return transformer


def lora_step(transformer, ctx=None):
    from firered_core.conditioning import PromptEmbeds
    from firered_core.sampling import transformer_denoiser

    g = torch.Generator().manual_seed(3)
    x, noise = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    cond = PromptEmbeds(torch.randn(1, 5, 64, generator=g), None)
    with ctx if ctx is not None else contextlib.nullcontext():
        pred = transformer_denoiser(transformer, type("R", (), {"tokens": None})(), [(1, 4, 4)])(
            x, torch.tensor([0.5]), cond, "cond")
        loss = (pred - noise).square().mean()
        loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
    transformer.zero_grad(set_to_none=True)
    return float(loss), grads


def test_block_swap_streams_frozen_weights_in_forward_and_backward_with_equal_gradients(tiny_model_dir):
    from firered_core.training.lowvram import LowVram, LowVramConfig

    plain = lora_transformer(tiny_model_dir)
    want_loss, want = lora_step(plain)
    swapped = lora_transformer(tiny_model_dir)
    low = LowVram(LowVramConfig(block_swap=True, resident_blocks=0, offload_activations=True), "lora")
    low.before_prepare(swapped)
    low.after_prepare(swapped, torch.device("cpu"))
    runs = []
    for block in swapped.transformer_blocks:
        block.register_forward_pre_hook(lambda m, a: runs.append(m))
    got_loss, got = lora_step(swapped, low.activations())
    assert got_loss == want_loss and set(got) == set(want)
    diffs = {n: float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want}
    assert max(diffs.values()) < 1e-5, diffs
    # each block ran twice: forward, then again in backward (checkpointing) with its frozen weights streamed in
    assert len(runs) == 2 * len(swapped.transformer_blocks)
    for i, host in low.swap.host.items():
        assert host and all(t.data_ptr() == cpu.data_ptr() for t, cpu in host)  # dropped back after running
        block = swapped.transformer_blocks[i]
        own = {id(t) for t in [*block.parameters(), *block.buffers()]}
        assert all(id(t) in own for t, _ in host)  # the block holds its own (CPU) tensors again, not device copies
        assert not any(t.requires_grad for t, _ in host)  # trained LoRA tensors are never streamed


def test_rejected_image_and_faces_are_read_and_checked(tmp_path):
    import json

    from firered_core.training.data import load_dataset
    from firered_core.training.synthetic import make_dataset

    root = make_dataset(tmp_path / "d", rows=3, rejected=True, faces=True)
    path = root / "recolour" / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["faces"] = [[0, 0, 80, 10]]  # wider than the 64x64 target
    rows[2]["rejected_image"] = "img/missing.png"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(root)
    assert len(ds) == 1 and ds.samples[0].faces == ((0.0, 0.0, 32.0, 32.0),)
    assert ds.samples[0].rejected == root / "recolour" / "img" / "0000_rej.png"
    reasons = sorted(b.reason for b in ds.bad)
    assert "faces[0] [0, 0, 80, 10] is empty or outside the 64x64 target" in reasons[0]
    assert "image not found" in reasons[1] and "missing.png" in reasons[1]


def test_reference_is_the_lora_free_base_or_a_frozen_copy(tiny_model_dir):
    from firered_core.conditioning import PromptEmbeds
    from firered_core.model import load_model
    from firered_core.references import RefLatents
    from firered_core.sampling import transformer_denoiser
    from firered_core.training.preference import Reference

    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(1, 16, 64, generator=g), PromptEmbeds(torch.randn(1, 5, 64, generator=g), None)

    def run(tr):
        with torch.no_grad():
            return transformer_denoiser(tr, RefLatents(None, []), [(1, 4, 4)])(x, torch.tensor([0.5]), cond, "c")

    base = run(load_model(tiny_model_dir).transformer.float())
    lora = lora_transformer(tiny_model_dir)
    assert not torch.allclose(run(lora), base, atol=1e-4)  # the LoRA changes the output
    with Reference(lora, "lora").model() as ref:
        assert ref is lora and torch.allclose(run(ref), base, atol=1e-6)  # same weights, adapter off
    assert not torch.allclose(run(lora), base, atol=1e-4)  # and back on afterwards
    full = load_model(tiny_model_dir).transformer.float()
    reference = Reference(full, "full")
    with torch.no_grad():
        full.transformer_blocks[0].attn.to_q.weight.add_(0.5)  # training moves the model...
    with reference.model() as ref:
        assert ref is not full and torch.allclose(run(ref), base, atol=1e-6)  # ...not its frozen copy
