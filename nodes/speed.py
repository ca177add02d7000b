"""Speed and memory settings (:class:`firered_core.speed.SpeedSettings`) as one node, and where each half applies.

The model-level half (quantisation, fp8 files kept fp8, compile, attention kernel, block swap, VAE tiling, embedding
cache) belongs to the model: FireRed Model Loader's (or Single-File Loader's) ``speed`` input gives it to the model it
loads, which applies it when each component first runs
(``FireRedModel.use``). The run-level half (batched CFG, block cache) is read by FireRed Sampler from its own
``speed`` input.
"""

from __future__ import annotations

from firered_core import options as O
from firered_core.model import FireRedModel
from firered_core.speed import MODEL_FIELDS, ModelSettings, RunSettings, SpeedSettings

from ._errors import blame, check_inputs, input_error

SPEED_TYPE = "FIRERED_SPEED"
# The node's own switch (not a setting): off sets the block cache's threshold to 0.
BLOCK_CACHE = ("BOOLEAN", {"default": False,
                           "tooltip": "Sampler: reuse the middle transformer blocks when the first blocks' output "
                                      "changes little between steps (DBCache; lossy)."})


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
        """One widget per option of :data:`firered_core.options.OPTIONS`, in its order (saved workflows map their
        values by position), plus the node's own *block_cache* switch before the block cache's threshold."""
        # Options added after the first release are optional and come last, so saved workflows keep their values.
        required: dict = {}
        optional: dict = {}
        for option in O.OPTIONS:
            if option.name == "cache_threshold":
                required["block_cache"] = BLOCK_CACHE
            (optional if option.optional else required)[option.name] = O.widget(option)
        return {"required": required, "optional": optional}

    def settings(self, block_cache: bool, **values) -> tuple[SpeedSettings]:
        missing = [o.name for o in O.OPTIONS if not o.optional and o.name not in values]
        if missing:
            raise input_error(self.NAME, missing[0], "missing")
        for option in O.OPTIONS:
            value = values.get(option.name)
            if value is None:  # an optional input a saved workflow does not have
                values[option.name] = option.default
            elif option.nullable and isinstance(value, str):
                values[option.name] = value.strip() or None
        if not block_cache:
            values["cache_threshold"] = 0.0
        check_inputs(self.NAME, {name: values[name] for name in O.LIMITS}, table=O.LIMITS)
        with blame(self.NAME, "cache_threshold", inputs=values):
            return (SpeedSettings.from_flat(values),)


NODE_CLASS_MAPPINGS = {"FireRedSpeedSettings": FireRedSpeedSettings}
