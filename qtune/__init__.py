"""qtune: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights."""

from .nn import Linear4bit, quantize_linears
from .quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = ["Linear4bit", "QuantState", "dequantize_4bit", "quantize_4bit", "quantize_linears", "__version__"]
