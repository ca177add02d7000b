"""One settings object for every speed / memory option, shared by the CLI, the ComfyUI settings node and benches.

Model-level options (quantisation, compile, block swap, VAE tiling) are applied once per component, lazily, the
first time the pipeline uses it (:func:`prepare`); run-level options (batched CFG, block cache, embedding cache) are
read by the pipeline on every edit. The defaults are today's behaviour: every option off except the in-memory
embedding cache, which is lossless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .cache import BlockCache, BlockCacheConfig
from .kernels.attention import ATTENTION_BACKENDS, check_backend
from .memory import QUANT_MODES

COMPILE_MODES = ("none", "blocks", "blocks-max-autotune", "blocks-cudagraphs")
# torch.compile mode per COMPILE_MODES value (regional compile of the repeated blocks in each case).
COMPILE_TORCH_MODE = {"blocks": None, "blocks-max-autotune": "max-autotune-no-cudagraphs",
                      "blocks-cudagraphs": "reduce-overhead"}


@dataclass
class SpeedSettings:
    """Speed and memory options. ``cache_threshold`` 0 disables the block cache; ``block_swap`` 0 disables it."""

    batched_cfg: bool = False
    cache_threshold: float = 0.0
    cache_first: int = BlockCacheConfig.first
    cache_last: int = BlockCacheConfig.last
    cache_warmup: int = BlockCacheConfig.warmup
    cache_max_consecutive: int = BlockCacheConfig.max_consecutive
    taylorseer: bool = False
    quantize: str = "none"
    quantize_text_encoder: str = "none"
    compile: str = "none"
    attention: str = "sdpa"
    block_swap: int = 0
    vae_tiling: bool = False
    embed_cache: bool = True
    embed_cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("quantize", "quantize_text_encoder"):
            if getattr(self, name) not in QUANT_MODES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {QUANT_MODES}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r} is not one of {COMPILE_MODES}")
        check_backend(self.attention)
        if self.block_swap < 0:
            raise ValueError(f"block_swap={self.block_swap} must be >= 0")
        if self.block_swap and self.compile != "none":
            raise ValueError("block swap moves weights inside the blocks' forward; it cannot be compiled")
        self.cache_config()

    @classmethod
    def from_dict(cls, values: dict | None) -> "SpeedSettings":
        """Build from a plain dict (unknown keys are an error, so a typo in a node or a flag is not ignored)."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown speed settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_config(self) -> BlockCacheConfig | None:
        if self.cache_threshold <= 0:
            return None
        return BlockCacheConfig(threshold=self.cache_threshold, first=self.cache_first, last=self.cache_last,
                                warmup=self.cache_warmup, max_consecutive=self.cache_max_consecutive,
                                taylorseer=self.taylorseer)

    def new_block_cache(self) -> BlockCache | None:
        config = self.cache_config()
        return None if config is None else BlockCache(config)

    def embed_cache_obj(self):
        from .embed_cache import EmbedCache, default_cache

        if not self.embed_cache:
            return None
        if self.embed_cache_dir:
            return _disk_caches.setdefault(self.embed_cache_dir, EmbedCache(disk=self.embed_cache_dir))
        return default_cache()


_disk_caches: dict = {}


def prepare(model, settings: SpeedSettings, name: str) -> None:
    """Apply the model-level options to component ``name`` of a ``FireRedModel`` once (idempotent)."""
    from . import memory

    module = model.get(name)
    wanted = _component_key(settings, name)
    done = getattr(module, "_firered_speed", None)
    if done == wanted:
        return
    if done is not None:
        raise RuntimeError(f"the {name} was already prepared with {done}; reload the model to apply {wanted}")
    if name == "transformer":
        memory.quantize_transformer(module, settings.quantize)
        if settings.block_swap:
            memory.BlockSwap(module, settings.block_swap, model.device)
        if settings.attention != "sdpa":
            from .kernels.attention import set_attention_backend

            set_attention_backend(module, settings.attention, model.device)
        if settings.compile != "none":
            compile_blocks(module, mode=COMPILE_TORCH_MODE[settings.compile])
    elif name == "text_encoder":
        memory.quantize_text_encoder(module, settings.quantize_text_encoder)
    elif name == "vae":
        memory.enable_vae_tiling(module, settings.vae_tiling)
    module._firered_speed = wanted


def _component_key(settings: SpeedSettings, name: str) -> tuple:
    if name == "transformer":
        return (settings.quantize, settings.block_swap, settings.compile, settings.attention)
    if name == "text_encoder":
        return (settings.quantize_text_encoder,)
    return (settings.vae_tiling,)


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
    if compiled is None or getattr(compiled, "_firered_clones", False):
        return

    def call(*args, **kwargs):
        return tuple(t.clone() for t in compiled(*args, **kwargs))
    call._firered_clones = True
    block._compiled_call_impl = call


def add_arguments(parser) -> None:
    """The speed flags of the CLI (``--batched-cfg``, ``--cache-threshold`` ...), one per setting."""
    g = parser.add_argument_group("speed and memory")
    g.add_argument("--batched-cfg", action="store_true", help="run both CFG branches in one forward")
    g.add_argument("--cache-threshold", type=float, default=0.0,
                   help="block cache: skip middle blocks when the first blocks' residual changes less than this "
                        "(relative L1; 0 = off, ~0.05-0.15 typical)")
    g.add_argument("--cache-first", type=int, default=1, help="block cache: blocks always computed first")
    g.add_argument("--cache-last", type=int, default=1, help="block cache: blocks always computed last")
    g.add_argument("--cache-warmup", type=int, default=2, help="block cache: steps always fully computed")
    g.add_argument("--cache-max-consecutive", type=int, default=3, help="block cache: most cached steps in a row")
    g.add_argument("--taylorseer", action="store_true", help="block cache: extrapolate the cached residual")
    g.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="transformer quantisation: int8 / fp8 weight-only, or int8_mm / fp8_mm with int8 / fp8 "
                        "matmuls (dynamic per-token activation scales) where the GPU has them")
    g.add_argument("--quantize-text-encoder", choices=QUANT_MODES, default="none",
                   help="text encoder weight-only quantisation")
    g.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the transformer blocks (default mode, max-autotune without CUDA graphs, or "
                        "with CUDA graphs)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="joint attention kernel: torch's choice, a preferred SDPA kernel, SageAttention, or auto")
    g.add_argument("--block-swap", type=int, default=0, metavar="N",
                   help="keep N transformer blocks on the device and stream the rest (0 = off)")
    g.add_argument("--vae-tiling", action="store_true", help="decode / encode large images in tiles")
    g.add_argument("--no-embed-cache", dest="embed_cache", action="store_false",
                   help="encode the prompt even if the same one was encoded before")
    g.add_argument("--embed-cache-dir", default=None, help="also keep prompt embeddings in this folder")


def from_args(args) -> SpeedSettings:
    return SpeedSettings.from_dict({f.name: getattr(args, f.name) for f in fields(SpeedSettings)})
