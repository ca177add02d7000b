"""End-to-end training on the tiny model and a synthetic recolouring data set (CPU, small sizes, few steps)."""

from __future__ import annotations

import contextlib
import filecmp
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from firered_core.training.config import load_config
from firered_core.training import extract as extract_module
from firered_core.training.extract import ExtractConfig, extract
from firered_core.training.synthetic import make_dataset
from firered_core.training.trainer import Trainer, train

from kills import killed_after_calls  # noqa: E402
from tolerances import step_rtol, trained_rtol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), rows=4, sizes=((64, 64),), sources=(1,))


def config(model_dir, data_dir, out, **kw):
    values = {**SMALL, "model": str(model_dir), "data": str(data_dir), "output_dir": str(out), **kw}
    return load_config(None, **values)


def test_lora_run_lowers_loss_validates_and_exports_a_loadable_lora(model_dir, data_dir, tmp_path):
    from firered_core.lora import apply_loras, remove_loras
    from firered_core.model import load_model
    from firered_core.pipeline import EditPipeline

    cfg = config(model_dir, data_dir, tmp_path / "run", steps=8, lr=2e-2, checkpoint_every=0,
                 tracker="tensorboard", **{"variants.text_drop": 0.0, "validation.every": 8,
                                           "validation.rows": 1, "validation.steps": 2, "lora.rank": 4,
                                           "lora.alpha": 8})
    trainer = Trainer(cfg)
    before = trainer.evaluate(rows=4, draws=1)
    result = trainer.run()
    after = trainer.evaluate(rows=4, draws=1)
    assert after < 0.85 * before, (before, after)
    assert len(result.losses) == 8 and (tmp_path / "run" / "validation" / "step-00000008.png").exists()
    assert list((tmp_path / "run").rglob("events.out.tfevents*"))

    trained_modules = {n.split(".lora_")[0] for n in trainer.trainable}
    model = load_model(model_dir)
    pipe = EditPipeline(model)
    src = [__import__("PIL.Image", fromlist=["Image"]).open(trainer.dataset.samples[0].sources[0]).convert("RGB")]
    edit = dict(steps=2, true_cfg=1.0, width=64, height=64, vl_area=64 * 64, vae_area=64 * 64, output="latent")
    base = pipe.edit(src, "Rotate the colours of Picture 1", **edit).latents
    for style in ("comfy", "diffusers"):
        report = apply_loras(model.transformer, [result.exports[style]])
        assert not report.unmatched and set(report.modules) == trained_modules
        edited = pipe.edit(src, "Rotate the colours of Picture 1", **edit).latents
        assert (edited - base).abs().max() > 1e-3
        remove_loras(model.transformer)
    assert torch.equal(pipe.edit(src, "Rotate the colours of Picture 1", **edit).latents, base)


def kill_training_process(tmp_path: Path, values: dict, step: int) -> None:
    """``training/train.py`` in a real process, SIGKILLed as soon as its step-``step`` checkpoint is in place."""
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "training" / "train.py"), str(tmp_path / "killed.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = Path(values["output_dir"]) / "checkpoints" / f"step-{step:08d}"
    deadline = time.monotonic() + 300
    while not target.is_dir():
        assert proc.poll() is None, f"train.py ended before checkpoint {step}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # it was still running: killed, not finished
    assert not (Path(values["output_dir"]) / "losses.json").exists()


def test_killed_run_resumes_with_identical_losses_and_export_bytes(model_dir, data_dir, tmp_path):
    """A real train.py process is killed after its step-2 checkpoint; the resumed run gives the uninterrupted run's
    losses and exports the same bytes (tensors, and metadata written in sorted order)."""
    kw = dict(steps=3, lr=1e-3, checkpoint_every=2, ema_decay=0.9, batch_size=2,  # step 3 starts the 2nd epoch
              **{"lora.rank": 4, "timesteps.kind": "logit_normal"})
    with torch_threads(1):  # as the killed process runs (OMP_NUM_THREADS=1): the same kernels, the same sums
        full = train(config(model_dir, data_dir, tmp_path / "full", **kw))
    values = {**SMALL, "model": str(model_dir), "data": str(data_dir), "output_dir": str(tmp_path / "cut"),
              "steps": 3, "lr": 1e-3, "checkpoint_every": 2, "ema_decay": 0.9, "batch_size": 2,
              "lora": {"rank": 4}, "timesteps": {"kind": "logit_normal"}}
    kill_training_process(tmp_path, values, 2)
    ckpts = tmp_path / "cut" / "checkpoints"
    (ckpts / ".tmp-step-00000003-999").mkdir()  # a save killed midway: ignored, the previous one is used
    (ckpts / ".tmp-step-00000003-999" / "trainable.safetensors").write_bytes(b"partial")
    with torch_threads(1):
        resumed = train(config(model_dir, data_dir, tmp_path / "cut", **kw))
    assert list(resumed.losses) == [1, 2, 3]
    assert resumed.losses == full.losses  # bit-identical: same data, noise, sigmas and optimizer state
    exports = sorted(p.name for p in (tmp_path / "full" / "export").glob("*.safetensors"))
    assert len(exports) == 4  # trained and EMA LoRA, comfy and diffusers styles
    for name in exports:
        assert filecmp.cmp(tmp_path / "full" / "export" / name, tmp_path / "cut" / "export" / name, shallow=False), \
            name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads (a torchrun rank with OMP_NUM_THREADS=n sums in the same order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)




def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    diff, ref = float((a - b).norm()), float(b.norm())
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


def torchrun_train(tmp_path: Path, name: str, values: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc training/train.py`` on a YAML config (gloo, one thread per process)."""
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
    # tests/ too: configs may name plug-ins defined in test modules (test_posttrain_nft_train:brightness)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    # accelerate's multi-CPU launch is torchrun + gloo (``accelerate launch --cpu`` alone starts one process)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(ROOT / "training" / "train.py"), str(tmp_path / f"{name}.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_run_matches_one_process_gradients(model_dir, data_dir, tmp_path):
    """2 processes (torchrun + gloo, one row each) against 1 process accumulating both rows.

    Rank 0's first-step gradients after DDP's all-reduce equal the 1-process ones, and the second step's loss
    matches, within the bounds of tests/tolerances.py (fp32; both sides use one thread, so the only difference is
    the order of the two-row sum). The trained set includes the last block, whose text-stream tensors get no
    gradient: DDP must not wait for them (it used to skip the all-reduce of their bucket, then fail on the next
    step).
    """
    kw = dict(steps=2, lr=1e-3, checkpoint_every=0, method="full", trainable=["transformer_blocks.1.*", "proj_out.*"])
    with torch_threads(1):
        r1 = train(config(model_dir, data_dir, tmp_path / "one", batch_size=2,
                          dump_grads=str(tmp_path / "g1.safetensors"), **kw))
    two = {**SMALL, "model": str(model_dir), "data": str(data_dir), "output_dir": str(tmp_path / "two"),
           "batch_size": 1, "dump_grads": str(tmp_path / "g2.safetensors"), **kw}
    proc = torchrun_train(tmp_path, "two", two)
    assert "process 1 of 2 (DistributedType.MULTI_CPU): DistributedDataParallel" in proc.stderr, proc.stderr[-3000:]
    g1, g2 = load_file(str(tmp_path / "g1.safetensors")), load_file(str(tmp_path / "g2.safetensors"))
    assert set(g1) == set(g2) and len(g1) > 10
    errors = sorted(((relative_error(g2[k], g1[k]), k) for k in g1), reverse=True)
    assert errors[0][0] <= step_rtol(), errors[:5]
    losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    for s in (1, 2):
        assert float(losses[str(s)]) == pytest.approx(r1.losses[s], rel=trained_rtol(s)), s
    assert (tmp_path / "two" / "export" / "model" / "transformer" / "config.json").exists()


def test_discarded_modules_are_exactly_the_ones_without_effect_and_never_trained(model_dir):
    """The last block's text queries (and their norm), text projection and text MLP do not reach the prediction
    (zero gradient), every other tensor of that block does (the text modulation through its attention-input rows);
    neither the LoRA nor the full fine-tune trains them (under FSDP their zero gradients would let weight decay move
    them)."""
    from firered_core.conditioning import PromptEmbeds
    from firered_core.model import load_model
    from firered_core.references import RefLatents
    from firered_core.sampling import transformer_denoiser
    from firered_core.training.trainer import discarded_modules, mark_trainable

    tr = load_model(model_dir).transformer.requires_grad_(True)
    discarded = discarded_modules(tr)
    assert sorted(discarded) == ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.norm_added_q",
                                 "transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp.net.0.proj",
                                 "transformer_blocks.1.txt_mlp.net.2"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, tr.config.in_channels, generator=g)
    cond = PromptEmbeds(torch.randn(1, 6, tr.config.joint_attention_dim, generator=g), None)
    out = transformer_denoiser(tr, RefLatents(None, []), [(1, 4, 4)])(x, torch.tensor([0.5]), cond, "cond")
    out.square().sum().backward()
    last = {n: p for n, p in tr.named_parameters() if n.startswith("transformer_blocks.1.")}
    assert len(last) > 20
    for name, p in last.items():
        reaches = p.grad is not None and bool(p.grad.abs().max() > 0)
        assert reaches == (not name.startswith(tuple(d + "." for d in discarded))), name
    for method, extra in (("lora", {"lora.rank": 4}), ("full", {"trainable": ["transformer_blocks.1.*"]})):
        tr = load_model(model_dir).transformer
        cfg = load_config(None, model=str(model_dir), data=str(model_dir), output_dir="unused", method=method, **extra)
        names = mark_trainable(tr, cfg)
        assert names and not [n for n in names if n.startswith(tuple(d + "." for d in discarded))], method
        assert any(n.startswith("transformer_blocks.1.img_mlp.") for n in names), method


def test_fsdp_two_process_runs_match_one_process_resume_and_export(model_dir, data_dir, tmp_path):
    """FSDP (accelerate's FullyShardedDataParallel around each QwenImageTransformerBlock) on 2 CPU processes (gloo),
    with EMA (kept on each rank's shards, gathered whole for checkpoints and exports).

    LoRA: 3 steps (one row per process) give the losses of 1 process accumulating both rows; the checkpoints hold the
    files 1 process writes (whole tensors, optimizer keyed by name), their EMA tensors and the exported EMA LoRA
    equal its, all within the bound of tests/tolerances.py for that many steps (the reduce-scatter sums the two rows
    in another order). Resuming the step-2 checkpoint (full-state-dict weights, optimizer and EMA, loaded back into the
    shards) in a fresh run repeats step 3's loss, trained tensors and EMA exactly. The uninterrupted run validated
    with the EMA weights after step 2: proj_out, a LoRA target, sits in FSDP's root unit, whose gathered copy
    outlives validation's no-grad forwards, so step 3 sees whether the trained weights came back into the shards and
    were gathered again. The FSDP checkpoint resumes in 1 process too. The exported LoRAs load with full coverage.
    Full fine-tune, the other way: the 1-process step-1 checkpoint resumes under FSDP; step 2's loss and its EMA
    match within the bound, and the gathered models exported in the HF layout (trained and EMA) load with the
    last checkpoint's tensors.
    Planted by hand, each fails here: no fresh gather around validation (step 3 off by 2.6e-4 relative); the EMA not
    restored on an FSDP resume (step 3's EMA differs); the EMA saved as rank 0's shards, not gathered (wrong shapes:
    the EMA LoRA export fails); the 1-process optimizer state left keyed by index (FSDP cannot load it).
    """
    from firered_core.lora import apply_loras, remove_loras
    from firered_core.model import load_model
    from firered_core.training.config import LORA_TARGETS

    lora = dict(steps=3, lr=1e-3, checkpoint_every=2, ema_decay=0.9, lora={"rank": 4, "targets": [*LORA_TARGETS,
                "proj_out"]}, validation={"every": 2, "rows": 1, "steps": 1})
    full = dict(steps=2, lr=1e-3, checkpoint_every=1, method="full", ema_decay=0.9,
                trainable=["transformer_blocks.1.*", "proj_out.*"])
    with torch_threads(1):
        ref_lora = train(config(model_dir, data_dir, tmp_path / "one_lora", batch_size=2, **lora)).losses
        ref_full = train(config(model_dir, data_dir, tmp_path / "one_full", batch_size=2, **full)).losses
    base = {**SMALL, "model": str(model_dir), "data": str(data_dir), "batch_size": 1, "fsdp": True}

    def losses(out: Path) -> dict[int, float]:
        return {int(k): float(v) for k, v in json.loads((out / "losses.json").read_text()).items()}

    def tensors(run: str, file: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / file))

    def assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float) -> None:
        assert set(ours) == set(ref) and all(ours[k].shape == ref[k].shape for k in ref)
        errors = sorted(((relative_error(ours[k], ref[k]), k) for k in ref), reverse=True)
        assert errors[0][0] <= rel, errors[:5]

    def assert_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
        assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)

    proc = torchrun_train(tmp_path, "fsdp_lora", {**base, "output_dir": str(tmp_path / "fsdp_lora"), **lora})
    for rank in (0, 1):
        assert f"process {rank} of 2 (DistributedType.FSDP): FullyShardedDataParallel" in proc.stderr, \
            proc.stderr[-3000:]
    two = losses(tmp_path / "fsdp_lora")
    assert list(two) == [1, 2, 3]
    for s in two:
        assert two[s] == pytest.approx(ref_lora[s], rel=trained_rtol(s)), s
    step2 = tmp_path / "fsdp_lora" / "checkpoints" / "step-00000002"
    assert json.loads((step2 / "state.json").read_text())["step"] == 2
    moments = load_file(str(step2 / "optimizer.safetensors"))  # torch 2.14 aliased them on CPU with cpu_offload
    assert all(not torch.equal(moments[k], moments[k + "_sq"]) for k in moments
               if k.endswith("::exp_avg") and moments[k].abs().sum() > 0)
    for file in ("trainable", "optimizer"):  # the files 1 process writes: whole tensors, keyed by name
        ours, ref = (tensors(run, f"checkpoints/step-00000002/{file}.safetensors") for run in ("fsdp_lora", "one_lora"))
        assert set(ours) == set(ref) and all(ours[k].shape == ref[k].shape for k in ref), file
    ema = tensors("fsdp_lora", "checkpoints/step-00000002/ema.safetensors")
    assert_close(ema, tensors("one_lora", "checkpoints/step-00000002/ema.safetensors"), trained_rtol(2))
    weights = tensors("fsdp_lora", "checkpoints/step-00000002/trainable.safetensors")
    assert any("proj_out" in k for k in ema) and any(not torch.equal(ema[k], weights[k]) for k in ema)
    for style in ("comfy", "diffusers"):
        name = f"export/firered_lora_ema_{style}.safetensors"
        assert_close(tensors("fsdp_lora", name), tensors("one_lora", name), trained_rtol(3))
    assert (tmp_path / "fsdp_lora" / "validation" / "step-00000002.png").exists()

    proc = torchrun_train(tmp_path, "fsdp_resumed", {**base, "output_dir": str(tmp_path / "fsdp_resumed"),
                                                     "resume": str(step2), **{**lora, "validation": {"every": 0}}})
    assert f"resumed from {step2} at step 2" in proc.stderr, proc.stderr[-3000:]
    resumed = tmp_path / "fsdp_resumed" / "checkpoints"
    assert [p.name for p in resumed.glob("step-*")] == ["step-00000003"]  # only step 3 ran
    assert losses(tmp_path / "fsdp_resumed") == two  # steps 1-2 from the checkpoint, step 3 recomputed identically
    for file in ("trainable", "ema"):  # the Adam state and the EMA came back exactly too
        assert_equal(tensors("fsdp_resumed", f"checkpoints/step-00000003/{file}.safetensors"),
                     tensors("fsdp_lora", f"checkpoints/step-00000003/{file}.safetensors"))
    assert_equal(tensors("fsdp_resumed", "export/firered_lora_ema_comfy.safetensors"),
                 tensors("fsdp_lora", "export/firered_lora_ema_comfy.safetensors"))
    with torch_threads(1):  # and the FSDP checkpoint resumes in 1 process, as the 1-process one does
        back = train(config(model_dir, data_dir, tmp_path / "back", batch_size=2, resume=str(step2), **lora))
    for s in ref_lora:
        assert back.losses[s] == pytest.approx(ref_lora[s], rel=trained_rtol(s)), s
    assert_close(tensors("back", "checkpoints/step-00000003/ema.safetensors"),
                 tensors("one_lora", "checkpoints/step-00000003/ema.safetensors"), trained_rtol(3))

    trained = tensors("fsdp_lora", "checkpoints/step-00000003/trainable.safetensors")
    modules = {k.split(".lora_")[0] for k in trained}
    transformer = load_model(model_dir).transformer
    for name in ("firered_lora", "firered_lora_ema"):
        for style in ("comfy", "diffusers"):
            report = apply_loras(transformer, [tmp_path / "fsdp_lora" / "export" / f"{name}_{style}.safetensors"])
            assert not report.unmatched and set(report.modules) == modules and len(modules) > 20
            remove_loras(transformer)

    step1 = tmp_path / "one_full" / "checkpoints" / "step-00000001"  # the other way: 1 process's, under FSDP
    proc = torchrun_train(tmp_path, "fsdp_full", {**base, "output_dir": str(tmp_path / "fsdp_full"),
                                                  "resume": str(step1), **full})
    assert f"resumed from {step1} at step 1" in proc.stderr, proc.stderr[-3000:]
    two = losses(tmp_path / "fsdp_full")
    for s in (1, 2):
        assert two[s] == pytest.approx(ref_full[s], rel=trained_rtol(s)), s
    last = "checkpoints/step-00000002/"
    assert_close(tensors("fsdp_full", last + "ema.safetensors"), tensors("one_full", last + "ema.safetensors"),
                 trained_rtol(2))
    original = load_model(model_dir).transformer.state_dict()
    for folder, file in (("model", "trainable"), ("model_ema", "ema")):
        trained = tensors("fsdp_full", last + f"{file}.safetensors")
        exported = load_model(tmp_path / "fsdp_full" / "export" / folder).transformer.state_dict()
        assert set(exported) == set(original) and len(trained) > 10
        for name, value in exported.items():
            assert torch.equal(value, trained[name] if name in trained else original[name]), (folder, name)
        assert any(not torch.equal(trained[n], original[n]) for n in trained)


def test_extraction_resumes_after_a_crash_and_matches_online_training(model_dir, data_dir, tmp_path):
    kw = dict(model=str(model_dir), data=str(data_dir), vl_area=64 * 64, cache_latents=True,
              target_area=64 * 64, reference_area=64 * 64)
    whole = extract(ExtractConfig(output_dir=str(tmp_path / "whole"), **kw))
    assert whole["encoded"] == 4
    cfg = ExtractConfig(output_dir=str(tmp_path / "cut"), **kw)
    with killed_after_calls(extract_module, "write_safetensors", 2):  # the process dies after its second row file
        extract(cfg)
    done = sorted((tmp_path / "cut" / "rows").rglob("*.safetensors"))
    assert len(done) == 2 and not (tmp_path / "cut" / "manifest.json").exists()
    (done[0].parent / f".{done[0].name}.123.tmp").write_bytes(b"half a file")
    again = extract(cfg)
    assert again["encoded"] == 2 and again["skipped"] == 2
    for folder in ("rows", "embeds"):  # row files reference the shared-format embedding files by key
        files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole" / folder).rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(tmp_path / "cut")
                                         for p in (tmp_path / "cut" / folder).rglob("*.safetensors"))
        for rel in files:
            assert filecmp.cmp(tmp_path / "whole" / rel, tmp_path / "cut" / rel, shallow=False)
    manifest = yaml.safe_load((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["prompt_mode"] == "pipeline" and len(manifest["rows"]) == 4

    common = dict(steps=1, **{"variants.text_drop": 0.3, "variants.inverse_rate": 0.5})
    online = Trainer(config(model_dir, data_dir, tmp_path / "on", **common)).evaluate(rows=4, draws=1)
    cached = Trainer(config(model_dir, data_dir, tmp_path / "off", embeddings=str(tmp_path / "cut"),
                            **common)).evaluate(rows=4, draws=1)
    assert cached == pytest.approx(online, rel=step_rtol())  # the same forward, batched differently
    with pytest.raises(ValueError, match="prompt mode"):
        Trainer(config(model_dir, data_dir, tmp_path / "x", embeddings=str(tmp_path / "cut"), prompt_mode="chat"))


def first_row_gradients(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first row of the first step (fixed sigma and noise)."""
    batch = trainer.sampler.next()
    inputs = trainer.row_inputs(trainer.dataset.samples[batch.indices[0]], batch.key, batch.step, 0)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.row_loss(inputs, batch.step, 0)
    trainer.acc.backward(loss)
    return float(loss.detach()), {n: p.grad.clone() for n, p in trainer.named_trainable().items() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(model_dir, data_dir, tmp_path, monkeypatch):
    import torch.utils.checkpoint as checkpoint

    calls = []
    real = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(steps=1, method="full", trainable=["transformer_blocks.*", "proj_out.*"])
    with_ckpt = first_row_gradients(Trainer(config(model_dir, data_dir, tmp_path / "a", gradient_checkpointing=True,
                                                   **kw)))
    assert len(calls) == 2  # one per block of the tiny model
    plain = first_row_gradients(Trainer(config(model_dir, data_dir, tmp_path / "b", **kw)))
    assert len(calls) == 2
    assert with_ckpt[0] == pytest.approx(plain[0], rel=step_rtol())
    assert set(with_ckpt[1]) == set(plain[1]) and len(plain[1]) > 20
    errors = sorted(((relative_error(with_ckpt[1][k], plain[1][k]), k) for k in plain[1]), reverse=True)
    assert errors[0][0] <= step_rtol(), errors[:5]  # recomputed activations: the forward's order may differ


def test_bf16_mixed_precision_step_has_finite_loss(model_dir, data_dir, tmp_path):
    trainer = Trainer(config(model_dir, data_dir, tmp_path / "run", steps=1, mixed_precision="bf16", lr=1e-2,
                             **{"lora.rank": 4}))
    seen = []
    block = trainer.module.transformer_blocks[0]
    handle = block.attn.to_q.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in trainer.named_trainable().items()}
    loss = trainer.train_step()
    handle.remove()
    assert math.isfinite(loss) and seen == [torch.bfloat16]
    after = trainer.named_trainable()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], p) for n, p in after.items())
