"""GGUF in one home: reading files (:mod:`.reader`), decoding blocks (:mod:`.kernels`: torch kernels and the numpy
reference), the packed Linear that decodes at run time (:mod:`.linear`), choosing and swapping in packed layers at load
(:mod:`.runtime`), and writing files (:mod:`.writer`, for tests and benchmarks)."""

from .kernels import BLOCKS, dequantize, dequantize_reference, qtype_name, supported
from .linear import GGUFLinear
from .reader import GGUFCheckpoint
from .runtime import GGUF_MODES, check_gguf_mode, packed_summary, packed_weight_keys, swap_in_packed
from .writer import write_gguf

__all__ = ["BLOCKS", "GGUF_MODES", "GGUFCheckpoint", "GGUFLinear", "check_gguf_mode", "dequantize",
           "dequantize_reference", "packed_summary", "packed_weight_keys", "qtype_name", "supported", "swap_in_packed",
           "write_gguf"]
