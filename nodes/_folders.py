"""Where the loaders look: ComfyUI's model folders (``extra_model_paths.yaml`` included), or environment variables
outside ComfyUI, and the pack's example pictures copied into ComfyUI's input folder.

Every list a loader offers is made by one folder walker, :func:`firered_core.paths.walk_folders` (links followed,
each real folder once, a depth limit), so model folders, LoRA files and single files agree on linked folders.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from firered_core.paths import find_in_folders, walk_folders

from . import _comfy

MODEL_FOLDER = "firered"
MODEL_FOLDERS = (MODEL_FOLDER, "diffusers")
MODEL_DIRS_ENV = "FIRERED_MODEL_DIRS"
LORA_FOLDER = "loras"
LORA_DIRS_ENV = "FIRERED_LORA_DIRS"
LORA_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin")
SINGLE_FILE_FOLDERS = {"transformer": ("diffusion_models", "unet"), "text_encoder": ("text_encoders", "clip"),
                       "vae": ("vae",)}
SINGLE_FILE_DIRS_ENV = "FIRERED_SINGLE_FILE_DIRS"
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pt", ".pth", ".bin", ".ckpt")
COMFYUI_DIR_ENV = "FIRERED_COMFYUI_DIR"
EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "example_inputs"


def register_model_folders() -> None:
    """Register ``models/firered`` with ComfyUI (``models/diffusers`` is already known)."""
    if _comfy.IN_COMFY:
        fp = _comfy.folder_paths
        fp.add_model_folder_path(MODEL_FOLDER, os.path.join(fp.models_dir, MODEL_FOLDER), is_default=True)


def _folders(names: tuple[str, ...], env: str) -> list[Path]:
    """ComfyUI's folders for the folder ``names`` it knows, or ``$env`` (path-separated) outside ComfyUI."""
    if _comfy.IN_COMFY:
        fp = _comfy.folder_paths
        return [Path(d) for name in names if name in fp.folder_names_and_paths for d in fp.get_folder_paths(name)]
    return [Path(d) for d in os.environ.get(env, "").split(os.pathsep) if d]


def _files(dirs: list[Path], extensions: tuple[str, ...]) -> list[str]:
    """Relative names of the files with one of ``extensions`` under ``dirs`` (sub-folders included)."""
    names = {(root / f).relative_to(base).as_posix() for base in dirs if base.is_dir()
             for root, files in walk_folders(base) for f in files if Path(f).suffix.lower() in extensions}
    return sorted(names)


def model_dirs() -> list[Path]:
    """Folders searched for model folders: ComfyUI's ``firered`` and ``diffusers`` (or ``$FIRERED_MODEL_DIRS``)."""
    return _folders(MODEL_FOLDERS, MODEL_DIRS_ENV)


def list_model_folders() -> list[str]:
    """Relative names of every folder holding a ``model_index.json`` under :func:`model_dirs`."""
    names = {Path(root).relative_to(base).as_posix() for base in model_dirs() if base.is_dir()
             for root, files in walk_folders(base) if "model_index.json" in files}
    return sorted(names - {"."})


def find_model_folder(name: str) -> Path | None:
    """The folder called ``name`` in the first model folder that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, model_dirs(), "model name", folder=True)


def lora_dirs() -> list[Path]:
    """Folders searched for LoRA files: ComfyUI's ``loras`` (or ``$FIRERED_LORA_DIRS`` outside ComfyUI)."""
    return _folders((LORA_FOLDER,), LORA_DIRS_ENV)


def list_loras() -> list[str]:
    """Relative names of the LoRA files under :func:`lora_dirs` (sub-folders included)."""
    return _files(lora_dirs(), LORA_EXTENSIONS)


def find_lora(name: str) -> Path | None:
    """The LoRA file called ``name`` in the first LoRA folder that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, lora_dirs(), "LoRA name")


def single_file_dirs(kind: str) -> list[Path]:
    """Folders searched for single files of ``kind`` (transformer, text_encoder, vae): ComfyUI's own folders
    (:data:`SINGLE_FILE_FOLDERS`), or ``$FIRERED_SINGLE_FILE_DIRS`` outside it."""
    return _folders(SINGLE_FILE_FOLDERS[kind], SINGLE_FILE_DIRS_ENV)


def list_single_files(kind: str) -> list[str]:
    """Names of every weight file in the folders for ``kind`` (.gguf included, which ComfyUI's own lists omit)."""
    return _files(single_file_dirs(kind), WEIGHT_EXTENSIONS)


def find_single_file(kind: str, name: str) -> Path | None:
    """The file called ``name`` in the first folder for ``kind`` that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, single_file_dirs(kind), f"{kind} file name")


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's own Qwen2.5 tokenizer files (``comfy/text_encoders/qwen25_tokenizer``), used for a single-file
    Qwen2.5-VL; outside ComfyUI found through ``$FIRERED_COMFYUI_DIR`` (None when there is no ComfyUI)."""
    if _comfy.IN_COMFY:
        import comfy

        root = Path(list(comfy.__path__)[0])  # a namespace package in ComfyUI: no __file__
    elif os.environ.get(COMFYUI_DIR_ENV):
        root = Path(os.environ[COMFYUI_DIR_ENV]) / "comfy"
    else:
        return None
    folder = root / "text_encoders" / "qwen25_tokenizer"
    return folder if folder.is_dir() else None


def input_dir() -> Path | None:
    """ComfyUI's input folder (where LoadImage looks); None outside ComfyUI."""
    return Path(_comfy.folder_paths.get_input_directory()) if _comfy.IN_COMFY else None


def install_example_inputs(source: Path = EXAMPLE_INPUTS, target: Path | None = None) -> list[str]:
    """Copy the pack's example pictures into ComfyUI's input folder when absent, so the shipped workflows find
    them on a fresh install. An existing file of the same name is never overwritten (the copy is linked into place
    atomically, failing if the name exists); returns the names copied."""
    target = target or input_dir()
    if target is None or not source.is_dir():
        return []
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(source.glob("*.png")):
        dst = target / src.name
        if dst.exists():
            continue
        tmp = target / f".{src.name}.{os.getpid()}.tmp"
        tmp.write_bytes(src.read_bytes())
        try:
            os.link(tmp, dst)
            copied.append(src.name)
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem: exclusive create, still never overwriting
            with contextlib.suppress(FileExistsError), open(dst, "xb") as f:
                f.write(src.read_bytes())
                copied.append(src.name)
        finally:
            tmp.unlink(missing_ok=True)
    return copied
