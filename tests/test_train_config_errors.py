"""train.py on bad configurations: every incompatible switch pair, every missing resource and every post-training
key with a value outside its typed range gives one line naming the key and exit status 2, never a traceback and
never a run that starts and then dies at step 1. The bad values are made from the typed fields themselves (each
bound crossed, each literal missed), so a new key joins the table by itself; the run is train.py's own ``main``
in this process (a subprocess per case would cost seconds each)."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path

import pytest
import yaml

from firered_core.training.config import TrainConfig, load_config
from firered_core.training.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(target_area=64 * 64, reference_area=64 * 64, vl_area=64 * 64, tracker=None, warmup_steps=0, steps=1,
             checkpoint_every=0, resume=None, lr=1e-3, lora={"rank": 4})
POST_TRAINING = ("preference", "identity", "low_vram", "nft", "timesteps", "variants", "alignment")


def train_main():
    spec = importlib.util.spec_from_file_location("firered_train_script", ROOT / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A config file for the tiny model and 2 rows, and an extraction holding only the English embeddings."""
    from firered_core.training.extract import ExtractConfig, extract

    tmp = tmp_path_factory.mktemp("cfg")
    data = make_dataset(tmp / "rows", rows=2)
    extract(ExtractConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp / "en_only"), variants=["en"],
                          vl_area=64 * 64, target_area=64 * 64, reference_area=64 * 64))
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "model": str(tiny_model_dir), "data": str(data),
                                    "output_dir": str(tmp / "out")}))
    return path, tmp


def run(setup, overrides: list[str], capsys) -> tuple[int, list[str]]:
    path, _ = setup
    code = train_main()([str(path), *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def assert_one_line(code: int, err: list[str], *words: str) -> None:
    text = "\n".join(err)
    assert code == 2 and "Traceback" not in text, text[-2000:]
    assert err[-1].startswith("train.py: error: ") and all(w in err[-1] for w in words), err[-1]
    assert not any("train:" in line and "it/s" in line for line in err), "the run had started"


# (overrides, words the error line must hold): switches that cannot work together, and resources a run would
# only miss later
CONFLICTS = {
    "full fine-tune with an fp8 base": (["method=full", "low_vram.fp8_base=true"], ["low_vram.fp8_base", "lora"]),
    "block swap under FSDP": (["low_vram.block_swap=true", "fsdp=true"], ["low_vram.block_swap", "fsdp"]),
    "NFT with DPO": (["nft.enabled=true", "preference.enabled=true", "nft.reward.callable=math:fsum"],
                     ["nft.enabled", "preference.enabled"]),
    "NFT with identity": (["nft.enabled=true", "identity.enabled=true", "identity.embedder=face.pt",
                           "nft.reward.callable=math:fsum"], ["nft.enabled", "identity.enabled"]),
    "DPO with inverse edits": (["preference.enabled=true", "variants.inverse_rate=0.5"], ["variants.inverse_rate"]),
    "extracted embeddings with alignment": (["embeddings={ext}", "alignment.drop_rate=0.5"], ["alignment"]),
    "Chinese rows, English extraction": (["embeddings={ext}", "variants.cn_rate=1", "variants.text_drop=0"],
                                         ["['cn']", "extract"]),
    "dropped text, no empty embedding": (["embeddings={ext}", "variants.text_drop=0.5", "variants.cn_rate=0"],
                                         ["['empty']", "--variants empty en"]),
    "identity without an embedder": (["identity.enabled=true"], ["identity.embedder"]),
    "identity embedder missing": (["identity.enabled=true", "identity.embedder=missing.pt"], ["missing.pt"]),
    "reward callable not importable": (["nft.enabled=true", "nft.reward.callable=no_such_module:f"],
                                       ["no_such_module:f"]),
    "OCR plug-in not importable": (["nft.enabled=true", "nft.reward.kind=typography",
                                    "nft.reward.typography.ocr=no_such_module:engine"], ["no_such_module"]),
}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_incompatible_switches_and_missing_resources(setup, case, capsys):
    overrides, words = CONFLICTS[case]
    _, tmp = setup
    code, err = run(setup, [o.format(ext=tmp / "en_only") for o in overrides], capsys)
    assert_one_line(code, err, *words)


def _bad_values(hint) -> list:
    """Values that miss a typed field: each numeric bound crossed (ge b -> b - 1, gt b -> b, le b -> b + 1,
    lt b -> b), a string that misses its pattern, a word that is none of a literal's choices."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        bad = []
        for meta in args[1:]:
            for item in [meta, *getattr(meta, "metadata", [])]:
                for attr, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                    bound = getattr(item, attr, None)
                    if isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound + step not in bad:
                        bad.append(bound + step)
                if getattr(item, "pattern", None):
                    bad.append("not a valid value!")
        return bad
    if origin is typing.Literal:
        return ["bogus"]
    if origin in (typing.Union, types.UnionType):
        return [v for a in args for v in _bad_values(a) if not _fits_any(v, args)]
    return []


def _fits_any(value, hints) -> bool:
    from pydantic import TypeAdapter, ValidationError

    for hint in hints:
        try:
            TypeAdapter(hint).validate_python(value, strict=False)
            return True
        except ValidationError:
            continue
    return False


def bad_post_training_values() -> list[tuple[str, object]]:
    """(dotted key, bad value) for every typed key of the post-training sections, nested sections included."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls, include_extras=True)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            out.extend((prefix + f.name, v) for v in _bad_values(hint))

    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    for section in POST_TRAINING:
        walk(hints[section], section + ".")
    return out


def test_every_post_training_key_has_a_bad_value_in_the_table():
    keys = {k for k, _ in bad_post_training_values()}
    for must in ("preference.beta", "preference.omega", "preference.sft_weight", "identity.eta", "identity.cutoff",
                 "identity.input_size", "identity.detector_scale", "identity.detector", "low_vram.resident_blocks",
                 "low_vram.compute_dtype", "nft.group_size", "nft.old_decay", "nft.reward.kind",
                 "nft.reward.judge.timeout_s", "nft.reward.typography.max_height", "timesteps.kind",
                 "variants.cn_rate", "alignment.drop_rate"):
        assert must in keys, must
    assert len(keys) >= 40


def test_every_post_training_key_out_of_range_is_one_line(setup, capsys):
    """All in one test (each fails in load_config, before anything is loaded): the value and the key named."""
    cases = bad_post_training_values()
    for key, value in cases:
        code, err = run(setup, [f"{key}={value}"], capsys)
        assert_one_line(code, err, f"'{key}'")
        with pytest.raises(ValueError):  # the library refuses it too (ConfigError is a FireRedError)
            load_config(setup[0], [f"{key}={value}"])


def test_stop_after_is_not_a_config_key(setup, capsys):
    """Test hooks are not user settings: ``stop_after`` is an unknown key."""
    code, err = run(setup, ["stop_after=1"], capsys)
    assert_one_line(code, err, "unknown config key 'stop_after'")
