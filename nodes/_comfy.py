"""The one place that touches ComfyUI (``comfy.*``, ``folder_paths``, ``latent_preview``).

Each helper falls back to plain behaviour when ComfyUI is absent, so every node runs in tests without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from firered_core import preview as P
from firered_core.model import Placement
from firered_core.paths import find_in_folders, walk_folders

try:
    import comfy.model_management as _mm
    import comfy.utils as _cu
    import folder_paths as _fp
except ImportError:
    _mm = _cu = _fp = None

IN_COMFY = _fp is not None
log = logging.getLogger(__name__)
MODEL_FOLDER = "firered"
MODEL_FOLDERS = (MODEL_FOLDER, "diffusers")
MODEL_DIRS_ENV = "FIRERED_MODEL_DIRS"
LORA_FOLDER = "loras"
LORA_DIRS_ENV = "FIRERED_LORA_DIRS"
LORA_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin")
PREVIEW_SIZE = 512


def register_model_folders() -> None:
    """Register ``models/firered`` with ComfyUI (``models/diffusers`` is already known)."""
    if IN_COMFY:
        _fp.add_model_folder_path(MODEL_FOLDER, os.path.join(_fp.models_dir, MODEL_FOLDER), is_default=True)


EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "example_inputs"


def input_dir() -> Path | None:
    """ComfyUI's input folder (where LoadImage looks); None outside ComfyUI."""
    return Path(_fp.get_input_directory()) if IN_COMFY else None


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


def model_dirs() -> list[Path]:
    """Folders searched for model folders: ComfyUI's ``firered`` and ``diffusers`` (or ``$FIRERED_MODEL_DIRS``)."""
    if IN_COMFY:
        dirs = [d for name in MODEL_FOLDERS if name in _fp.folder_names_and_paths for d in _fp.get_folder_paths(name)]
    else:
        dirs = [d for d in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if d]
    return [Path(d) for d in dirs]


def list_model_folders() -> list[str]:
    """Relative names of every folder holding a ``model_index.json`` under :func:`model_dirs`."""
    names: list[str] = []
    for base in model_dirs():
        if not base.is_dir():
            continue
        for root, files in walk_folders(base):
            if "model_index.json" in files:
                name = Path(root).relative_to(base).as_posix()
                if name != "." and name not in names:
                    names.append(name)
    return sorted(names)


def find_model_folder(name: str) -> Path | None:
    """The folder called ``name`` in the first model folder that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, model_dirs(), "model name", folder=True)


def lora_dirs() -> list[Path]:
    """Folders searched for LoRA files: ComfyUI's ``loras`` (or ``$FIRERED_LORA_DIRS`` outside ComfyUI)."""
    if IN_COMFY:
        return [Path(d) for d in _fp.get_folder_paths(LORA_FOLDER)]
    return [Path(d) for d in os.environ.get(LORA_DIRS_ENV, "").split(os.pathsep) if d]


def list_loras() -> list[str]:
    """Relative names of the LoRA files under :func:`lora_dirs` (sub-folders included)."""
    if IN_COMFY:
        return sorted(_fp.get_filename_list(LORA_FOLDER))
    names: list[str] = []
    for base in lora_dirs():
        if base.is_dir():
            names += [(root / f).relative_to(base).as_posix() for root, files in walk_folders(base) for f in files
                      if Path(f).suffix.lower() in LORA_EXTENSIONS]
    return sorted(set(names))


def find_lora(name: str) -> Path | None:
    """The LoRA file called ``name`` in the first LoRA folder that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, lora_dirs(), "LoRA name")


SINGLE_FILE_FOLDERS = {"transformer": ("diffusion_models", "unet"), "text_encoder": ("text_encoders", "clip"),
                       "vae": ("vae",)}
SINGLE_FILE_DIRS_ENV = "FIRERED_SINGLE_FILE_DIRS"
COMFYUI_DIR_ENV = "FIRERED_COMFYUI_DIR"
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pt", ".pth", ".bin", ".ckpt")


def single_file_dirs(kind: str) -> list[Path]:
    """Folders searched for single files of ``kind`` (transformer, text_encoder, vae): ComfyUI's own folders
    (:data:`SINGLE_FILE_FOLDERS`, extra_model_paths.yaml included), or ``$FIRERED_SINGLE_FILE_DIRS`` outside it."""
    if IN_COMFY:
        return [Path(d) for name in SINGLE_FILE_FOLDERS[kind] if name in _fp.folder_names_and_paths
                for d in _fp.get_folder_paths(name)]
    return [Path(d) for d in os.environ.get(SINGLE_FILE_DIRS_ENV, "").split(os.pathsep) if d]


def _weight_files(base: Path) -> list[str]:
    """Relative names of the weight files under ``base`` (ComfyUI's lists leave out .gguf, so we walk ourselves)."""
    if not base.is_dir():
        return []
    return [p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.suffix.lower() in WEIGHT_EXTENSIONS and p.is_file()]


def list_single_files(kind: str) -> list[str]:
    """Names of every weight file in the folders for ``kind``, as ComfyUI's own loaders list them."""
    return sorted({name for base in single_file_dirs(kind) for name in _weight_files(base)})


def find_single_file(kind: str, name: str) -> Path | None:
    """The file called ``name`` in the first folder for ``kind`` that has it (a name leaving them: UnsafeNameError)."""
    return find_in_folders(name, single_file_dirs(kind), f"{kind} file name")


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's own Qwen2.5 tokenizer files (``comfy/text_encoders/qwen25_tokenizer``), used for a single-file
    Qwen2.5-VL; outside ComfyUI found through ``$FIRERED_COMFYUI_DIR`` (None when there is no ComfyUI)."""
    if IN_COMFY:
        import comfy

        root = Path(list(comfy.__path__)[0])  # a namespace package in ComfyUI: no __file__
    elif os.environ.get(COMFYUI_DIR_ENV):
        root = Path(os.environ[COMFYUI_DIR_ENV]) / "comfy"
    else:
        return None
    folder = root / "text_encoders" / "qwen25_tokenizer"
    return folder if folder.is_dir() else None


def torch_device() -> torch.device:
    if IN_COMFY:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE and LATENT outputs live between nodes."""
    return _mm.intermediate_device() if IN_COMFY else torch.device("cpu")


def native_vae_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Decode with ComfyUI's VAE object as its VAE Decode node does: IMAGE ``[B, H, W, C]`` (frames folded in)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().clamp(0, 1)


def native_vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode an IMAGE ``[B, H, W, 3]`` with ComfyUI's VAE object, as its VAE Encode node does (raw latent)."""
    return vae.encode(pixels)


def soft_empty_cache() -> None:
    if IN_COMFY:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


class Interrupted(Exception):
    """Raised when the user cancels outside ComfyUI (ComfyUI raises its own exception)."""


_interrupt = threading.Event()


def interrupt() -> None:
    """Request cancellation of the running node (outside ComfyUI; ComfyUI has its own Cancel button)."""
    _interrupt.set()


def throw_if_interrupted() -> None:
    if IN_COMFY:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("processing interrupted")


class _PlainProgressBar:
    """Stand-in for ``comfy.utils.ProgressBar`` that records its updates."""

    def __init__(self, total: int):
        self.total, self.current, self.updates = total, 0, []

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.total = total or self.total
        self.current = min(value, self.total)
        self.updates.append((self.current, self.total, preview))


def progress_bar(total: int):
    return _cu.ProgressBar(total) if IN_COMFY else _PlainProgressBar(total)


def previewer() -> Callable[[torch.Tensor], object | None]:
    """A function from a normalised 5-D latent to a preview for ``ProgressBar.update_absolute``.

    In ComfyUI it is the user's chosen previewer for the Wan 2.1 latent space (None when previews are off).
    """
    if IN_COMFY:
        try:
            import comfy.latent_formats
            import latent_preview
        except ImportError:
            return lambda z: None
        impl = latent_preview.get_previewer(torch_device(), comfy.latent_formats.Wan21())
        if impl is None:
            return lambda z: None
        return lambda z: impl.decode_latent_to_preview_image("JPEG", z)
    return lambda z: ("JPEG", P.latent_to_rgb(z), PREVIEW_SIZE)


# ---------------------------------------------------------------- ComfyUI's memory manager

FREE_MARGIN = 1.2  # room asked for beyond a component's weights (activations), as a factor
COMPONENT_CLASS = {"transformer": "FireRedTransformer", "vae": "FireRedVAE", "text_encoder": "FireRedTextEncoder"}


class ComponentHolder(torch.nn.Module):
    """A FireRed component as ComfyUI's ``ModelPatcher`` expects a model: the attributes its loader reads and writes
    live here (diffusers / transformers models have a read-only ``device``), the weights in ``inner``."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = module
        self.device = device
        self.model_loaded_weight_memory = 0
        self.lowvram_patch_counter = 0
        self.model_lowvram = False
        self.current_weight_patches_uuid = None


def holder_for(name: str, module: torch.nn.Module, device: torch.device) -> ComponentHolder:
    """The holder, of a class named for the component (ComfyUI logs "Requested to load FireRedTransformer")."""
    cls = type(COMPONENT_CLASS.get(name, "FireRedComponent"), (ComponentHolder,), {})
    return cls(module, device)


class PlainMemoryManager:
    """ComfyUI's memory-manager contract without ComfyUI (tests, scripts): a list of loaded handles, most recent
    first; loading one frees others (least recent first) until it fits in ``budget`` bytes (None = unlimited)."""

    def __init__(self, budget: int | None = None, offload: torch.device = torch.device("cpu")):
        self.budget, self.offload, self.loaded = budget, offload, []

    def wrap(self, name: str, module: torch.nn.Module, device: torch.device):
        return holder_for(name, module, device)

    def size(self, handle) -> int:
        from firered_core.memory import weight_bytes

        return weight_bytes(handle)

    def free_bytes(self, device: torch.device) -> int | None:
        return None if self.budget is None else self.budget - sum(self.size(h) for h in self.loaded)

    def free(self, nbytes: int, device: torch.device) -> None:
        while self.loaded and self.budget is not None and self.free_bytes(device) < nbytes:
            self.unload(self.loaded[-1])

    def load(self, handle) -> None:
        if handle in self.loaded:
            self.loaded.remove(handle)
        self.free(self.size(handle), handle.device)
        handle.to(handle.device)
        self.loaded.insert(0, handle)

    def unload(self, handle) -> None:
        if handle in self.loaded:
            self.loaded.remove(handle)
            handle.to(self.offload)

    def unload_all(self) -> None:
        for handle in list(self.loaded):
            self.unload(handle)


class ComfyMemoryManager:
    """ComfyUI's own memory manager: each component a ``ModelPatcher`` loaded with ``load_models_gpu`` (so ComfyUI
    frees its other models for it, unloads it for them, and its Unload Models / Free buttons and POST /free reach
    it)."""

    def wrap(self, name: str, module: torch.nn.Module, device: torch.device):
        import comfy.model_patcher

        return comfy.model_patcher.ModelPatcher(holder_for(name, module, device), load_device=device,
                                                offload_device=_mm.unet_offload_device())

    def size(self, handle) -> int:
        return handle.model_size()

    def free_bytes(self, device: torch.device) -> int | None:
        return None if device.type == "cpu" else _mm.get_free_memory(device)

    def free(self, nbytes: int, device: torch.device) -> None:
        _mm.free_memory(nbytes, device)

    def load(self, handle) -> None:
        _mm.load_models_gpu([handle], force_full_load=True)

    def unload(self, handle) -> None:
        for loaded in list(_mm.current_loaded_models):
            if loaded.model is handle:
                loaded.model_unload()
                _mm.current_loaded_models.remove(loaded)

    @property
    def loaded(self) -> list:
        return [m.model for m in _mm.current_loaded_models if m.model is not None]


def memory_manager():
    return ComfyMemoryManager() if IN_COMFY else PlainMemoryManager()


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def _where(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


class ManagedPlacement(Placement):
    """The :class:`firered_core.model.Placement` of FireRed models inside ComfyUI: before a component runs it is
    handed to the memory manager (which frees ComfyUI's other models to make room and moves it to the device), and
    it stays known there, so ComfyUI can unload it for its own models and its Unload Models / Free buttons and
    POST /free unload it. ``offload="model"`` hands it back right after it ran.

    A component larger than the free memory even after ComfyUI freed everything it could runs a fallback for that
    run, after a log line, instead of running out of memory (:meth:`fallback`): the transformer with block swap, the
    text encoder with its decoder layers streamed (or, when not even that fits, on the offload device), the VAE tiled
    (or on the offload device). The fallback is undone when the component is released: no hooks left, the weights
    back on the offload device, and the next run decides again from the free memory then. A resident VAE retries
    tiled when a decode / encode runs out of memory (its room to work depends on the picture, which is not known
    here)."""

    def __init__(self, manager=None):
        self.manager = manager or memory_manager()
        self.handles: dict[str, tuple[torch.nn.Module, object]] = {}
        self.undo: dict[str, Callable[[], None]] = {}

    def home_device(self, model, name: str) -> torch.device:
        return torch.device("cpu") if model.device.type != "cpu" else model.device

    def handle(self, model, name: str, module: torch.nn.Module):
        """The manager's handle of ``module`` (one per component name: a new module, e.g. a LoRA view's
        transformer, replaces the old one, which is unloaded first)."""
        old = self.handles.get(name)
        if old is not None and old[0] is module:
            return old[1]
        if old is not None:
            self.manager.unload(old[1])
        handle = self.manager.wrap(name, module, model.device)
        self.handles[name] = (module, handle)
        return handle

    def acquire(self, model, name: str, module: torch.nn.Module):
        from firered_core.memory import is_block_swapped

        if is_block_swapped(module):  # the user's own block swap (speed settings) places the weights
            return module
        handle = self.handle(model, name, module)
        size = self.manager.size(handle)
        need = int(size * FREE_MARGIN)
        self.manager.free(need, model.device)
        free = self.manager.free_bytes(model.device)
        if free is None or need <= free:
            self.manager.load(handle)
            if name == "vae" and getattr(module, "use_tiling", True) is False:
                from firered_core.memory import TiledOnOOM

                return TiledOnOOM(module)  # its room to work depends on the picture: tiles if it runs short
            return module
        return self.fallback(model, name, module, handle, size, free)

    def fallback(self, model, name: str, module: torch.nn.Module, handle, size: int, free: int):
        """Run ``module`` (``size`` bytes of weights, more than fit in ``free`` with room to work) without running
        out of memory; the way back is kept in :attr:`undo` for :meth:`release`."""
        from firered_core import memory

        room = max(0, int(free / FREE_MARGIN))
        what = f"the {name.replace('_', ' ')} ({_gb(size)}) does not fit in the {_gb(free)} free on {model.device}"
        if name == "vae" and hasattr(module, "enable_tiling") and size <= free:  # weights fit, not the work
            self.manager.load(handle)
            was = bool(getattr(module, "use_tiling", False))
            memory.enable_vae_tiling(module, True)
            log.warning("FireRed: %s with room to work; decoding / encoding it in tiles", what)
            self.undo[name] = lambda: memory.enable_vae_tiling(module, was)
            return module
        self.manager.unload(handle)
        home = _where(module)
        blocks = (getattr(module, "transformer_blocks", None) if name == "transformer" else
                  memory.text_encoder_layers(module) if name == "text_encoder" else None)
        resident = None if blocks is None else memory.fit_resident(size, [memory.weight_bytes(b) for b in blocks],
                                                                    room)
        if blocks is not None and (resident is not None or name == "transformer"):
            resident = resident or 0
            unit = "blocks" if name == "transformer" else "decoder layers"
            log.warning("FireRed: %s; running it with block swap (%d of %d %s resident, the rest streamed) instead "
                        "of running out of memory", what, resident, len(blocks), unit)
            swap = memory.BlockSwap(module, resident, model.device, blocks=blocks)
            self.undo[name] = lambda: swap.remove(to=home)
            return module
        log.warning("FireRed: %s%s; running it on %s (slow) instead of running out of memory", what,
                    ", not even with its decoder layers streamed" if blocks is not None else "", home)
        self.undo[name] = lambda: None
        return memory.OnDevice(module, home, model.device)

    def release(self, model, name: str, module) -> None:
        from firered_core.memory import unwrapped

        module = unwrapped(module)
        undo = self.undo.pop(name, None)
        if undo is not None:
            undo()
            soft_empty_cache()
        if model.offload == "model" and name in self.handles and self.handles[name][0] is module:
            self.manager.unload(self.handles[name][1])

    def forget(self) -> None:
        """Undo any fallback, unload every component from the manager and drop the handles (the model is being
        unloaded)."""
        for undo in self.undo.values():
            undo()
        self.undo.clear()
        for _module, handle in self.handles.values():
            self.manager.unload(handle)
        self.handles.clear()
