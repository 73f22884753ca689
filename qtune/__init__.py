"""qtune: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights.

`import qtune` registers `QuantConfig` (quant_method "qtune") with transformers.
"""

from . import optim
from .hf import QuantConfig, export_bitsandbytes, from_pretrained, merge_adapter, prepare_for_training
from .nn import Linear4bit, quantize_linears
from .quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = ["Linear4bit", "QuantConfig", "QuantState", "__version__", "dequantize_4bit", "export_bitsandbytes", "optim",
           "from_pretrained", "merge_adapter", "prepare_for_training", "quantize_4bit", "quantize_linears"]
