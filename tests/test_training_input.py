"""Training input that used to crash a run: the typed config (YAML 1.1 pitfalls, overrides by field type, one-line
errors with exit 2), data rows that only look valid, and a damaged latest checkpoint after kill -9."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from firered_core.training.config import ConfigError, load_config
from firered_core.training.data import load_dataset
from firered_core.training.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0)


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_numbers_and_strings_keep_their_field_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-4\nmixed_precision: no\nlora: {rank: 8}\ngradient_checkpointing: true\n"
                        "timesteps: {shift: 3}\nexport_name: 123\n")
    cfg = load_config(cfg_file)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.mixed_precision == "no"
    assert cfg.lora.rank == 8 and cfg.gradient_checkpointing is True and cfg.timesteps.shift == 3.0
    assert cfg.export_name == "123"
    # the docstring example of training/train.py, and the overrides of the YAML 1.1 pitfalls
    cfg = load_config(ROOT / "training" / "configs" / "lora.yaml",
                      ["lr=5e-5", "lora.rank=64", "mixed_precision=no", "resume=null", "lora.targets=[to_q, to_k]",
                       "betas=[0.9, 0.95]", "timesteps.shift=none", "validation.true_cfg=4"])
    assert (cfg.lr, cfg.lora.rank, cfg.mixed_precision, cfg.resume) == (5e-5, 64, "no", None)
    assert cfg.lora.targets == ["to_q", "to_k"] and cfg.betas == (0.9, 0.95) and cfg.timesteps.shift == "none"
    toml = tmp_path / "c.toml"
    toml.write_text('lr = "1e-4"\n[lora]\nrank = 4\n')
    assert load_config(toml).lr == 1e-4


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "config key 'lr': value 'abc' is not a number > 0 and <= 1"),
    ("lr=nan", "config key 'lr': value 'nan' is not a number > 0 and <= 1"),
    ("steps=0", "config key 'steps': value '0' is not an integer >= 1"),
    ("batch_size=1.5", "config key 'batch_size': value '1.5' is not an integer >= 1"),
    ("mixed_precision=false", "config key 'mixed_precision': value 'false' is not one of 'no', 'bf16'"),
    ("method=dora", "config key 'method': value 'dora' is not one of 'lora', 'full'"),
    ("lora.rnk=3", "unknown config key 'lora.rnk' (value '3'); known keys of 'lora': rank, alpha, targets"),
    ("learning_rate=1e-4", "unknown config key 'learning_rate' (value '1e-4'); known keys: model, data"),
    ("lora=3", "config key 'lora': value 3 is not a section of keys (rank, alpha, targets)"),
    ("betas=[0.9]", "config key 'betas': value [0.9] is not a tuple of"),
    ("variants.text_drop=2", "config key 'variants.text_drop': value '2' is not a number >= 0 and <= 1"),
    ("timesteps.shift=fast", "config key 'timesteps.shift': value 'fast' is not one of 'dynamic', 'none'"),
    ("validation.seed=-1", "config key 'validation.seed': value '-1' is not an integer >= 0"),
    ("ema_decay=1", "config key 'ema_decay': value '1' is not a number >= 0 and < 1"),
    ("lr_schedule=cosine_annealing", "config key 'lr_schedule': value 'cosine_annealing' is not one of 'linear'"),
    ("steps", "override 'steps' is not key=value"),
])
def test_config_errors_are_one_line_naming_key_value_and_type(override, message, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "training" / "configs" / "lora.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert script("train").main([str(ROOT / "training" / "configs" / "lora.yaml"), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0]


@pytest.mark.parametrize("text, message", [
    ("lr: [1,\n", "is not valid YAML"),
    ("- a\n- b\n", "holds a list, not a mapping"),
])
def test_broken_config_files_exit_2(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert script("train").main([str(path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(path) in line and message in line


def test_extract_embeddings_data_and_option_errors_exit_2(tiny_model_dir, tmp_path, capsys):
    extract = script("extract_embeddings")
    assert extract.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "none"), "--out",
                         str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("extract_embeddings.py: error: data root") and str(tmp_path / "none") in line
    assert extract.main(["--model", str(tiny_model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                         "--vl-area", "-1"]) == 2
    assert "--vl-area -1.0 is not allowed" in capsys.readouterr().err


def test_truncated_image_and_non_utf8_line_are_bad_rows(tmp_path):
    root = make_dataset(tmp_path / "d", rows=4)
    jsonl = next(root.rglob("*.jsonl"))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    target = jsonl.parent / rows[1]["target_image"]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # a valid PNG header, the pixel data cut off
    with open(jsonl, "ab") as fh:
        fh.write(b'{"instruction": "caf\xe9", "target_image": "x.png"}\n')
    dataset = load_dataset(root)
    assert len(dataset) == 3 and len(dataset.bad) == 2
    reasons = {b.line: str(b) for b in dataset.bad}
    assert f"{jsonl}:2: image unreadable: {target}" in reasons[2]
    assert f"{jsonl}:5: not UTF-8 (byte 0xe9 at column 21)" == reasons[5]


def test_kill_9_then_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path,
                                                                                    caplog):
    from firered_core.training.checkpoint import CheckpointError, checked_checkpoint, latest_checkpoint
    from firered_core.training.trainer import train

    data = make_dataset(tmp_path / "data", rows=4)
    values = {**SMALL, "model": str(tiny_model_dir), "data": str(data), "output_dir": str(tmp_path / "run"),
              "steps": 500, "checkpoint_every": 1, "keep_checkpoints": 3, "lora": {"rank": 4}, "lr": 1e-3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FIRERED_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "training" / "train.py"), str(tmp_path / "c.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            pointer = ckpts / "latest"
            if pointer.exists() and pointer.read_text().strip() >= "step-00000003":
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    latest = ckpts / (ckpts / "latest").read_text().strip()
    step = int(latest.name.split("-")[1])
    recorded = json.loads((latest / "state.json").read_text())["losses"]
    weights = latest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the file cut short

    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(ckpts).name == f"step-{step - 1:08d}"
    assert f"checkpoint {latest.name} is unusable: {weights} has" in caplog.text and "truncated" in caplog.text
    assert "resuming from the previous complete checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match=f"cannot resume from {latest}: {weights} has"):
        checked_checkpoint(latest)

    values.update(steps=step)
    result = train(load_config(None, **values))
    assert list(result.losses)[-1] == step and min(result.losses) == 1
    assert result.losses[step] == pytest.approx(recorded[str(step)], rel=1e-4)  # step N repeated from N - 1
