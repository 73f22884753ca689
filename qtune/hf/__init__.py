"""transformers + peft integration: QuantConfig and its quantizer, checkpoints, training prep."""

from .checkpoint import export_bitsandbytes, from_pretrained
from .config import QuantConfig
from .merge import merge_adapter
from .quantizer import QtuneHfQuantizer, register
from .training import prepare_for_training

register()

__all__ = ["QtuneHfQuantizer", "QuantConfig", "export_bitsandbytes", "from_pretrained", "merge_adapter",
           "prepare_for_training"]
