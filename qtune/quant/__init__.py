"""The 4-bit formats: code tables, QuantState, quantize/dequantize (torch reference + dispatch)."""

from .codes import BLOCKSIZES, QUANT_TYPES, code_table, dynamic_map
from .functional import dequantize_4bit, quantize_4bit
from .state import NestedState, QuantState

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "NestedState", "QuantState", "code_table", "dequantize_4bit",
           "dynamic_map", "quantize_4bit"]
