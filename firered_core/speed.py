"""Speed and memory options, typed and validated, in the two halves they apply to.

- :class:`ModelSettings` belong to the model (quantisation, fp8 files kept fp8, compile, attention kernel, block swap,
  VAE tiling, the embedding cache):
  they are part of its identity, a :class:`~firered_core.model.FireRedModel` holds them and applies them to each
  component once, the first time ``model.use(name)`` runs it (:func:`prepare_component`).
- :class:`RunSettings` belong to one edit (batched CFG, the block cache): the pipeline and the sampler node read
  them on every run.

:class:`SpeedSettings` is both halves together, as one set of CLI flags or one ComfyUI node produces them. Every
default is today's behaviour: every option off except the in-memory embedding cache, which is lossless. Bad values
raise :class:`SettingsError` naming the field.
"""

from __future__ import annotations

import weakref

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .block_cache import BlockCache, BlockCacheConfig
from .errors import FireRedError
from .kernels.attention import SAGE_MISSING, sage_installed
from .options import fields, names

# torch.compile mode per `options.COMPILE_MODES` value (regional compile of the repeated blocks in each case).
COMPILE_TORCH_MODE = {"blocks": None, "blocks-max-autotune": "max-autotune-no-cudagraphs",
                      "blocks-cudagraphs": "reduce-overhead"}


class SettingsError(FireRedError):
    """A speed / memory setting is out of range, unknown or inconsistent; ``field`` names it."""


class _Settings(BaseModel):
    """Frozen, no unknown fields; a validation error becomes one :class:`SettingsError` naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            value = f"={first['input']!r}" if "input" in first and first["type"] != "extra_forbidden" else ""
            raise SettingsError(f"speed setting {field}{value}: {first['msg']}", field=field) from None
        self._check()

    def _check(self) -> None:
        """Rules between fields (raise :class:`SettingsError`)."""


class _ModelSettings(_Settings):
    """What the model is prepared with: applied once per component by ``FireRedModel.use``. Its fields are the
    ``model`` rows of :data:`firered_core.options.OPTIONS`.

    ``fp8_mode`` is the one field read when the transformer loads rather than when it is prepared: ``runtime`` keeps
    the e4m3 Linear weights of an fp8 single file (ComfyUI "fp8_scaled" or plain e4m3) in fp8 and runs them on the
    fp8 matmul path (dequantising per call where the device has no fp8 matmul); ``load`` dequantises them to the
    compute dtype at load (today's path). Files without fp8 weights load the same either way.
    """

    def _check(self) -> None:
        if self.block_swap and self.compile != "none":
            raise SettingsError("block swap moves weights inside the blocks' forward; it cannot be compiled "
                                "(set compile to none or block_swap to 0)", field="compile")
        if self.attention == "sage" and not sage_installed():
            raise SettingsError(SAGE_MISSING, field="attention")

    def component_key(self, name: str) -> tuple:
        """The fields that change component ``name`` when it is prepared (other components ignore them; ``fp8_mode``
        acts at load, not here)."""
        if name == "transformer":
            return (self.quantize, self.block_swap, self.compile, self.attention)
        if name == "text_encoder":
            return (self.quantize_text_encoder,)
        if name == "vae":
            return (self.vae_tiling,)
        return ()

    def embed_cache_obj(self):
        """The prompt-embedding cache these settings ask for (None when it is off)."""
        from .embed_cache import EmbedCache, default_cache

        if not self.embed_cache:
            return None
        if self.embed_cache_dir:
            return _disk_caches.setdefault(self.embed_cache_dir, EmbedCache(disk=self.embed_cache_dir))
        return default_cache()


class _RunSettings(_Settings):
    """What one edit runs with (the ``run`` rows of :data:`firered_core.options.OPTIONS`). ``cache_threshold`` 0
    turns the block cache off."""

    def cache_config(self) -> BlockCacheConfig | None:
        if self.cache_threshold <= 0:
            return None
        return BlockCacheConfig(threshold=self.cache_threshold, first=self.cache_first, last=self.cache_last,
                                warmup=self.cache_warmup, max_consecutive=self.cache_max_consecutive,
                                taylorseer=self.taylorseer)

    def new_block_cache(self) -> BlockCache | None:
        config = self.cache_config()
        return None if config is None else BlockCache(config)


ModelSettings = create_model("ModelSettings", __base__=_ModelSettings, __module__=__name__,
                             __doc__=_ModelSettings.__doc__, **fields("model"))
RunSettings = create_model("RunSettings", __base__=_RunSettings, __module__=__name__, __doc__=_RunSettings.__doc__,
                           **fields("run"))
MODEL_FIELDS, RUN_FIELDS = names("model"), names("run")


class SpeedSettings(_Settings):
    """Both halves, as one set of CLI flags or one ComfyUI settings node gives them."""

    model: ModelSettings = ModelSettings()
    run: RunSettings = RunSettings()

    @classmethod
    def from_flat(cls, values: dict | None) -> "SpeedSettings":
        """From flat field names (``quantize``, ``batched_cfg`` ...); an unknown name is an error, so a typo in a
        node or a flag is never ignored."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(MODEL_FIELDS) - set(RUN_FIELDS))
        if unknown:
            raise SettingsError(f"unknown speed settings {unknown}; known: {sorted(MODEL_FIELDS + RUN_FIELDS)}",
                                field=unknown[0])
        return cls(model=ModelSettings(**{k: v for k, v in values.items() if k in MODEL_FIELDS}),
                   run=RunSettings(**{k: v for k, v in values.items() if k in RUN_FIELDS}))


_disk_caches: dict = {}


def prepare_component(module: torch.nn.Module, name: str, settings: ModelSettings, device: torch.device) -> None:
    """Apply ``settings`` to component ``name`` in place. Called once per component by ``FireRedModel.use``."""
    from . import memory
    from .quant.linear import log_matmul_path

    if name == "transformer":
        memory.quantize_transformer(module, settings.quantize)
        log_matmul_path(module, device)
        if settings.block_swap:
            memory.BlockSwap(module, settings.block_swap, device)
        if settings.attention != "sdpa":
            from .kernels.attention import set_attention_backend

            set_attention_backend(module, settings.attention, device)
        if settings.compile != "none":
            compile_blocks(module, mode=COMPILE_TORCH_MODE[settings.compile])
    elif name == "text_encoder":
        memory.quantize_text_encoder(module, settings.quantize_text_encoder)
        log_matmul_path(module, device)
    elif name == "vae":
        memory.enable_vae_tiling(module, settings.vae_tiling)


def compile_blocks(transformer, **kwargs) -> None:
    """torch.compile each repeated block (regional compilation: one graph reused by all 60 blocks).

    ``fullgraph=True`` by default, so a graph break (e.g. from a LoRA wrapper) is an error rather than a slowdown.
    ``mode="reduce-overhead"`` adds CUDA-graph capture of each compiled block (fixed shapes; benchmarks/gpu.py
    measures it against ``"max-autotune-no-cudagraphs"`` and the default).
    """
    kwargs.setdefault("fullgraph", True)
    kwargs.setdefault("dynamic", False)
    if kwargs.get("mode") is None:
        kwargs.pop("mode", None)
    transformer.compile_repeated_blocks(**kwargs)
    if kwargs.get("mode") == "reduce-overhead":
        for block in transformer.transformer_blocks:
            _clone_outputs(block)


def _clone_outputs(block) -> None:
    """With CUDA graphs every block replays the same graph, whose outputs live in static memory that the next
    block's replay overwrites: hand the loop copies (one activation copy per block, microseconds)."""
    compiled = block._compiled_call_impl
    if compiled is None or compiled in _CLONING_CALLS:
        return

    def call(*args, **kwargs):
        return tuple(t.clone() for t in compiled(*args, **kwargs))
    _CLONING_CALLS.add(call)
    block._compiled_call_impl = call


# The wrappers _clone_outputs installed (a second compile_blocks on the same blocks must not wrap them twice); weak,
# so a dropped model takes its wrappers with it.
_CLONING_CALLS: weakref.WeakSet = weakref.WeakSet()


def from_args(args) -> SpeedSettings:
    return SpeedSettings.from_flat({name: getattr(args, name) for name in MODEL_FIELDS + RUN_FIELDS})
