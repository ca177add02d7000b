"""LoRA / LoKr / LoHa files in every key style people hold, applied with a coverage report, and removed exactly.

One idea per module:

- :mod:`.keys`: key styles, splitting and normalising keys, the one group-by-module loop
- :mod:`.deltas`: the delta of one module, one function per kind (LoRA, LoHa, LoKr)
- :mod:`.files`: reading LoRA files, plain :class:`LoraWeights`, writing them in a key style
- :mod:`.adapter`: :class:`LoraLinear` (runtime adapters) and the model's Linear layers
- :mod:`.apply`: planning and applying (merge / adapter) with the coverage report (:mod:`.report`), removal
- :mod:`.state`: what is remembered per transformer for exact removal (:func:`lora_state`)
- :mod:`.schedule`: the sampling schedule a distilled LoRA carries in its metadata
- :mod:`.view`: :func:`with_loras`, :class:`LoraModelView`, :func:`model_with_loras`
- :mod:`.errors`: :class:`LoraError`
"""

from .adapter import LoraLinear, linear_modules
from .apply import LoraSpec, PlannedLora, applied_loras, apply_loras, default_mode, plan_lora, remove_loras
from .errors import LoraError
from .files import LoraWeights, lora_state_dict, lora_weights_from_state_dict, read_lora_file, save_lora
from .keys import STYLES, group_by_module, lora_keys, split_key, underscore_index
from .report import LoraCoverage, LoraReport
from .schedule import LoraSchedule, model_schedule, read_schedule, schedule_of
from .state import LoraState, lora_state
from .view import LoraModelView, model_with_loras, with_loras

__all__ = [
    "STYLES", "LoraCoverage", "LoraError", "LoraLinear", "LoraModelView", "LoraReport", "LoraSchedule", "LoraSpec",
    "LoraState", "LoraWeights", "PlannedLora", "applied_loras", "apply_loras", "default_mode", "group_by_module",
    "linear_modules", "lora_keys", "lora_state", "model_schedule", "lora_state_dict", "lora_weights_from_state_dict",
    "model_with_loras", "plan_lora", "read_lora_file", "read_schedule", "remove_loras", "schedule_of", "save_lora",
    "split_key", "underscore_index", "with_loras",
]
