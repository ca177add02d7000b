"""Speed and memory settings (:class:`firered_core.speed.SpeedSettings`) as one node, and where each half applies.

The model-level half (quantisation, fp8 files kept fp8, compile, attention kernel, block swap, VAE tiling, embedding
cache) belongs to the model: FireRed Model Loader's (or Single-File Loader's) ``speed`` input gives it to the model it
loads, which applies it when each component first runs
(``FireRedModel.use``). The run-level half (batched CFG, block cache) is read by FireRed Sampler from its own
``speed`` input.
"""

from __future__ import annotations

from firered_core.block_cache import BlockCacheConfig
from firered_core.kernels.attention import ATTENTION_BACKENDS
from firered_core.memory import QUANT_MODES
from firered_core.model import FireRedModel
from firered_core.quant.fp8_file import FP8_MODES
from firered_core.speed import COMPILE_MODES, MODEL_FIELDS, ModelSettings, RunSettings, SpeedSettings
from firered_core.limits import SPEED_OPTIONS, widget

from ._errors import blame, check_inputs, input_error

SPEED_TYPE = "FIRERED_SPEED"


def for_sampler(node: str, model: FireRedModel, speed: SpeedSettings | None) -> RunSettings:
    """The sampler's run-level settings; a model-level field set only on the sampler is an error (it must reach the
    loader, where the model gets its settings)."""
    if speed is None:
        return RunSettings()
    defaults = ModelSettings()
    for name in MODEL_FIELDS:
        wanted = getattr(speed.model, name)
        if wanted != getattr(defaults, name) and wanted != getattr(model.settings, name):
            raise input_error(node, "speed", f"{name}={wanted!r} applies when the model loads, but the model was "
                              f"loaded with {name}={getattr(model.settings, name)!r}: connect this settings node to "
                              "FireRed Model Loader's speed input as well")
    return speed.run


class FireRedSpeedSettings:
    NAME = "FireRed Speed Settings"
    DESCRIPTION = ("Speed and memory options in one place. Connect it to FireRed Model Loader or Single-File Loader "
                   "(quantisation, fp8 mode, compile, attention kernel, block swap, VAE tiling, embedding cache) and "
                   "to FireRed Sampler (batched CFG, block cache). Lossless: batched CFG, block swap, compile, "
                   "embedding cache, SDPA attention kernels, fp8 mode runtime where the GPU has no fp8 matmul. "
                   "Lossy: block cache, quantisation, fp8 mode runtime on fp8 GPUs, attention sage.")
    CATEGORY = "FireRed"
    RETURN_TYPES = (SPEED_TYPE,)
    RETURN_NAMES = ("speed",)
    OUTPUT_TOOLTIPS = ("The settings, for the speed input of FireRed Model Loader and FireRed Sampler.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        defaults, run = ModelSettings(), RunSettings()
        return {"required": {
            "batched_cfg": ("BOOLEAN", {"default": run.batched_cfg,
                                        "tooltip": "Sampler: run the instruction and negative passes of true CFG in "
                                                   "one batched forward (same result, faster on a GPU; falls back "
                                                   "to two passes when memory is short)."}),
            "block_cache": ("BOOLEAN", {"default": False,
                                        "tooltip": "Sampler: reuse the middle transformer blocks when the first "
                                                   "blocks' output changes little between steps (DBCache; lossy)."}),
            "cache_threshold": ("FLOAT", {"default": BlockCacheConfig.threshold, **widget("cache_threshold"),
                                          "step": 0.005,
                                          "tooltip": "Block cache: skip the middle blocks when the first blocks' "
                                                     "residual changes less than this (relative L1). 0 = never "
                                                     "skip; ~0.05-0.15 typical; higher = faster, less exact."}),
            "cache_first": ("INT", {"default": run.cache_first, **widget("cache_first"),
                                    "tooltip": "Block cache: blocks always computed first (their change is the "
                                               "probe)."}),
            "cache_last": ("INT", {"default": run.cache_last, **widget("cache_last"),
                                   "tooltip": "Block cache: blocks always computed last."}),
            "cache_warmup": ("INT", {"default": run.cache_warmup, **widget("cache_warmup"),
                                     "tooltip": "Block cache: first steps always computed in full."}),
            "cache_max_consecutive": ("INT", {"default": run.cache_max_consecutive,
                                              **widget("cache_max_consecutive"),
                                              "tooltip": "Block cache: most cached steps in a row before a full "
                                                         "step."}),
            "taylorseer": ("BOOLEAN", {"default": run.taylorseer,
                                       "tooltip": "Block cache: extrapolate the cached residual to first order "
                                                  "(TaylorSeer) instead of reusing it as is."}),
            "quantize": (list(QUANT_MODES), {"default": defaults.quantize,
                                             "tooltip": "Loader: quantisation of the transformer (half the "
                                                        "weight memory of bf16; output projections stay full "
                                                        "precision). int8 / fp8: weight-only; int8_mm / fp8_mm: "
                                                        "int8 / fp8 matmuls on GPUs that have them (fp8_mm "
                                                        "needs RTX 40xx / H100 or newer and is fastest only "
                                                        "with compile: without it, slower than bf16). Lossy."}),
            "quantize_text_encoder": (list(QUANT_MODES), {"default": defaults.quantize_text_encoder,
                                                          "tooltip": "Loader: weight-only quantisation of the "
                                                                     "Qwen2.5-VL text encoder (vision tower kept)."}),
            "compile": (list(COMPILE_MODES), {"default": defaults.compile,
                                              "tooltip": "Loader: torch.compile the repeated transformer blocks "
                                                         "(first run slower; not with block swap)."}),
            "block_swap": ("INT", {"default": defaults.block_swap, **widget("block_swap"),
                                   "tooltip": "Loader: keep this many transformer blocks on the GPU and stream the "
                                              "rest from system RAM (0 = off). For small GPUs."}),
            "vae_tiling": ("BOOLEAN", {"default": defaults.vae_tiling,
                                       "tooltip": "Loader: decode / encode large images in tiles (less VRAM)."}),
            "embed_cache": ("BOOLEAN", {"default": defaults.embed_cache,
                                        "tooltip": "Loader: never encode the same (prompt, references) twice in "
                                                   "this ComfyUI session (lossless)."}),
            "embed_cache_dir": ("STRING", {"default": "",
                                           "tooltip": "Loader: also keep prompt embeddings in this folder across "
                                                      "sessions (empty = memory only)."}),
        }, "optional": {  # added after the first release: optional and last, so saved workflows keep their values
            "fp8_mode": (list(FP8_MODES), {"default": defaults.fp8_mode,
                                           "tooltip": "Single-File Loader, fp8 transformer file only (ComfyUI "
                                                      "fp8_scaled or fp8_e4m3fn): runtime keeps its weights in fp8 "
                                                      "(half the memory of bf16) and runs fp8 matmuls on RTX 40xx / "
                                                      "H100 and newer (lossy: activations in fp8); other devices "
                                                      "dequantise each layer when it runs (same pixels as load). "
                                                      "load: convert to the compute dtype when loading. No LoRA "
                                                      "on a runtime fp8 transformer."}),
            "attention": (list(ATTENTION_BACKENDS), {
                "default": defaults.attention,
                "tooltip": "Loader: the attention kernel. sdpa = torch's choice; flash / cudnn / efficient = that "
                           "SDPA kernel first (others after it where it cannot run); auto = cuDNN on H100 and newer, "
                           "flash on other GPUs, torch's choice on a CPU; sage = SageAttention (needs the sageattention package; lossy, "
                           "CUDA only, SDPA elsewhere). All but sage give the same image within rounding."}),
        }}

    def settings(self, batched_cfg: bool, block_cache: bool, cache_threshold: float, cache_first: int,
                 cache_last: int, cache_warmup: int, cache_max_consecutive: int, taylorseer: bool, quantize: str,
                 quantize_text_encoder: str, compile: str, block_swap: int, vae_tiling: bool, embed_cache: bool,
                 embed_cache_dir: str, fp8_mode: str | None = None,
                 attention: str | None = None) -> tuple[SpeedSettings]:
        defaults = ModelSettings()
        fp8_mode, attention = fp8_mode or defaults.fp8_mode, attention or defaults.attention
        values = dict(batched_cfg=batched_cfg, cache_threshold=cache_threshold if block_cache else 0.0,
                      cache_first=cache_first, cache_last=cache_last, cache_warmup=cache_warmup,
                      cache_max_consecutive=cache_max_consecutive, taylorseer=taylorseer, quantize=quantize,
                      quantize_text_encoder=quantize_text_encoder, fp8_mode=fp8_mode, compile=compile,
                      attention=attention, block_swap=block_swap, vae_tiling=vae_tiling, embed_cache=embed_cache,
                      embed_cache_dir=embed_cache_dir.strip() or None)
        check_inputs(self.NAME, {name: values[name] for name in SPEED_OPTIONS})
        with blame(self.NAME, "cache_threshold", inputs=values):
            return (SpeedSettings.from_flat(values),)


NODE_CLASS_MAPPINGS = {"FireRedSpeedSettings": FireRedSpeedSettings}
