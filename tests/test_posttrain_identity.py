"""Identity-consistency training on the tiny model with a tiny face embedder (TorchScript) made here."""

from __future__ import annotations

import pytest
import torch

from firered_core.sampling import noised_start, transformer_denoiser
from firered_core.training.buckets import bucket_key
from firered_core.training.config import load_config
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer

from test_posttrain_units import TinyFaceEmbedder  # noqa: E402

SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0,
             checkpoint_every=0, resume=None)


@torch.no_grad()
def face_distance(trainer: Trainer, sigma: float = 0.5) -> float:
    """Mean embedding distance of x0_hat's faces to the target's at a fixed sigma and noise, over the rows."""
    out = []
    for i, sample in enumerate(trainer.dataset.samples):
        inputs = trainer.row_inputs(sample, bucket_key(sample), 10**9, i)
        noise = torch.randn(inputs.x0.shape, generator=torch.Generator().manual_seed(i))
        s = torch.tensor([sigma])
        xt = noised_start(inputs.x0, noise, s)
        pred = transformer_denoiser(trainer.transformer, inputs.ref, inputs.img_shapes)(xt, s, inputs.cond, "cond")
        out.append(trainer.objective.identity.row_loss(sample, inputs, xt, s, pred)[1]["identity_distance"])
    return sum(out) / len(out)


def test_identity_training_lowers_the_face_embedding_distance(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "faces", rows=2, faces=True)
    torch.manual_seed(0)
    torch.jit.script(TinyFaceEmbedder()).save(str(tmp_path / "face.pt"))
    cfg = load_config(None, **SMALL, model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"),
                      steps=4, lr=5e-2, **{"lora.rank": 4, "variants.text_drop": 0.0, "timesteps.shift": None,
                                           "identity.enabled": True, "identity.eta": 1000.0,
                                           "identity.embedder": str(tmp_path / "face.pt"),
                                           "identity.input_size": 16})
    trainer = Trainer(cfg)
    before = face_distance(trainer)
    seen = []
    for _ in range(cfg.steps):
        trainer.train_step()
        seen.append(trainer.stats.get("identity_distance"))
    after = face_distance(trainer)
    assert any(v is not None for v in seen), seen  # the term was on (sigma < 0.9) in some step
    assert after < 0.7 * before, (before, after)


def test_identity_needs_an_embedder_and_checks_its_ranges():
    from firered_core.training.config import ConfigError
    from firered_core.training.identity import IdentityConfig, IdentityError, IdentityObjective

    with pytest.raises(IdentityError, match="identity.embedder"):
        IdentityObjective(IdentityConfig(enabled=True), vae=None)
    with pytest.raises(ConfigError, match="identity.cutoff"):
        load_config(None, **{"identity.cutoff": 1.5})
