"""Every loader input of every node (a list of names from a model folder, checked by the node's VALIDATE_INPUTS
instead of ComfyUI's list check) refuses names that leave its folders, both in VALIDATE_INPUTS and when the node
runs: '..', absolute paths and NUL bytes. The file outside is a real, loadable one, so a loader that followed the
name would open it. A link that the folder's owner placed in a model folder is followed, as ComfyUI does."""

from __future__ import annotations

import inspect
import os

import pytest

import nodes_support as S  # noqa: E402

from firered_core.errors import FireRedError  # noqa: E402


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Model, LoRA and single-file folders with one good entry each, a secret outside them and links to it."""
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "model" / "model_index.json").write_text("{}")
    (outside / "secret.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    roots = {}
    for env, name in (("FIRERED_MODEL_DIRS", "models"), ("FIRERED_LORA_DIRS", "loras"),
                      ("FIRERED_SINGLE_FILE_DIRS", "single")):
        root = tmp_path / name
        (root / "good").mkdir(parents=True)
        (root / "good" / "model_index.json").write_text("{}")
        (root / "good.safetensors").write_bytes(b"")
        os.symlink(outside / "model", root / "escape")  # a link out of the folder, to a folder ...
        os.symlink(outside / "secret.safetensors", root / "escape.safetensors")  # ... and to a file
        monkeypatch.setenv(env, str(root))
        roots[name] = root
    return outside


def loader_inputs() -> list[tuple[str, str]]:
    """(node, input) for every input that is a list of names and is checked by the node's VALIDATE_INPUTS."""
    found = []
    for node, cls in sorted(S.classes().items()):
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is None:
            continue
        checked = set(inspect.signature(validate).parameters)
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, value in spec.get(group, {}).items():
                if isinstance(value[0], list) and name in checked and name.endswith("_name"):
                    found.append((node, name))
    return found


def good_value(name: str, value) -> object:
    if isinstance(value[0], list):
        return "good" if name == "model_name" else "good.safetensors"
    options = value[1] if len(value) > 1 else {}
    return options.get("default")


def bad_names(outside) -> dict[str, str]:
    return {"dotdot": "../outside/secret.safetensors", "nested dotdot": "good/../../outside/model",
            "absolute": str(outside / "secret.safetensors"), "absolute folder": str(outside / "model"),
            "NUL": "good.safetensors\x00.txt"}


def test_every_loader_input_is_found():
    """The walk below covers the three loaders' five name inputs (a new loader input joins it by itself)."""
    assert set(loader_inputs()) >= {("FireRedModelLoader", "model_name"), ("FireRedLoraLoader", "lora_name"),
                                    ("FireRedSingleFileLoader", "transformer_name"),
                                    ("FireRedSingleFileLoader", "text_encoder_name"),
                                    ("FireRedSingleFileLoader", "vae_name")}


@pytest.mark.parametrize("kind", ["dotdot", "nested dotdot", "absolute", "absolute folder", "NUL"])
def test_loader_inputs_refuse_names_leaving_their_folders(folders, kind):
    classes = S.classes()
    for node, input_name in loader_inputs():
        bad = bad_names(folders)[kind]
        cls = classes[node]
        spec = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        values = {name: good_value(name, value) for name, value in spec.items()}
        checked = inspect.signature(cls.VALIDATE_INPUTS).parameters
        assert cls.VALIDATE_INPUTS(**{k: values[k] for k in checked}) is True, (node, "the good names pass")
        values[input_name] = bad
        verdict = cls.VALIDATE_INPUTS(**{k: values[k] for k in checked})
        assert isinstance(verdict, str) and f"input '{input_name}'" in verdict and repr(bad) in verdict, \
            (node, input_name, verdict)
        assert any(word in verdict for word in ("'..'", "absolute", "NUL")), verdict
        with pytest.raises(FireRedError) as err:  # and when it runs (ComfyUI may skip VALIDATE_INPUTS)
            getattr(cls(), cls.FUNCTION)(**values)
        assert f"input '{input_name}'" in str(err.value) and "\n" not in str(err.value), (node, input_name)


def test_links_placed_in_a_model_folder_are_listed_and_followed(folders, tmp_path):
    """Models linked in from another disk (the usual set-up, and what ComfyUI's folder_paths follows) are offered
    and found at the link's own path; a name can still not walk out through a link with '..'."""
    folders_module = S.submodule("_folders")
    assert folders_module.list_model_folders() == ["escape", "good"]
    assert folders_module.list_loras() == ["escape.safetensors", "good.safetensors"]
    assert folders_module.find_lora("escape.safetensors") == tmp_path / "loras" / "escape.safetensors"
    with pytest.raises(FireRedError, match="'..'"):
        folders_module.find_lora("escape/../../outside/secret.safetensors")


def test_a_link_inside_the_folder_is_still_followed(folders, tmp_path):
    """Links that stay inside the folder are fine (a second name for a file of the same folder)."""
    folders_module = S.submodule("_folders")
    os.symlink(tmp_path / "loras" / "good.safetensors", tmp_path / "loras" / "alias.safetensors")
    assert folders_module.find_lora("alias.safetensors") == tmp_path / "loras" / "alias.safetensors"
    assert folders_module.find_lora("missing.safetensors") is None
    assert "alias.safetensors" in folders_module.list_loras()
