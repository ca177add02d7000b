"""The component bundle: where each part comes from, lazy loading, dtype, device and offload policy.

A model is the Hugging Face layout (``model_index.json`` + ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``processor/``, ``scheduler/``) or any component given separately as its own folder or single file.
Components load on first use, so a node graph that only encodes prompts never reads the transformer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from .errors import FireRedError
from .speed import ModelSettings, prepare_component

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD_MODES = ("none", "model")
COMPONENTS = ("transformer", "vae", "text_encoder")
REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")


class ModelError(FireRedError):
    """A model folder or file is missing, incomplete or of the wrong kind."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}", field="dtype") from None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")) or any(
        folder.glob("*.bin")) or any(folder.glob("*.gguf"))


def check_model_folder(path: str | Path) -> Path:
    """Raise :class:`ModelError` naming what is missing unless ``path`` is a complete Hugging Face layout."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"{path} is a file; a FireRed model is a folder with model_index.json "
                         "(give single component files with --transformer / --vae / --text-encoder)")
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    missing += [f"{name}/ weights" for name in COMPONENTS
                if (path / name).is_dir() and not _has_weights(path / name)]
    if missing:
        raise ModelError(f"incomplete model folder {path}: missing {', '.join(missing)}")
    return path


class Placement:
    """Where components rest and where they run: the one hook around running a component.

    ``FireRedModel.use(name)`` calls :meth:`acquire` right before component ``name`` runs and :meth:`release` right
    after it (also when it fails); :meth:`home_device` says where a freshly loaded component is put. The default,
    :class:`OffloadPlacement`, is the model's ``offload`` option. A host with its own memory manager (ComfyUI) plugs
    in its own by setting ``model.placement`` before the first use; the library never moves a component elsewhere.
    """

    def home_device(self, model: "FireRedModel", name: str) -> torch.device:
        return model.device

    def acquire(self, model: "FireRedModel", name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Make ``module`` ready to run on ``model.device``; returns what to run (normally ``module`` itself)."""
        return module

    def release(self, model: "FireRedModel", name: str, module: torch.nn.Module) -> None:
        """``module`` has finished running."""


class OffloadPlacement(Placement):
    """``offload="none"``: everything stays on the device. ``offload="model"``: each large component rests on the
    CPU and moves to the device only while it runs (the others are sent back first). A block-swapped transformer
    places its own weights and is never moved as a whole."""

    def home_device(self, model: "FireRedModel", name: str) -> torch.device:
        return torch.device("cpu") if model.offload == "model" else model.device

    @staticmethod
    def _moves(model: "FireRedModel", module: torch.nn.Module) -> bool:
        from .memory import is_block_swapped

        return model.offload == "model" and not is_block_swapped(module)

    def acquire(self, model: "FireRedModel", name: str, module: torch.nn.Module) -> torch.nn.Module:
        if model.offload == "model":
            for other, loaded in model.loaded_components().items():
                if other != name and self._moves(model, loaded):
                    loaded.to("cpu")
        if self._moves(model, module):
            module.to(model.device)
        return module

    def release(self, model: "FireRedModel", name: str, module: torch.nn.Module) -> None:
        if self._moves(model, module):
            module.to("cpu")
            if model.device.type == "cuda":
                torch.cuda.empty_cache()


# component object -> ModelSettings.component_key it was prepared with; keyed by the object (weakly), so a component
# shared by two models (a LoRA view and its base) is prepared once, and a new copy (a LoRA'd transformer) is not.
_prepared: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


@dataclass
class FireRedModel:
    """Lazily loaded components of one model, placed on ``device`` in ``dtype`` and prepared as ``settings`` say.

    Run a component only through :meth:`use`: it loads the component on first use, prepares it once (quantised,
    compiled, block-swapped, tiled as ``settings`` say) and lets ``placement`` put it on the device for the run.
    :meth:`get` is the raw loaded component (for inspection, LoRA patching and saving).

    Args:
        root: a Hugging Face layout folder, or None when every component is given in ``sources``.
        sources: per-component overrides: a folder or a single file (``transformer``, ``vae``, ``text_encoder``,
            ``tokenizer``, ``processor``, ``scheduler``); ``default_tokenizer``: tokenizer files used for a
            single-file text encoder that has none beside it. Without a model folder the scheduler is the
            published one (``sampling.SCHEDULER_CONFIG``).
        dtype: compute dtype of the transformer, VAE and text encoder.
        device: where computation happens.
        offload: ``none`` keeps everything on ``device``; ``model`` keeps each large component on the CPU and moves
            it to ``device`` only while it runs (what :class:`OffloadPlacement` does with it).
        gguf_mode: for a GGUF transformer file, ``runtime`` keeps quantised weights packed and decodes them at each
            call (memory ~ the file size); ``load`` dequantises them to ``dtype`` at load.
        settings: the model-level speed settings (:class:`~firered_core.speed.ModelSettings`).
        placement: the hook around each run of a component (:class:`Placement`).
    """

    root: Path | None = None
    sources: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    offload: str = "none"
    gguf_mode: str = "runtime"
    settings: ModelSettings = field(default_factory=ModelSettings)
    placement: Placement = field(default_factory=OffloadPlacement)
    _loaded: dict = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        self.device = torch.device(self.device)
        if self.offload not in OFFLOAD_MODES:
            raise ModelError(f"offload {self.offload!r} is not one of {OFFLOAD_MODES}", field="offload")
        if not isinstance(self.settings, ModelSettings):
            raise TypeError(f"settings must be a ModelSettings, got {type(self.settings).__name__}")
        from .formats import check_gguf_mode

        check_gguf_mode(self.gguf_mode)

    def source(self, name: str) -> Path:
        if name in self.sources and self.sources[name] is not None:
            return Path(self.sources[name])
        if self.root is None:
            raise ModelError(f"no source for the {name}: give a model folder or the {name} path")
        return self.root / name

    def get(self, name: str):
        """The component ``name`` as loaded (not yet prepared if it never ran), loaded on first use."""
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name)
            return self._loaded[name]

    def set(self, name: str, component) -> None:
        """Replace a component (e.g. one built in memory, or a LoRA-patched transformer); prepared on next use."""
        with self._lock:
            self._loaded[name] = component

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded_components(self) -> dict[str, torch.nn.Module]:
        """The large components (transformer, VAE, text encoder) loaded so far, by name."""
        return {name: self._loaded[name] for name in COMPONENTS if name in self._loaded}

    transformer = property(lambda self: self.get("transformer"))
    vae = property(lambda self: self.get("vae"))
    text_encoder = property(lambda self: self.get("text_encoder"))
    processor = property(lambda self: self.get("processor"))
    scheduler_config = property(lambda self: self.get("scheduler"))

    def _load(self, name: str):
        if name == "scheduler" and self.root is None and "scheduler" not in self.sources:
            from .sampling import SCHEDULER_CONFIG

            return dict(SCHEDULER_CONFIG)
        if name in ("processor", "tokenizer") and "processor" not in self.sources and (
                self.root is None or self.sources.get("tokenizer")):
            return _single_file_processor(self)
        src = self.source(name)
        if name == "scheduler":
            file = src / "scheduler_config.json" if src.is_dir() else src
            if not file.is_file():
                raise ModelError(f"scheduler config not found: {file}")
            from .paths import read_json

            return read_json(file, ModelError)
        if name in ("processor", "tokenizer"):
            return _load_processor(self, src)
        module = _load_module(name, src, self.dtype, self.gguf_mode, self.settings.fp8_mode)
        return module.to(self.placement.home_device(self, name)).eval().requires_grad_(False)

    def prepared(self, name: str) -> torch.nn.Module:
        """Component ``name`` with the model-level settings applied (once; later calls return it as it is)."""
        with self._lock:
            module = self.get(name)
            wanted = self.settings.component_key(name)
            done = _prepared.get(module)
            if done is None:
                prepare_component(module, name, self.settings, self.device)
                _prepared[module] = wanted
            elif done != wanted:
                raise ModelError(f"the {name} was already prepared with {done}; reload the model to apply {wanted}",
                                 field="settings")
            return module

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[torch.nn.Module]:
        """Yield component ``name`` (``transformer``, ``vae``, ``text_encoder``) prepared and on the compute device.

        The one place a component is fetched for running: :meth:`prepared`, then ``placement.acquire`` before the
        run and ``placement.release`` after it.
        """
        module = self.placement.acquire(self, name, self.prepared(name))
        try:
            yield module
        finally:
            self.placement.release(self, name, module)

    def prompt_fingerprint(self) -> str:
        """Identifies the (prepared) text encoder's weights: the model part of prompt-embedding cache keys."""
        from .embed_cache import model_fingerprint

        return model_fingerprint(self.prepared("text_encoder"))

    def unload(self) -> None:
        """Drop every loaded component (they reload, and are prepared again, on next use)."""
        with self._lock:
            self._loaded.clear()


def _load_module(name: str, src: Path, dtype: torch.dtype, gguf_mode: str = "runtime", fp8_mode: str = "load"):
    """Component ``name`` from a single file or a folder; ``fp8_mode`` applies to a single-file transformer (a
    folder is loaded by diffusers / transformers in ``dtype``)."""
    if not src.exists():
        raise ModelError(f"{name} not found: {src}")
    if src.is_file():
        from . import formats

        return formats.load_single_file(name, src, dtype, gguf_mode=gguf_mode,
                                        fp8_mode=fp8_mode if name == "transformer" else "load")
    if not _has_weights(src):
        raise ModelError(f"{name} folder {src} has no weights (*.safetensors)")
    if name == "transformer" and fp8_mode == "runtime":
        log.info("fp8_mode=runtime applies to a single-file transformer; the folder %s loads in %s", src, dtype)
    if name == "transformer":
        from diffusers import QwenImageTransformer2DModel as cls
    elif name == "vae":
        from diffusers import AutoencoderKLQwenImage as cls
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    try:
        return cls.from_pretrained(src, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the {name} from {src}: {exc}") from exc


def _load_processor(model: FireRedModel, src: Path):
    from transformers import Qwen2VLProcessor

    candidates = [src, model.source("tokenizer")] if src.name == "processor" else [src]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.json")):
            try:
                return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load the processor from {folder}: {exc}") from exc
    raise ModelError(f"processor / tokenizer not found in {src}")


def _single_file_processor(model: FireRedModel):
    """The processor when no model folder provides it, or when a ``tokenizer`` folder is named: that folder, files
    next to a single-file text encoder, or the ``default_tokenizer`` source (e.g. ComfyUI's Qwen2.5 tokenizer)."""
    from .formats import FormatError, load_text_encoder_processor
    from .formats.text_encoder import processor_from_tokenizer_dir

    tokenizer, te = model.sources.get("tokenizer"), model.source("text_encoder")
    try:
        if te.is_file():
            return load_text_encoder_processor(te, tokenizer=tokenizer,
                                               default_tokenizer=model.sources.get("default_tokenizer"))
        if tokenizer:
            return processor_from_tokenizer_dir(tokenizer)
    except FormatError as exc:
        raise ModelError(str(exc)) from exc
    raise ModelError(f"no tokenizer for the text encoder {te}: give a tokenizer folder (--tokenizer DIR)")


def load_model(path: str | Path | None = None, dtype: str | torch.dtype = "fp32", device: str = "cpu",
               offload: str = "none", gguf_mode: str = "runtime", settings: ModelSettings | None = None,
               **sources) -> FireRedModel:
    """Describe a model to load lazily: a Hugging Face layout folder and/or per-component sources.

    The folder is checked at once, so a wrong path fails here with a clear message rather than mid-run.
    """
    root = None
    if path is not None:
        root = Path(path)
        given = {k for k, v in sources.items() if v is not None and k not in ("tokenizer", "default_tokenizer")}
        if not given:
            check_model_folder(root)
        elif not root.is_dir():
            raise ModelError(f"model folder not found: {root}")
    return FireRedModel(root=root, sources={k: v for k, v in sources.items() if v is not None},
                        dtype=parse_dtype(dtype), device=torch.device(device), offload=offload, gguf_mode=gguf_mode,
                        settings=settings or ModelSettings())
